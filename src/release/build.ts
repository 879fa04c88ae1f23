// `phantoma-release build`: one reproducible tarball from a checkout. Contents: the manifest, then our code
// (bin/, src/, dist/, package.json, package-lock.json), the production node_modules (the lock file's
// non-dev packages, as installed), the native build outputs (warden, BPF objects, addon, threadpool) and
// the pinned Node runtime (.runtime/). Normalised so two builds of one commit are byte-identical: entries
// sorted by path (bytewise), mtime 0, owner 0:0 with no names, modes 0644/0755, symlinks kept as links,
// gzip with a zero header mtime and fixed level, manifest keys in a fixed order, no build host or time.
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync, lstatSync, readdirSync, readFileSync, readlinkSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { createGzip, constants as zc } from 'node:zlib';
import { execFileSync } from 'node:child_process';
import { PhantomaError, ERRORS } from '../errors.ts';
import { tarStream, type TarEntry } from '../updates/tar.ts';
import { MANIFEST_FORMAT, MANIFEST_NAME, isContainedLink, type Manifest, type ManifestFile, type ManifestLink } from '../updates/manifest.ts';

/** What a release holds, relative to the checkout. Directories are walked; missing ones are skipped. */
export const RELEASE_PATHS = Object.freeze(['package.json', 'package-lock.json', 'bin', 'src', 'dist', 'control-plane', 'native/warden/build', 'native/egress-bpf/build', 'native/addon/build', 'native/threadpool/build', '.runtime']);
const SKIP_NAMES = new Set(['.git', '.DS_Store', '.build-stamp']);

function fail(message: string, cause?: unknown): PhantomaError {
  return new PhantomaError(ERRORS.RELEASE_BUILD_FAILED, message, cause === undefined ? undefined : { cause });
}

/** node_modules/<pkg> directories npm installs for production: the lock's packages not marked dev. */
export function productionPackages(root: string): string[] {
  const lockPath = join(root, 'package-lock.json');
  if (!existsSync(lockPath)) return [];
  const lock = JSON.parse(readFileSync(lockPath, 'utf8')) as { packages?: Record<string, { dev?: boolean; devOptional?: boolean; link?: boolean }> };
  return Object.entries(lock.packages ?? {})
    .filter(([p, m]) => p.startsWith('node_modules/') && !m.dev && !m.devOptional && !m.link && existsSync(join(root, p)))
    .map(([p]) => p);
}

function walk(root: string, rel: string, out: Map<string, 'file' | 'symlink'>, skipNested: boolean): void {
  const abs = join(root, rel);
  let st;
  try {
    st = lstatSync(abs);
  } catch {
    return;
  }
  if (st.isSymbolicLink()) out.set(rel, 'symlink');
  else if (st.isFile()) out.set(rel, 'file');
  else if (st.isDirectory()) {
    for (const name of readdirSync(abs)) {
      if (SKIP_NAMES.has(name)) continue;
      // Nested node_modules are lock entries of their own (included only when they are production ones).
      if (skipNested && name === 'node_modules') continue;
      walk(root, rel ? `${rel}/${name}` : name, out, skipNested);
    }
  }
}

export function collectReleaseFiles(root: string, paths: readonly string[] = RELEASE_PATHS): Map<string, 'file' | 'symlink'> {
  const out = new Map<string, 'file' | 'symlink'>();
  for (const p of paths) walk(root, p, out, false);
  for (const p of productionPackages(root)) walk(root, p, out, true);
  return out;
}

async function sha256Of(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(path)) h.update(c as Buffer);
  return h.digest('hex');
}

function gitCommit(root: string): string | undefined {
  try {
    return execFileSync('git', ['-C', root, 'rev-parse', 'HEAD'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim() || undefined;
  } catch {
    return undefined;
  }
}

export interface BuildOptions {
  root: string;
  out: string;
  version?: string;
  /** Top-level paths to include instead of RELEASE_PATHS (tests build a small tree with the same code). */
  paths?: readonly string[];
  commit?: string | null;
}

export interface BuildResult {
  path: string;
  sha256: string;
  bytes: number;
  files: number;
  symlinks: number;
  version: string;
}

const byPath = (a: { path: string }, b: { path: string }): number => (Buffer.compare(Buffer.from(a.path), Buffer.from(b.path)));

export async function buildRelease(o: BuildOptions): Promise<BuildResult> {
  const pkg = JSON.parse(readFileSync(join(o.root, 'package.json'), 'utf8')) as { version?: string };
  const version = o.version ?? pkg.version ?? '0.0.0';
  // The node reports package.json's version (src/version.ts): a release must say the same in both places.
  if (pkg.version !== version) throw fail(`package.json says version ${String(pkg.version)}, the build was asked for ${version}; bump package.json instead`);
  const found = collectReleaseFiles(o.root, o.paths);
  const files: ManifestFile[] = [];
  const symlinks: ManifestLink[] = [];
  for (const [rel, kind] of found) {
    const abs = join(o.root, rel);
    if (kind === 'symlink') {
      const target = readlinkSync(abs);
      // A link that leaves the release would dangle on the node; it is left out (and reported).
      if (isContainedLink(rel, target)) symlinks.push({ path: rel, target });
      continue;
    }
    const st = lstatSync(abs);
    files.push({ path: rel, mode: st.mode & 0o100 ? 0o755 : 0o644, size: st.size, sha256: await sha256Of(abs) });
  }
  files.sort(byPath);
  symlinks.sort(byPath);
  const commit = o.commit === null ? undefined : (o.commit ?? gitCommit(o.root));
  const manifest: Manifest = { format: MANIFEST_FORMAT, name: 'phantoma', version, ...(commit ? { commit } : {}), files, symlinks };
  const manifestBytes = Buffer.from(JSON.stringify(manifest, null, 1) + '\n');
  const entries: TarEntry[] = [{ type: 'file', path: MANIFEST_NAME, mode: 0o644, size: manifestBytes.length, data: () => [manifestBytes] }];
  const all = [...files.map((f) => ({ ...f, link: false as const })), ...symlinks.map((l) => ({ ...l, link: true as const }))].sort(byPath);
  for (const e of all) {
    if (e.link) entries.push({ type: 'symlink', path: e.path, target: e.target });
    else entries.push({ type: 'file', path: e.path, mode: e.mode, size: e.size, data: () => createReadStream(join(o.root, e.path)) as AsyncIterable<Buffer> });
  }
  const tmp = `${o.out}.tmp-${process.pid}`;
  try {
    // Node's gzip writes mtime 0 and OS 3 in its header; level and strategy are fixed here.
    await pipeline(tarStream(entries), createGzip({ level: 9, strategy: zc.Z_DEFAULT_STRATEGY, memLevel: 8, windowBits: 15 }), createWriteStream(tmp));
    renameSync(tmp, o.out);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw fail(`could not write ${o.out}: ${(err as Error).message}`, err);
  }
  const bytes = lstatSync(o.out).size;
  return { path: o.out, sha256: await sha256Of(o.out), bytes, files: files.length, symlinks: symlinks.length, version };
}
