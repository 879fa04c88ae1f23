// A booted Debian 12 container for tests (issue 13; reused by the Ansible tests of issue 14).
//
// API (other test files import exactly these names):
//   ensureRootfs(extraPackages?)  → path of the cached base root filesystem: `debootstrap --variant=minbase
//       bookworm` plus BASE_PACKAGES (+ extraPackages), under /var/cache/phantoma-test/rootfs-<sha256 of the
//       sorted package list, suite and mirror>/. Built into a temporary directory next to it and renamed into
//       place (atomic); concurrent callers wait on a lock directory (bounded, a dead holder's lock is taken
//       over). Treat it as read-only: bootContainer copies it.
//   bootContainer({name?, binds?, extraArgs?, rootfs?}) → Container. Copies the base (cp --reflink=auto -a;
//       0.7 s for ~300 MB here, ext4 has no reflink) into /var/tmp/phantoma-nspawn/<name>/root, boots it with
//       `systemd-nspawn -b --keep-unit --register=no --private-network --capability=all
//       --system-call-filter='bpf perf_event_open' --link-journal=no` (under `setpriv --pdeathsig TERM`: if
//       the test process dies, the container powers off), finds the container's PID 1 (the `leader`), waits
//       (bounded, 120 s) until `systemctl is-system-running` answers running or degraded, then makes the
//       v1 memory/pids mounts writable and mounts bpffs (below). Boot ≈ 2-8 s here.
//   Container.exec(cmd, {input?, timeoutMs?, env?}) → {code, stdout, stderr}: runs `nsenter --target <leader>
//       --all -- env -i PATH=… LANG=C.UTF-8 [env…] cmd…` (a clean environment; nothing from the test process);
//       a command past its timeout is SIGKILLed with its process group and reported with code 124.
//   Container.systemctl(...args), Container.journal(unit, extraArgs?) (journalctl -u unit -b --no-pager,
//       `-o short-monotonic` unless extraArgs name an output), Container.stop() (SIGTERM to nspawn = clean
//       poweroff, bounded 30 s; then SIGKILL of everything left in the container's cgroups; its cgroups and
//       writable copy are removed). stop() is idempotent; a test process that exits without calling it
//       SIGKILLs its containers (exit hook), and the next bootContainer removes stale copies of dead rigs.
//   The systemd test's release snapshot (a copy of this checkout that concurrent edits cannot make stale)
//   is releaseSnapshot()/releaseBinds() in test/deploy/systemd-rig.ts.
//   writeChrootWrapper(c, path): an executable `nsenter --target <leader> --all --` wrapper for Ansible's
//       community.general.chroot connection (ansible_chroot_exe=<path>, ansible_host=<c.root>). The chroot
//       plugin runs `<exe> <dir> <shell> -c <cmd>` and puts files with `dd of=…` through the same command,
//       so the wrapper drops <dir> and runs the rest inside the container's namespaces.
//
// How a release gets in: the container has no network (`--private-network`: only `lo`). Tests bind-mount
// what they need (binds: [{host, container, readOnly}] → --bind / --bind-ro), e.g. the built checkout
// (.runtime/, node_modules/, dist/, native builds, .cache/models) read-only at /opt/phantoma-src, or copy
// files into `c.root` from the host before/after boot (c.root is the container's `/` seen from the host).
//
// What this host needed (hybrid cgroup v1/v2 host, PID 1 not systemd; see docs/architecture.md "systemd"):
// - --capability=all: nspawn's default bounding set lacks CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE..., which
//   the warden unit needs (its own CapabilityBoundingSet= then narrows it).
// - --system-call-filter=bpf perf_event_open: nspawn's own seccomp allow list (inherited by everything in
//   the container) has neither, whatever the capabilities: without it the warden's first bpf() is EPERM
//   ("libbpf: Error in bpf_object__probe_loading(): Operation not permitted").
// - Each container runs in its own cgroup (v2 `unified`, name=systemd, and the v1 memory and pids
//   hierarchies: /…/phantoma-nspawn-<name>), joined by the launching shell before it execs nspawn. Without
//   that, nspawn on a host whose PID 1 is not systemd puts every container in /payload + /supervisor of the
//   caller's cgroup, so two rigs at once would share one tree. The container's cgroup namespace is rooted
//   there.
// - nspawn mounts the v1 controller hierarchies read-only inside the container (without user namespaces),
//   so the warden could not set per-worker memory/pids limits (v1 on this host: v2 has only hugetlb). After
//   boot the rig remounts the container's memory and pids mounts read-write (inside its mount namespace;
//   their root is the container's own cgroup, so nothing outside it can be touched). Option
//   `writableV1: false` skips that.
// - bpffs is not mounted by nspawn (nor by systemd inside a container); the rig mounts a fresh instance on
//   /sys/fs/bpf after boot, as PID 1 does on a host, so units see it (the warden pins there). nspawn's /sys
//   is a read-only tmpfs with sysfs subtrees bound in, without fs/bpf: the rig remounts it rw for the
//   mkdir and read-only again.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, rmdirSync, statSync, writeFileSync, chmodSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { processExists } from '../../src/util/process.ts';

export const CACHE_DIR = '/var/cache/phantoma-test';
export const RIG_DIR = '/var/tmp/phantoma-nspawn';
export const SUITE = 'bookworm';
export const MIRROR = 'http://deb.debian.org/debian';
/** The base package list (minbase adds the essentials: coreutils, passwd (useradd), apt, util-linux...). */
export const BASE_PACKAGES: readonly string[] = [
  'systemd', 'systemd-sysv', 'dbus', 'python3', 'python3-apt', 'procps',
  // capsh/setpriv for checking capability sets; ip for looking at the container's network
  'libcap2-bin', 'iproute2',
  // shared libraries of the warden (libbpf, libelf, zlib); Node and llama.cpp need libstdc++ (in minbase via apt)
  'libbpf1', 'libelf1', 'zlib1g',
];

export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface ExecOptions {
  input?: string;
  timeoutMs?: number;
  /** Extra environment (NAME=value) for the command; the environment is otherwise clean. */
  env?: Record<string, string>;
}

export interface Container {
  name: string;
  /** The container's root directory as seen from the host. */
  root: string;
  /** Host pid of the container's PID 1 (systemd). */
  leader: number;
  exec(cmd: string[], opts?: ExecOptions): Promise<ExecResult>;
  systemctl(...args: string[]): Promise<ExecResult>;
  journal(unit: string, extraArgs?: string[]): Promise<string>;
  stop(): Promise<void>;
}

export interface Bind {
  host: string;
  container: string;
  readOnly?: boolean;
}

export interface BootOptions {
  name?: string;
  binds?: Bind[];
  /** More systemd-nspawn arguments (before -b). */
  extraArgs?: string[];
  /** Another base root filesystem (from ensureRootfs(extra)); default ensureRootfs(). */
  rootfs?: string;
  /** Remount the container's v1 memory and pids hierarchies read-write after boot (default true). */
  writableV1?: boolean;
  /** Bound on boot until `systemctl is-system-running` answers running/degraded (default 120 s). */
  bootTimeoutMs?: number;
}

/** Resolves true when p settles within ms, false otherwise; the timer never keeps the process alive. */
function within(p: Promise<unknown>, ms: number): Promise<boolean> {
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), ms);
    t.unref();
    void p.then(() => {
      clearTimeout(t);
      resolve(true);
    });
  });
}

const log = (msg: string): void => {
  process.stderr.write(`[nspawn] ${msg}\n`);
};

/** The pid a process recorded in `dir/file` (0 when none or unreadable) and `dir`'s age; undefined once `dir` is gone. */
function recordedOwner(dir: string, file: string): { pid: number; ageMs: number } | undefined {
  let pid = 0;
  try {
    pid = Number(readFileSync(join(dir, file), 'utf8'));
  } catch {
    /* none yet, or being written */
  }
  try {
    return { pid, ageMs: Date.now() - statSync(dir).mtimeMs };
  } catch {
    return undefined;
  }
}

function run(file: string, args: string[], opts: { input?: string; timeoutMs?: number } = {}): Promise<ExecResult> {
  return new Promise((resolve) => {
    const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'], detached: true });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.stdin.on('error', () => {});
    child.stdin.end(opts.input ?? '');
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        child.kill('SIGKILL');
      }
    }, opts.timeoutMs ?? 60_000);
    child.on('error', (err) => {
      clearTimeout(timer);
      resolve({ code: 127, stdout, stderr: stderr + String(err) });
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: timedOut ? 124 : (code ?? (signal ? 128 : 1)), stdout, stderr: timedOut ? `${stderr}\n[timed out after ${opts.timeoutMs ?? 60_000} ms]` : stderr });
    });
  });
}

// ---------------------------------------------------------------- root filesystem

export function rootfsKey(packages: readonly string[]): string {
  const list = [...new Set(packages)].sort();
  return createHash('sha256').update(JSON.stringify({ suite: SUITE, variant: 'minbase', mirror: MIRROR, packages: list, rev: 1 })).digest('hex').slice(0, 16);
}

/** The cached base root filesystem (built once per package list; ~50 s cold). */
export async function ensureRootfs(extraPackages: readonly string[] = []): Promise<string> {
  const packages = [...new Set([...BASE_PACKAGES, ...extraPackages])].sort();
  const key = rootfsKey(packages);
  const dir = join(CACHE_DIR, `rootfs-${key}`);
  const ready = (): boolean => existsSync(join(dir, '.phantoma-rootfs'));
  if (ready()) return dir;
  mkdirSync(CACHE_DIR, { recursive: true, mode: 0o755 });
  const lock = join(CACHE_DIR, `rootfs-${key}.lock`);
  const deadline = Date.now() + 15 * 60_000;
  for (;;) {
    if (ready()) return dir;
    try {
      mkdirSync(lock);
      writeFileSync(join(lock, 'pid'), String(process.pid));
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const owner = recordedOwner(lock, 'pid');
      if (!owner) continue;
      const holder = owner.pid;
      if ((holder > 0 && !processExists(holder)) || (holder === 0 && owner.ageMs > 30_000)) {
        log(`taking over a stale rootfs lock (pid ${holder || 'unknown'})`);
        rmSync(lock, { recursive: true, force: true });
        continue;
      }
      if (Date.now() > deadline) throw new Error(`timed out waiting for another process (pid ${holder}) to build ${dir}`);
      await sleep(1000);
    }
  }
  try {
    if (ready()) return dir;
    const tmp = join(CACHE_DIR, `.build-${key}-${process.pid}-${randomBytes(4).toString('hex')}`);
    const started = Date.now();
    log(`debootstrap ${SUITE} (minbase + ${packages.join(',')}) into ${tmp}`);
    const r = await run('debootstrap', ['--variant=minbase', `--include=${packages.join(',')}`, SUITE, tmp, MIRROR], { timeoutMs: 10 * 60_000 });
    if (r.code !== 0) {
      rmSync(tmp, { recursive: true, force: true });
      throw new Error(`debootstrap failed (${r.code}): ${(r.stdout + r.stderr).slice(-3000)}`);
    }
    // Smaller and quieter: no package lists or caches; no login prompts on the console.
    rmSync(join(tmp, 'var/cache/apt/archives'), { recursive: true, force: true });
    mkdirSync(join(tmp, 'var/cache/apt/archives/partial'), { recursive: true });
    for (const f of readdirSync(join(tmp, 'var/lib/apt/lists'))) if (f !== 'partial' && f !== 'lock') rmSync(join(tmp, 'var/lib/apt/lists', f), { force: true });
    writeFileSync(join(tmp, 'etc/hostname'), 'phantoma-test\n');
    for (const unit of ['console-getty.service', 'getty@.service', 'systemd-timesyncd.service', 'apt-daily.timer', 'apt-daily-upgrade.timer', 'e2scrub_all.timer', 'fstrim.timer']) {
      const p = join(tmp, 'etc/systemd/system', unit);
      rmSync(p, { force: true });
      spawnSync('ln', ['-sf', '/dev/null', p]);
    }
    writeFileSync(join(tmp, '.phantoma-rootfs'), JSON.stringify({ suite: SUITE, mirror: MIRROR, packages, builtMs: Date.now() - started }) + '\n');
    try {
      renameSync(tmp, dir);
    } catch (err) {
      rmSync(tmp, { recursive: true, force: true });
      if (!ready()) throw err;
    }
    log(`rootfs ready in ${Math.round((Date.now() - started) / 1000)} s: ${dir}`);
    return dir;
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- cgroups of a rig

interface Hierarchy {
  mount: string;
  v2: boolean;
  key: string;
}

function hierarchies(): Hierarchy[] {
  const out: Hierarchy[] = [];
  const own = readFileSync('/proc/self/cgroup', 'utf8').trim().split('\n');
  const path = (match: (ctrls: string[], id: string) => boolean): string | undefined => {
    for (const l of own) {
      const [id, ctrls, p] = [l.split(':')[0]!, l.split(':')[1]!, l.split(':').slice(2).join(':')];
      if (match(ctrls.split(','), id)) return p;
    }
    return undefined;
  };
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const parts = line.split(' ');
    const sep = parts.indexOf('-');
    if (sep < 0) continue;
    const fstype = parts[sep + 1];
    const mnt = parts[4]!;
    const opts = parts[sep + 3] ?? '';
    if (fstype === 'cgroup2') {
      const p = path((_c, id) => id === '0');
      if (p !== undefined) out.push({ mount: mnt + (p === '/' ? '' : p), v2: true, key: 'unified' });
    } else if (fstype === 'cgroup') {
      const o = opts.split(',');
      const want = o.includes('name=systemd') ? 'name=systemd' : o.includes('memory') ? 'memory' : o.includes('pids') ? 'pids' : undefined;
      if (!want) continue;
      const p = path((c) => c.includes(want));
      if (p !== undefined) out.push({ mount: mnt + (p === '/' ? '' : p), v2: false, key: want });
    }
  }
  return out;
}

function rigCgroups(name: string): { v2: string | undefined; all: string[] } {
  const hs = hierarchies();
  const all = hs.map((h) => join(h.mount, `phantoma-nspawn-${name}`));
  const v2 = hs.find((h) => h.v2);
  return { v2: v2 ? join(v2.mount, `phantoma-nspawn-${name}`) : undefined, all };
}

function readProcs(dir: string): number[] {
  try {
    return readFileSync(join(dir, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

function subdirsDepthFirst(dir: string): string[] {
  const out: string[] = [];
  let entries: string[] = [];
  try {
    entries = readdirSync(dir, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name);
  } catch {
    return out;
  }
  for (const e of entries) out.push(...subdirsDepthFirst(join(dir, e)));
  out.push(dir);
  return out;
}

/** Kills every process in the rig's cgroups and removes them (bounded). */
async function removeRigCgroups(dirs: string[]): Promise<void> {
  const deadline = Date.now() + 15_000;
  for (const top of dirs) {
    if (!existsSync(top)) continue;
    for (;;) {
      let left = 0;
      try {
        writeFileSync(join(top, 'cgroup.kill'), '1');
      } catch {
        /* v1 has no cgroup.kill */
      }
      for (const d of subdirsDepthFirst(top)) {
        for (const pid of readProcs(d)) {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            /* gone */
          }
        }
        try {
          rmdirSync(d);
        } catch {
          left++;
        }
      }
      if (left === 0 || Date.now() > deadline) {
        if (left) log(`could not remove ${left} cgroup(s) under ${top}`);
        break;
      }
      await sleep(100);
    }
  }
}

// ---------------------------------------------------------------- containers

const live = new Map<string, { nspawn: ChildProcess; cgroups: string[] }>();
let exitHook = false;

function installExitHook(): void {
  if (exitHook) return;
  exitHook = true;
  process.on('exit', () => {
    for (const [, r] of live) {
      for (const d of r.cgroups) {
        try {
          writeFileSync(join(d, 'cgroup.kill'), '1');
        } catch {
          /* v1 */
        }
      }
      try {
        r.nspawn.kill('SIGKILL');
      } catch {
        /* gone */
      }
    }
  });
}

/** Removes writable copies and cgroups of rigs whose nspawn is gone (a test process that was SIGKILLed). */
async function reapStaleRigs(): Promise<void> {
  let names: string[] = [];
  try {
    names = readdirSync(RIG_DIR);
  } catch {
    return;
  }
  for (const n of names) {
    const d = join(RIG_DIR, n);
    const owner = recordedOwner(d, 'nspawn.pid');
    if (!owner) continue;
    if ((owner.pid > 0 && processExists(owner.pid)) || (owner.pid === 0 && owner.ageMs < 10 * 60_000)) continue;
    log(`removing a stale rig ${d}`);
    await removeRigCgroups(rigCgroups(n).all);
    if (!mountedUnder(d)) rmSync(d, { recursive: true, force: true });
  }
}

function mountedUnder(dir: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some((l) => {
    const m = l.split(' ')[4];
    return m !== undefined && (m === dir || m.startsWith(dir + '/'));
  });
}

function findLeader(nspawnPid: number): number | undefined {
  let children: string[] = [];
  try {
    children = readFileSync(`/proc/${nspawnPid}/task/${nspawnPid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
  } catch {
    return undefined;
  }
  for (const c of children) {
    try {
      const status = readFileSync(`/proc/${c}/status`, 'utf8');
      const ns = /^NSpid:\s+(.*)$/m.exec(status)?.[1]?.trim().split(/\s+/);
      if (ns && ns.length > 1 && ns[ns.length - 1] === '1') return Number(c);
    } catch {
      /* raced */
    }
  }
  return undefined;
}

export async function bootContainer(opts: BootOptions = {}): Promise<Container> {
  installExitHook();
  await reapStaleRigs();
  const base = opts.rootfs ?? (await ensureRootfs());
  const name = opts.name ?? `pt-${randomBytes(4).toString('hex')}`;
  if (!/^[a-z0-9][a-z0-9-]{0,40}$/.test(name)) throw new Error(`bad container name ${name}`);
  const dir = join(RIG_DIR, name);
  if (existsSync(dir)) throw new Error(`${dir} exists: a container named ${name} is running or was not cleaned up`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const root = join(dir, 'root');
  const cp = await run('cp', ['--reflink=auto', '-a', base, root], { timeoutMs: 120_000 });
  if (cp.code !== 0) {
    rmSync(dir, { recursive: true, force: true });
    throw new Error(`copying the rootfs failed: ${cp.stderr}`);
  }
  rmSync(join(root, '.phantoma-rootfs'), { force: true });

  const cg = rigCgroups(name);
  for (const d of cg.all) mkdirSync(d, { recursive: true });
  const args = [
    '--keep-unit', '--register=no', '--private-network', '--capability=all', '--system-call-filter=bpf perf_event_open', '--link-journal=no',
    '--resolv-conf=off', '--timezone=off', `--machine=${name}`, '-D', root,
    ...(opts.binds ?? []).map((b) => `${b.readOnly ? '--bind-ro' : '--bind'}=${b.host}:${b.container}`),
    ...(opts.extraArgs ?? []),
    '-b',
  ];
  // The shell joins the rig's own cgroups, then becomes nspawn (so the container's cgroup namespace is
  // rooted in them). --pdeathsig: if the test process dies without stop(), nspawn gets SIGTERM (= a clean
  // poweroff of the container) instead of living on.
  const join_ = cg.all.map((d, i) => `echo $$ > "$${i + 1}"/cgroup.procs`).join(' && ');
  const nspawn = spawn('/bin/sh', ['-c', `${join_} && shift ${cg.all.length} && exec setpriv --pdeathsig TERM systemd-nspawn "$@"`, 'sh', ...cg.all.map((d) => d), ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', LANG: 'C.UTF-8', SYSTEMD_LOG_COLOR: '0', SYSTEMD_COLORS: '0' },
  });
  let output = '';
  const keep = (c: Buffer): void => {
    output = (output + c.toString()).slice(-64 * 1024);
  };
  nspawn.stdout!.on('data', keep);
  nspawn.stderr!.on('data', keep);
  live.set(name, { nspawn, cgroups: cg.all });
  writeFileSync(join(dir, 'nspawn.pid'), String(nspawn.pid));
  const exited = new Promise<void>((r) => nspawn.once('exit', () => r()));
  let stopped: Promise<void> | undefined;

  const cleanup = async (): Promise<void> => {
    if (nspawn.exitCode === null && nspawn.signalCode === null) {
      nspawn.kill('SIGTERM'); // nspawn asks the container's systemd to power off
      const t = await within(exited, 30_000);
      if (!t) {
        log(`${name}: no clean poweroff within 30 s; killing it`);
        nspawn.kill('SIGKILL');
      }
    }
    await removeRigCgroups(cg.all);
    await within(exited, 5000);
    live.delete(name);
    if (mountedUnder(dir)) log(`${name}: something is still mounted under ${dir}; leaving it`);
    else rmSync(dir, { recursive: true, force: true });
  };

  let leader: number | undefined;
  const bootDeadline = Date.now() + (opts.bootTimeoutMs ?? 120_000);
  try {
    while (leader === undefined) {
      if (nspawn.exitCode !== null || nspawn.signalCode !== null) throw new Error(`systemd-nspawn exited (${nspawn.exitCode ?? nspawn.signalCode}): ${output.slice(-4000)}`);
      if (Date.now() > bootDeadline) throw new Error(`no container PID 1 within the bound: ${output.slice(-4000)}`);
      leader = findLeader(nspawn.pid!);
      if (leader === undefined) await sleep(100);
    }
    const container = makeContainer(name, root, leader, () => (stopped ??= cleanup()));
    let state = '';
    for (;;) {
      if (nspawn.exitCode !== null || nspawn.signalCode !== null) throw new Error(`systemd-nspawn exited during boot: ${output.slice(-4000)}`);
      const r = await container.exec(['systemctl', 'is-system-running'], { timeoutMs: 10_000 });
      state = r.stdout.trim();
      if (state === 'running' || state === 'degraded') break;
      if (Date.now() > bootDeadline) throw new Error(`boot did not finish (is-system-running: ${state}): ${output.slice(-4000)}`);
      await sleep(250);
    }
    if (state === 'degraded') {
      const failed = await container.systemctl('--failed', '--no-legend', '--plain');
      log(`${name}: booted degraded: ${failed.stdout.trim()}`);
    }
    if (opts.writableV1 !== false) {
      // Inside the container's mount namespace only: its v1 memory/pids mounts, rooted at its own cgroup.
      const r = await container.exec(['/bin/sh', '-c', 'for h in memory pids; do if mountpoint -q /sys/fs/cgroup/$h; then mount -o remount,rw,bind /sys/fs/cgroup/$h || exit 1; fi; done']);
      if (r.code !== 0) throw new Error(`remounting the v1 memory/pids hierarchies read-write failed: ${r.stderr}`);
    }
    // What PID 1 does on a real host (and nspawn does not): bpffs on /sys/fs/bpf, a fresh instance private
    // to this container (its pins die with it).
    const bpf = await container.exec(['/bin/sh', '-c', 'mountpoint -q /sys/fs/bpf && exit 0; if [ ! -d /sys/fs/bpf ]; then mount -o remount,rw /sys && mkdir -p /sys/fs/bpf; r=$?; mount -o remount,ro /sys; [ $r = 0 ] || exit 1; fi; mount -t bpf -o mode=0700 bpf /sys/fs/bpf']);
    if (bpf.code !== 0) throw new Error(`mounting bpffs on /sys/fs/bpf failed: ${bpf.stderr}`);
    return container;
  } catch (err) {
    await (stopped ??= cleanup());
    throw err;
  }
}

function makeContainer(name: string, root: string, leader: number, stop: () => Promise<void>): Container {
  const exec = (cmd: string[], o: ExecOptions = {}): Promise<ExecResult> => {
    const env = ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'LANG=C.UTF-8', 'SYSTEMD_COLORS=0', 'SYSTEMD_PAGER=', ...Object.entries(o.env ?? {}).map(([k, v]) => `${k}=${v}`)];
    return run('nsenter', ['--target', String(leader), '--all', '--', '/usr/bin/env', '-i', ...env, ...cmd], { ...(o.input !== undefined ? { input: o.input } : {}), timeoutMs: o.timeoutMs ?? 60_000 });
  };
  return {
    name,
    root,
    leader,
    exec,
    systemctl: (...args: string[]) => exec(['systemctl', '--no-pager', ...args]),
    async journal(unit: string, extraArgs: string[] = []): Promise<string> {
      const output = extraArgs.some((a) => a === '-o' || a.startsWith('--output')) ? [] : ['-o', 'short-monotonic'];
      const r = await exec(['journalctl', '--no-pager', '-b', '-u', unit, ...output, ...extraArgs]);
      return r.stdout + (r.code === 0 ? '' : r.stderr);
    },
    stop,
  };
}

/** An `ansible_chroot_exe` for community.general.chroot: runs the plugin's command inside the container. */
export function writeChrootWrapper(c: Container, path: string): void {
  writeFileSync(
    path,
    [
      '#!/bin/sh',
      `# Ansible chroot connection → container ${c.name} (leader pid ${c.leader}); written by test/helpers/nspawn.ts.`,
      '# Called as: <this> <chroot dir> <command...>; the directory is the container root and is dropped.',
      'shift',
      `exec nsenter --target ${c.leader} --all -- "$@"`,
      '',
    ].join('\n'),
  );
  chmodSync(path, 0o755);
}
