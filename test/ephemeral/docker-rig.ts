// A private dockerd for one test file: Debian's /usr/sbin/dockerd with no iptables, no IP forwarding and
// no bridge, its own data-root, exec-root, pidfile and unix socket in a temp dir, so the host's network
// and any other Docker state are untouched. The worker image is imported into it from a tarball cached
// under /var/cache/phantoma-test/ by content digest (building the tarball is the slow part). stop() ends
// dockerd (and the containerd it started), unmounts what it left and removes the temp dir; a process
// 'exit' hook does the same synchronously if the test dies first.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Docker from 'dockerode';
import { ROOT } from '../helpers.ts';
import { hasImage, imageDigest, imageTag, importImageTar, planWorkerImage, writeImageTar } from '../../src/ephemeral/docker-image.ts';

export const DOCKERD = '/usr/sbin/dockerd';
export const IMAGE_CACHE = '/var/cache/phantoma-test';

export interface TestDockerd {
  dir: string;
  socketPath: string;
  dataRoot: string;
  docker: Docker;
  pid: number;
  /** The worker image tag (phantoma-worker:<digest>), imported. */
  image: string;
  logText(): string;
  stop(): Promise<void>;
}

/** The worker image tarball for the current files, from the cache or built into it. */
export async function cachedImageTar(): Promise<{ tar: string; tag: string }> {
  const plan = planWorkerImage(ROOT);
  mkdirSync(IMAGE_CACHE, { recursive: true, mode: 0o700 });
  // Hashing ≈ 170 MB takes seconds on a busy machine: the digest is remembered by a key over every
  // file's path, size and mtime (a changed file changes its mtime), the way scripts/build.sh trusts mtimes.
  const statKey = createHash('sha256');
  for (const e of plan.entries) statKey.update(e.kind === 'file' ? `${e.dest}\0${e.src}\0${e.size}\0${statSync(e.src).mtimeMs}\n` : `${e.dest}\0${e.target}\n`);
  const memo = join(IMAGE_CACHE, `digest-${statKey.digest('hex').slice(0, 32)}`);
  let digest = existsSync(memo) ? readFileSync(memo, 'utf8').trim() : '';
  if (!/^[0-9a-f]{64}$/.test(digest)) {
    digest = await imageDigest(plan);
    for (const f of readdirSync(IMAGE_CACHE)) if (f.startsWith('digest-')) rmSync(join(IMAGE_CACHE, f), { force: true });
    writeFileSync(memo, digest + '\n');
  }
  const tar = join(IMAGE_CACHE, `worker-image-${digest.slice(0, 32)}.tar`);
  if (!existsSync(tar)) {
    await writeImageTar(plan, tar);
    // Older images (an earlier dist/) are never needed again.
    for (const f of readdirSync(IMAGE_CACHE)) if (/^worker-image-[0-9a-f]+\.tar$/.test(f) && join(IMAGE_CACHE, f) !== tar) rmSync(join(IMAGE_CACHE, f), { force: true });
  }
  return { tar, tag: imageTag(digest) };
}

function mountsUnder(dir: string): string[] {
  const out: string[] = [];
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const mp = line.split(' ')[4]?.replace(/\\040/g, ' ');
    if (mp && (mp === dir || mp.startsWith(dir + '/'))) out.push(mp);
  }
  // Deepest first.
  return out.sort((a, b) => b.length - a.length);
}

function pidsMentioning(dir: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${name}/cmdline`, 'utf8').includes(dir)) out.push(Number(name));
    } catch {
      /* gone */
    }
  }
  return out;
}

function killAll(pids: number[]): void {
  for (const p of pids) {
    try {
      process.kill(p, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
}

/** Synchronous last resort: kill what runs from `dir`, unmount what is mounted under it, remove it. */
function forceCleanup(dir: string): void {
  killAll(pidsMentioning(dir));
  for (const mp of mountsUnder(dir)) {
    try {
      execFileSync('umount', ['-l', mp], { stdio: 'ignore' });
    } catch {
      /* already gone */
    }
  }
  rmSync(dir, { recursive: true, force: true });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * Clones a template data-root: every file of an image layer (overlay2/<id>/diff/) hard-linked — layers are
 * read-only to dockerd and overlayfs, and a container's writes go to its own upper dir — and everything else
 * (dockerd's and containerd's databases, which are rewritten in place) copied.
 */
function cloneDataRoot(template: string, dest: string): void {
  execFileSync('cp', ['-al', template, dest], { stdio: 'ignore' });
  const walk = (rel: string): void => {
    for (const e of readdirSync(join(dest, rel), { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) {
        if (!/^overlay2\/[^/]+\/diff$/.test(r)) walk(r);
      } else if (e.isFile()) {
        const p = join(dest, r);
        copyFileSync(p, `${p}.phd-copy`);
        const st = statSync(p);
        chmodSync(`${p}.phd-copy`, st.mode & 0o7777);
        renameSync(`${p}.phd-copy`, p);
      }
    }
  };
  walk('');
}

/** A running private dockerd; `seed` is a template data-root to clone (see cloneDataRoot). */
async function launch(seed: string | undefined): Promise<TestDockerd & { stopKeeping(): Promise<boolean> }> {
  if (!existsSync(DOCKERD)) throw new Error(`${DOCKERD} is missing: run scripts/setup.sh (Debian's docker.io)`);
  // Short: unix socket paths (dockerd's, containerd's under the exec-root) are limited to 108 bytes.
  const dir = mkdtempSync(join(tmpdir(), 'phd-'));
  const socketPath = join(dir, 'docker.sock');
  const dataRoot = join(dir, 'data');
  const execRoot = join(dir, 'exec');
  const logPath = join(dir, 'dockerd.log');
  const onExit = (): void => forceCleanup(dir);
  process.once('exit', onExit);
  // tap's timeout sends SIGTERM, which skips 'exit' hooks unless something exits on it.
  const onTerm = (): void => process.exit(143);
  process.once('SIGTERM', onTerm);
  if (seed) cloneDataRoot(seed, dataRoot);
  const logFd = openSync(logPath, 'a', 0o600);
  const proc: ChildProcess = spawn(
    DOCKERD,
    [
      '--iptables=false',
      '--ip-forward=false',
      '--ip-masq=false',
      '--bridge=none',
      '--userland-proxy=false',
      '--data-root', dataRoot,
      '--exec-root', execRoot,
      '--pidfile', join(dir, 'dockerd.pid'),
      '-H', `unix://${socketPath}`,
      '--storage-driver', 'overlay2',
      '--log-driver', 'none',
    ],
    { stdio: ['ignore', logFd, logFd], env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin' } },
  );
  closeSync(logFd);
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  const logText = (): string => (existsSync(logPath) ? readFileSync(logPath, 'utf8') : '');
  const docker = new Docker({ socketPath });
  const shutdown = async (): Promise<boolean> => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      const inTime = await Promise.race([exited.then(() => true), sleep(20_000).then(() => false)]);
      if (!inTime) proc.kill('SIGKILL');
      await Promise.race([exited, sleep(5_000)]);
      return inTime;
    }
    return false;
  };
  const finish = (): void => {
    forceCleanup(dir);
    process.removeListener('exit', onExit);
    process.removeListener('SIGTERM', onTerm);
  };
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    (stopped ??= (async () => {
      await shutdown();
      finish();
    })());
  try {
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (proc.exitCode !== null) throw new Error(`dockerd exited ${proc.exitCode}: ${logText().slice(-2000)}`);
      if (existsSync(socketPath)) {
        try {
          await docker.ping();
          break;
        } catch {
          /* not yet */
        }
      }
      if (Date.now() > deadline) throw new Error(`dockerd did not answer within 30 s: ${logText().slice(-2000)}`);
      await sleep(100);
    }
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    dir,
    socketPath,
    dataRoot,
    docker,
    pid: proc.pid!,
    image: '',
    logText,
    stop,
    /** Clean shutdown that leaves the data-root in place (for a template); true when it is reusable. */
    async stopKeeping() {
      const clean = await shutdown();
      return clean && mountsUnder(dataRoot).length === 0 && pidsMentioning(dir).length === 0;
    },
  };
}

/**
 * A private dockerd, by default with the worker image. The image comes from a template data-root cached
 * under IMAGE_CACHE by the image digest (made once: a dockerd imports the tarball, stops, and its
 * data-root becomes the template), cloned in well under a second instead of a ≈ 7 s import.
 */
export async function startTestDockerd(opts: { image?: boolean } = {}): Promise<TestDockerd> {
  if (opts.image === false) return launch(undefined);
  const { tar, tag } = await cachedImageTar();
  const template = join(IMAGE_CACHE, `dockerd-${tar.replace(/^.*worker-image-([0-9a-f]+)\.tar$/, '$1')}`);
  if (!existsSync(template)) {
    const maker = await launch(undefined);
    try {
      await importImageTar(maker.docker, tar, tag);
    } catch (err) {
      await maker.stop();
      throw err;
    }
    if (await maker.stopKeeping()) {
      const tmp = `${template}.${process.pid}.tmp`;
      rmSync(tmp, { recursive: true, force: true });
      renameSync(maker.dataRoot, tmp);
      try {
        renameSync(tmp, template);
      } catch {
        rmSync(tmp, { recursive: true, force: true }); // another test made it first
      }
      for (const f of readdirSync(IMAGE_CACHE)) if (/^dockerd-[0-9a-f]+$/.test(f) && join(IMAGE_CACHE, f) !== template) rmSync(join(IMAGE_CACHE, f), { recursive: true, force: true });
    }
    await maker.stop();
  }
  const d = existsSync(template) ? await launch(template) : await launch(undefined);
  try {
    if (!(await hasImage(d.docker, tag))) await importImageTar(d.docker, tar, tag);
  } catch (err) {
    await d.stop();
    throw err;
  }
  d.image = tag;
  return d;
}

/** Bytes used by a directory tree (for reporting). */
export function treeBytes(dir: string): number {
  let n = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) n += treeBytes(p);
    else if (e.isFile()) n += statSync(p).size;
  }
  return n;
}
