// The Docker worker image, built locally from files this machine already has (no registry is reachable):
// the pinned Node runtime binary, package.json, the compiled dist/, the node_modules a worker imports
// (node-llama-cpp and its prebuilt CPU binaries, pino), the native builds, and the shared libraries those
// binaries link against (found with ldd, copied with the symlinks on their paths). No shell, no package
// manager, no /etc: the container runs exactly one program, the worker.
//
// The image is named by a digest of its content (phantoma-worker:<16 hex>), so a gateway can tell at
// start-up whether the image in dockerd is the one its own files would make — the Docker counterpart of
// "workers refuse a stale dist/".
import { createHash } from 'node:crypto';
import { spawn } from 'node:child_process';
import {
  chmodSync,
  closeSync,
  openSync,
  readSync,
  copyFileSync,
  createReadStream,
  existsSync,
  linkSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  readlinkSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
} from 'node:fs';
import { isBuiltin } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { PhantomaError, ERRORS } from '../errors.ts';

/** Where the project lives inside the image (the runtime, dist/, node_modules/, native/ under it). */
export const IMAGE_PROJECT_DIR = '/opt/phantoma';
export const IMAGE_REPO = 'phantoma-worker';

/** The worker's entry in dist/; the packages it (transitively) imports are found from it. */
const WORKER_ENTRY = 'dist/src/ephemeral/worker-main.js';
/** Loaded by node-llama-cpp at run time, not imported by name: the prebuilt CPU binaries. */
const RUNTIME_PACKAGES = ['@node-llama-cpp/linux-x64'] as const;

/** Bare package names the compiled worker imports, following its relative imports through dist/. */
export function workerImports(root: string): string[] {
  const pkgs = new Set<string>();
  const seen = new Set<string>();
  const todo = [join(root, WORKER_ENTRY)];
  const spec = /(?:\bfrom\s*|\bimport\s*\(\s*|\bimport\s+)['"]([^'"]+)['"]/g;
  while (todo.length) {
    const file = todo.pop()!;
    if (seen.has(file)) continue;
    seen.add(file);
    const text = readFileSync(file, 'utf8');
    for (const m of text.matchAll(spec)) {
      const s = m[1]!;
      if (s.startsWith('node:') || isBuiltin(s)) continue;
      if (s.startsWith('.')) {
        const target = resolve(dirname(file), s);
        if (existsSync(target)) todo.push(target);
        continue;
      }
      const parts = s.split('/');
      pkgs.add(s.startsWith('@') ? `${parts[0]}/${parts[1]}` : parts[0]!);
    }
  }
  return [...pkgs].sort();
}

/**
 * Left out of the image: node-llama-cpp's git bundle of the llama.cpp sources (34 MB), used only to build
 * llama.cpp from source, which a worker never does (it runs the prebuilt CPU binaries).
 */
const EXCLUDED = [/^node_modules\/node-llama-cpp\/llama\/gitRelease\.bundle$/];

export type ImageEntry =
  | { kind: 'file'; dest: string; src: string; mode: number; size: number }
  | { kind: 'symlink'; dest: string; target: string };

export interface ImagePlan {
  entries: ImageEntry[];
  files: number;
  bytes: number;
}

function listTree(dir: string, rel: string, out: string[]): void {
  for (const e of readdirSync(join(dir, rel), { withFileTypes: true })) {
    const r = rel ? `${rel}/${e.name}` : e.name;
    if (e.isDirectory()) listTree(dir, r, out);
    else if (e.isFile() || e.isSymbolicLink()) out.push(r);
  }
}

function packageDir(from: string, name: string, root: string): string | undefined {
  for (let d = from; ; d = dirname(d)) {
    const p = join(d, 'node_modules', name);
    if (existsSync(join(p, 'package.json'))) return p;
    if (d === root || d === dirname(d)) return undefined;
  }
}

/** The installed package directories a worker needs: WORKER_PACKAGES and their (optional) dependencies. */
export function workerPackageDirs(root: string): string[] {
  const seen = new Set<string>();
  const visit = (dir: string): void => {
    if (seen.has(dir)) return;
    seen.add(dir);
    const pj = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { dependencies?: Record<string, string>; optionalDependencies?: Record<string, string> };
    for (const dep of Object.keys({ ...pj.dependencies, ...pj.optionalDependencies })) {
      const d = packageDir(dir, dep, root);
      if (d) visit(d); // an optional dependency for another platform is simply not installed
    }
  };
  for (const name of [...workerImports(root), ...RUNTIME_PACKAGES]) {
    const d = packageDir(root, name, root);
    if (!d) throw new PhantomaError(ERRORS.CONFIG_INVALID, `node_modules/${name} is missing: run scripts/setup.sh`);
    visit(d);
  }
  return [...seen].sort();
}

const LIB_DIRS = ['/lib/x86_64-linux-gnu', '/usr/lib/x86_64-linux-gnu', '/lib64', '/usr/lib64', '/lib', '/usr/lib'];

interface ElfDeps {
  interp?: string;
  needed: string[];
  runpath: string[];
}

/** Reads an x86-64 ELF file's interpreter, DT_NEEDED and DT_RUNPATH/DT_RPATH; undefined if not a dynamic ELF64. */
export function readElfDeps(path: string): ElfDeps | undefined {
  const fd = openSync(path, 'r');
  try {
    // Positional reads: the Node binary alone is 126 MB, and only its headers are needed.
    const at = (off: number, len: number): Buffer => {
      const out = Buffer.alloc(len);
      const n = readSync(fd, out, 0, len, off);
      return out.subarray(0, n);
    };
    const h = at(0, 64);
    if (h.length < 64 || h.readUInt32BE(0) !== 0x7f454c46 || h[4] !== 2 || h[5] !== 1) return undefined;
    const phoff = Number(h.readBigUInt64LE(32));
    const phentsize = h.readUInt16LE(54);
    const phnum = h.readUInt16LE(56);
    const ph = at(phoff, phentsize * phnum);
    const loads: Array<{ vaddr: number; offset: number; filesz: number }> = [];
    let dyn: { offset: number; size: number } | undefined;
    let interp: string | undefined;
    for (let i = 0; i < phnum; i++) {
      const o = i * phentsize;
      const type = ph.readUInt32LE(o);
      const offset = Number(ph.readBigUInt64LE(o + 8));
      const vaddr = Number(ph.readBigUInt64LE(o + 16));
      const filesz = Number(ph.readBigUInt64LE(o + 32));
      if (type === 1) loads.push({ vaddr, offset, filesz });
      else if (type === 2) dyn = { offset, size: filesz };
      else if (type === 3) interp = at(offset, filesz).toString('latin1').replace(/\0+$/, '');
    }
    if (!dyn) return undefined;
    const toOffset = (vaddr: number): number => {
      const l = loads.find((x) => vaddr >= x.vaddr && vaddr < x.vaddr + x.filesz);
      if (!l) throw new Error(`${path}: address 0x${vaddr.toString(16)} is in no loaded segment`);
      return vaddr - l.vaddr + l.offset;
    };
    const d = at(dyn.offset, dyn.size);
    let strtab = 0;
    const needed: number[] = [];
    const paths: number[] = [];
    for (let o = 0; o + 16 <= d.length; o += 16) {
      const tag = Number(d.readBigInt64LE(o));
      const val = Number(d.readBigUInt64LE(o + 8));
      if (tag === 0) break;
      if (tag === 1) needed.push(val);
      else if (tag === 5) strtab = toOffset(val);
      else if (tag === 15 || tag === 29) paths.push(val);
    }
    const str = (off: number): string => {
      const chunk = at(strtab + off, 4096);
      const end = chunk.indexOf(0);
      return chunk.toString('latin1', 0, end === -1 ? chunk.length : end);
    };
    const origin = dirname(path);
    return {
      ...(interp ? { interp } : {}),
      needed: needed.map(str),
      runpath: paths.flatMap((p) => str(p).split(':')).filter(Boolean).map((x) => x.replace(/\$\{?ORIGIN\}?/g, origin)),
    };
  } finally {
    closeSync(fd);
  }
}

/**
 * Shared libraries (and the ELF interpreter) that the given binaries load, found as the dynamic loader
 * would on Debian (RUNPATH/RPATH with $ORIGIN, then the multiarch and default directories), recursively.
 * Read from the ELF headers directly: ldd runs the loader on each file, seconds for node-llama-cpp's 15.
 */
export function sharedLibraries(binaries: readonly string[]): string[] {
  const libs = new Set<string>();
  const seen = new Set<string>();
  const todo = [...binaries];
  while (todo.length) {
    const bin = todo.pop()!;
    if (seen.has(bin)) continue;
    seen.add(bin);
    const deps = readElfDeps(bin);
    if (!deps) continue;
    if (deps.interp) libs.add(deps.interp);
    for (const name of deps.needed) {
      const found = name.includes('/') ? name : [...deps.runpath, ...LIB_DIRS].map((d) => join(d, name)).find((p) => existsSync(p));
      if (!found) throw new PhantomaError(ERRORS.CONFIG_INVALID, `${bin} needs ${name}, which this host does not have`);
      libs.add(found);
      todo.push(found);
    }
  }
  return [...libs].sort();
}

/**
 * A host path as the image needs it: every symlink met along the way becomes a symlink entry (Debian's
 * merged /usr: /lib -> usr/lib, /lib64/ld-linux… -> /lib/x86_64-linux-gnu/…), the final file a file entry.
 */
function addHostPath(path: string, add: (e: ImageEntry) => void, depth = 0): void {
  if (depth > 16) throw new Error(`too many symlinks resolving ${path}`);
  const parts = path.split('/').filter(Boolean);
  let cur = '';
  for (let i = 0; i < parts.length; i++) {
    cur += '/' + parts[i];
    const st = lstatSync(cur);
    if (st.isSymbolicLink()) {
      const target = readlinkSync(cur);
      add({ kind: 'symlink', dest: cur, target });
      const resolved = resolve(dirname(cur), target);
      return addHostPath([resolved, ...parts.slice(i + 1)].join('/'), add, depth + 1);
    }
  }
  const st = statSync(cur);
  add({ kind: 'file', dest: cur, src: cur, mode: st.mode & 0o755, size: st.size });
}

/** Everything the image holds, sorted by destination path. */
export function planWorkerImage(root: string): ImagePlan {
  const byDest = new Map<string, ImageEntry>();
  const add = (e: ImageEntry): void => {
    if (!byDest.has(e.dest)) byDest.set(e.dest, e);
  };
  const addProjectFile = (rel: string): void => {
    if (EXCLUDED.some((re) => re.test(rel))) return;
    const src = join(root, rel);
    const st = lstatSync(src);
    const dest = `${IMAGE_PROJECT_DIR}/${rel}`;
    if (st.isSymbolicLink()) {
      const target = readlinkSync(src);
      // A link that leaves the project (none expected) would name a path the image does not have.
      if (isAbsolute(target) || relative(root, resolve(dirname(src), target)).startsWith('..')) {
        const real = realpathSync(src);
        add({ kind: 'file', dest, src: real, mode: statSync(real).mode & 0o755, size: statSync(real).size });
      } else add({ kind: 'symlink', dest, target });
      return;
    }
    add({ kind: 'file', dest, src, mode: st.mode & 0o755, size: st.size });
  };

  const node = join(root, '.runtime', 'bin', 'node');
  if (!existsSync(node)) throw new PhantomaError(ERRORS.CONFIG_INVALID, `${node} is missing: run scripts/setup.sh`);
  if (!existsSync(join(root, 'dist', '.build-stamp'))) throw new PhantomaError(ERRORS.CONFIG_INVALID, 'dist/ is missing: run scripts/build.sh');
  addProjectFile('.runtime/bin/node');
  addProjectFile('package.json');
  const distFiles: string[] = [];
  listTree(root, 'dist', distFiles);
  for (const f of distFiles) addProjectFile(f);
  for (const dir of workerPackageDirs(root)) {
    const files: string[] = [];
    listTree(root, relative(root, dir), files);
    for (const f of files) addProjectFile(f);
  }
  for (const f of ['native/addon/build/phantoma_native.node', 'native/threadpool/build/libphantoma_threadpool.so']) {
    if (!existsSync(join(root, f))) throw new PhantomaError(ERRORS.CONFIG_INVALID, `${f} is missing: run scripts/setup.sh`);
    addProjectFile(f);
  }
  const binaries = [...byDest.values()].filter((e): e is Extract<ImageEntry, { kind: 'file' }> => e.kind === 'file' && (e.dest.endsWith('/bin/node') || /\.(node|so)(\.\d+)*$/.test(e.dest))).map((e) => e.src);
  // Libraries found next to the binaries (node-llama-cpp's, through their $ORIGIN rpath) are in already.
  const inProject = (p: string): boolean => !relative(root, p).startsWith('..');
  for (const lib of sharedLibraries(binaries)) if (!inProject(lib) && !inProject(realpathSync(lib))) addHostPath(lib, add);

  const entries = [...byDest.values()].sort((a, b) => (a.dest < b.dest ? -1 : a.dest > b.dest ? 1 : 0));
  let bytes = 0;
  let files = 0;
  for (const e of entries) if (e.kind === 'file') (files++, (bytes += e.size));
  return { entries, files, bytes };
}

/**
 * The image's content digest: each entry's path, kind, mode and content hash (or link target), in order.
 * Reads every file once (≈ 200 MB, well under a second on this machine).
 */
export async function imageDigest(plan: ImagePlan, onBytes?: (n: number) => void): Promise<string> {
  const h = createHash('sha256');
  h.update('phantoma-worker-image v1\n');
  for (const e of plan.entries) {
    if (e.kind === 'symlink') {
      h.update(`L ${e.dest} ${e.target}\n`);
      continue;
    }
    const fh = createHash('sha256');
    if (e.size < 8 << 20) fh.update(readFileSync(e.src));
    else for await (const chunk of createReadStream(e.src, { highWaterMark: 4 << 20 })) fh.update(chunk as Buffer);
    onBytes?.(e.size);
    h.update(`F ${e.dest} ${(e.mode & 0o111 ? 0o755 : 0o644).toString(8)} ${fh.digest('hex')}\n`);
  }
  return h.digest('hex');
}

export function imageTag(digest: string): string {
  return `${IMAGE_REPO}:${digest.slice(0, 16)}`;
}

/**
 * Writes the image as a tarball (deterministic: sorted, mtime 0, owner root, files 0644/0755) to `out`.
 * The files are hard-linked (copied across filesystems) into a staging tree that GNU tar archives.
 */
export async function writeImageTar(plan: ImagePlan, out: string): Promise<void> {
  const staging = mkdtempSync(join(tmpdir(), 'phantoma-image-'));
  try {
    const tree = join(staging, 'root');
    mkdirSync(tree, { mode: 0o755 });
    chmodSync(tree, 0o755);
    for (const e of plan.entries) {
      const dest = join(tree, e.dest);
      mkdirSync(dirname(dest), { recursive: true, mode: 0o755 });
      if (e.kind === 'symlink') symlinkSync(e.target, dest);
      else {
        try {
          linkSync(e.src, dest);
        } catch {
          copyFileSync(e.src, dest);
        }
      }
    }
    // The worker's mount points: its scratch tmpfs and the model directory (read-only bind).
    for (const d of ['scratch', 'model', 'tmp', 'proc', 'sys', 'dev', 'etc']) mkdirSync(join(tree, d), { recursive: true, mode: 0o755 });
    const tmpOut = `${out}.${process.pid}.tmp`;
    mkdirSync(dirname(out), { recursive: true });
    await new Promise<void>((res, rej) => {
      const tar = spawn(
        'tar',
        ['--sort=name', '--mtime=@0', '--owner=0', '--group=0', '--numeric-owner', '--format=gnu', '--hard-dereference', '--mode=u+rw,go+rX,go-w', '-C', tree, '-cf', tmpOut, '.'],
        { stdio: ['ignore', 'ignore', 'pipe'] },
      );
      let err = '';
      tar.stderr.on('data', (c: Buffer) => (err += c.toString('utf8')));
      tar.on('error', rej);
      tar.on('close', (code) => (code === 0 ? res() : rej(new Error(`tar exited ${code}: ${err.slice(0, 500)}`))));
    });
    renameSync(tmpOut, out);
  } finally {
    rmSync(staging, { recursive: true, force: true });
  }
}

export interface ImportProgress {
  sent: number;
  total: number;
}

/** `docker import` of the tarball into the dockerd behind `docker`, tagged `tag`; resolves once dockerd has it. */
export async function importImageTar(docker: import('dockerode'), tarPath: string, tag: string, onProgress?: (p: ImportProgress) => void): Promise<void> {
  const total = statSync(tarPath).size;
  let sent = 0;
  const file = createReadStream(tarPath, { highWaterMark: 1 << 20 });
  file.on('data', (c) => {
    sent += (c as Buffer).length;
    onProgress?.({ sent, total });
  });
  const colon = tag.lastIndexOf(':');
  const stream = await docker.importImage(file, { repo: tag.slice(0, colon), tag: tag.slice(colon + 1) });
  await new Promise<void>((res, rej) => {
    docker.modem.followProgress(stream, (err: Error | null, out: Array<{ error?: string }>) => {
      const failed = err ?? out.find((o) => o.error);
      if (failed) rej(new PhantomaError(ERRORS.DOCKER_IMAGE_MISSING, `dockerd refused the worker image: ${err ? err.message : (failed as { error: string }).error}`));
      else res();
    });
  });
}

/** True when dockerd has the image `tag`; false on 404; other errors propagate. */
export async function hasImage(docker: import('dockerode'), tag: string): Promise<boolean> {
  try {
    await docker.getImage(tag).inspect();
    return true;
  } catch (err) {
    if ((err as { statusCode?: number }).statusCode === 404) return false;
    throw err;
  }
}
