// A private dockerd for one test file: Debian's /usr/sbin/dockerd with no iptables, no IP forwarding and
// no bridge, its own data-root, exec-root, pidfile and unix socket in a temp dir, so the host's network
// and any other Docker state are untouched. The worker image is imported into it from a tarball cached
// under /var/cache/phantoma-test/ by content digest (building the tarball is the slow part). stop() ends
// dockerd (and the containerd it started), unmounts what it left and removes the temp dir; a process
// 'exit' hook does the same synchronously if the test dies first.
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
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
  const digest = await imageDigest(plan);
  mkdirSync(IMAGE_CACHE, { recursive: true, mode: 0o700 });
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

export async function startTestDockerd(opts: { image?: boolean } = {}): Promise<TestDockerd> {
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
  let stopped: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    (stopped ??= (async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGTERM');
        const inTime = await Promise.race([exited.then(() => true), sleep(20_000).then(() => false)]);
        if (!inTime) proc.kill('SIGKILL');
        await Promise.race([exited, sleep(5_000)]);
      }
      forceCleanup(dir);
      process.removeListener('exit', onExit);
      process.removeListener('SIGTERM', onTerm);
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
    let image = '';
    if (opts.image !== false) {
      const { tar, tag } = await cachedImageTar();
      if (!(await hasImage(docker, tag))) await importImageTar(docker, tar, tag);
      image = tag;
    }
    return { dir, socketPath, dataRoot, docker, pid: proc.pid!, image, logText, stop };
  } catch (err) {
    await stop();
    throw err;
  }
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
