// A signed test release for the Ansible test (issue 14), built through the real code and cached.
//
// What the roles get: the release tarball (src/release/build.ts, the node's paths plus control-plane/,
// which the control-plane role installs from the same signed tarball), a TUF root (src/release/repo.ts
// initRepo: 3 maintainers, threshold 2), two maintainers' Sigstore bundles over the tarball (signBundle),
// and the verifier kit (deploy/ansible/tools/make-verifier-kit.ts) with its sha256. The role verifies the
// tarball on the target with that kit before unpacking it — the same checks as a production install.
//
// Building the tarball takes ~2 minutes here (12,000+ files, gzip -9), so the result is cached under
// /var/cache/phantoma-test/ansible-release-<key>/, key = sha256 of every input file's path and content
// (tracked and untracked, not ignored: bin/ src/ control-plane/ native/ deploy/ansible/tools/, package
// files, the runtime's version) — dist/, node_modules/, .runtime/ and native builds derive from those.
// Only the newest entry is kept. The keys are throwaway test keys made per cache entry.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { buildRelease, RELEASE_PATHS } from '../../src/release/build.ts';
import { initRepo, signBundle } from '../../src/release/repo.ts';
import { generateKey, publicPart } from '../../src/updates/keys.ts';
import { makeVerifierKit } from '../../deploy/ansible/tools/make-verifier-kit.ts';

export const CACHE_DIR = '/var/cache/phantoma-test';
export const CHECKOUT = resolve(import.meta.dirname, '../..');
const INPUTS = ['tsconfig.json', 'tsconfig.build.json', 'bin', 'src', 'control-plane', 'native', 'deploy/ansible/tools', 'package.json', 'package-lock.json', 'scripts/versions.sh', 'scripts/build.sh'];

/** What a node cannot start without; a stage missing one of them is a broken checkout, not a release. */
const REQUIRED = ['.runtime/bin/node', 'dist/src/ephemeral/worker-main.js', 'native/warden/build/phantoma-warden', 'native/threadpool/build/libphantoma_threadpool.so', 'control-plane/bin/phantoma-cp'];

export interface TestRelease {
  dir: string;
  version: string;
  tarball: string;
  trustedRoot: string;
  bundles: string[];
  kit: string;
  kitSha256: string;
  /** true when this call built it (cold), false when it came from the cache. */
  built: boolean;
  buildMs: number;
}

/** sha256 over the release inputs' paths and contents (a missing tracked file counts as missing). */
export function releaseInputKey(root: string = CHECKOUT): string {
  const list = execFileSync('git', ['-C', root, 'ls-files', '-z', '-c', '-o', '--exclude-standard', '--', ...INPUTS], { encoding: 'utf8', maxBuffer: 64 << 20 })
    .split('\0')
    .filter(Boolean);
  const h = createHash('sha256');
  for (const p of [...new Set(list)].sort()) {
    h.update(p + '\0');
    try {
      h.update(readFileSync(join(root, p)));
    } catch {
      h.update('\0missing\0');
    }
    h.update('\0');
  }
  h.update(JSON.stringify(RELEASE_PATHS));
  return h.digest('hex').slice(0, 20);
}

function gitHead(): string | null {
  try {
    return execFileSync('git', ['-C', CHECKOUT, 'rev-parse', 'HEAD'], { encoding: 'utf8' }).trim();
  } catch {
    return null;
  }
}

function readInfo(dir: string): TestRelease | undefined {
  try {
    return { ...(JSON.parse(readFileSync(join(dir, 'release.json'), 'utf8')) as TestRelease), built: false };
  } catch {
    return undefined;
  }
}

export async function ensureTestRelease(log: (s: string) => void = () => {}): Promise<TestRelease> {
  const key = releaseInputKey();
  const dir = join(CACHE_DIR, `ansible-release-${key}`);
  const cached = readInfo(dir);
  if (cached) return cached;
  mkdirSync(CACHE_DIR, { recursive: true });
  const tmp = join(CACHE_DIR, `.ansible-release-${key}-${process.pid}`);
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(join(tmp, 'bundles'), { recursive: true });
  const started = Date.now();
  try {
    const version = (JSON.parse(readFileSync(join(CHECKOUT, 'package.json'), 'utf8')) as { version: string }).version;
    const tarball = join(tmp, `phantoma-${version}.tar.gz`);
    log(`building the test release ${version} (inputs ${key}); cached afterwards`);
    // Built from a copy: a concurrent build here (dist/, the warden) rewriting a file between the builder's
    // hashing and packing made a tarball that did not match its own manifest (the verifier refused it).
    const stage = join(tmp, 'stage');
    mkdirSync(join(stage, 'deploy/ansible'), { recursive: true });
    const copy = [...RELEASE_PATHS, 'node_modules', 'deploy/ansible/tools'].filter((p) => existsSync(join(CHECKOUT, p)));
    for (const p of copy) {
      mkdirSync(join(stage, p, '..'), { recursive: true });
      execFileSync('cp', ['-a', join(CHECKOUT, p), join(stage, p)], { stdio: 'ignore' });
    }
    // dist/ compiled here from the staged src/ (as scripts/build.sh does), so the two agree.
    for (const f of ['tsconfig.json', 'tsconfig.build.json']) copyFileSync(join(CHECKOUT, f), join(stage, f));
    rmSync(join(stage, 'dist'), { recursive: true, force: true });
    execFileSync(join(stage, 'node_modules/.bin/tsc'), ['-p', 'tsconfig.build.json', '--outDir', 'dist', '--noCheck'], { cwd: stage, stdio: 'ignore', timeout: 300_000 });
    for (const f of REQUIRED) if (!existsSync(join(stage, f))) throw new Error(`the staged release lacks ${f} (run scripts/setup.sh)`);
    await buildRelease({ root: stage, out: tarball, version, paths: [...RELEASE_PATHS], commit: gitHead() });
    const rootKey = generateKey('root');
    const maintainers = [generateKey('alice'), generateKey('bob'), generateKey('carol')];
    const repo = join(tmp, 'repo');
    const { rootPath } = initRepo({ dir: repo, rootKeys: [rootKey], rootThreshold: 1, maintainers: maintainers.map(publicPart), threshold: 2, snapshotKey: publicPart(generateKey('snapshot')), timestampKey: publicPart(generateKey('timestamp')) });
    const trustedRoot = join(tmp, 'root.json');
    writeFileSync(trustedRoot, readFileSync(rootPath));
    const bundles: string[] = [];
    for (const m of maintainers.slice(0, 2)) {
      const p = join(tmp, 'bundles', `${m.name}.sigstore.json`);
      writeFileSync(p, JSON.stringify(await signBundle(tarball, m)) + '\n');
      bundles.push(p);
    }
    // A bundle from a key the root does not know, for the refusal test.
    const stranger = join(tmp, 'bundles', 'mallory.sigstore.json');
    writeFileSync(stranger, JSON.stringify(await signBundle(tarball, generateKey('mallory'))) + '\n');
    const kit = await makeVerifierKit(stage, join(tmp, 'verifier-kit.tar'));
    rmSync(repo, { recursive: true, force: true });
    rmSync(stage, { recursive: true, force: true });
    const final = (p: string): string => join(dir, p.slice(tmp.length + 1));
    const info: TestRelease = { dir, version, tarball: final(tarball), trustedRoot: final(trustedRoot), bundles: bundles.map(final), kit: final(kit.path), kitSha256: kit.sha256, built: true, buildMs: Date.now() - started };
    writeFileSync(join(tmp, 'release.json'), JSON.stringify(info, null, 1) + '\n');
    renameSync(tmp, dir);
    for (const n of readdirSync(CACHE_DIR)) {
      if (n.startsWith('ansible-release-') && n !== `ansible-release-${key}`) rmSync(join(CACHE_DIR, n), { recursive: true, force: true });
    }
    log(`test release ready in ${Math.round(info.buildMs / 1000)} s: ${dir}`);
    return info;
  } catch (err) {
    rmSync(tmp, { recursive: true, force: true });
    if (existsSync(join(dir, 'release.json'))) return readInfo(dir)!;
    throw err;
  }
}
