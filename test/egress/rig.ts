// Shared rig for the egress tests: a network namespace of the test's own (veth pair; the ONLY non-loopback
// addresses any test here talks to), a listener inside it that reports what reached it, the compiled
// attempt helper, a warden with --egress enforce, and attempt cgroups under its workers/.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, rmdirSync, statSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { ROOT } from '../helpers.ts';
import { createWardenClient, type WardenClient } from '../../src/ephemeral/warden-client.ts';
import { createEgressClient, type DenyEvent, type EgressClient, type EventStream } from '../../src/egress/warden-egress.ts';

export const WARDEN = join(ROOT, 'native', 'warden', 'build', 'phantoma-warden');
export const TAGS_FILE = join(ROOT, 'native', 'warden', 'build', 'egress.tags');

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr || r.stdout || r.error?.message}`);
  return r.stdout;
}

/** Builds the warden (and the BPF programs it embeds) and the attempt helper; returns the helper's path. */
export function buildAll(dir: string): string {
  sh('make', ['-s', '-C', join(ROOT, 'native', 'warden')]);
  const bin = join(dir, 'attempt');
  sh('gcc', ['-O1', '-Wall', '-Werror', '-pthread', '-o', bin, join(ROOT, 'test', 'egress', 'attempt.c')]);
  return bin;
}

export function expectedTags(): Map<string, string> {
  return new Map(readFileSync(TAGS_FILE, 'utf8').trim().split('\n').map((l) => l.split(' ') as [string, string]));
}

export interface Netns {
  name: string;
  v4: string;
  v6: string;
  hostV4: string;
  tcpPort: number;
  udpPort: number;
  listener: Listener;
  destroy(): void;
}

export interface ListenerEvent {
  ev: string;
  host?: string;
  data?: string;
  inEchos?: number;
}

export interface Listener {
  events: ListenerEvent[];
  /** Resolves true once an event matching pred arrived, false after ms. */
  waitFor(pred: (e: ListenerEvent) => boolean, ms: number): Promise<boolean>;
  inEchos(): Promise<number>;
  stop(): Promise<void>;
}

/** A network namespace with a veth pair: host side 10.200.X.1, namespace side 10.200.X.2 (fd00:200:X::/64). */
export async function createNetns(tag: string): Promise<Netns> {
  // A /24 no interface on the host uses yet (parallel test files each make their own namespace).
  const used = spawnSync('ip', ['-4', '-o', 'addr'], { encoding: 'utf8' }).stdout;
  let x = 20 + ((process.pid * 7 + tag.charCodeAt(0)) % 200);
  for (let i = 0; i < 200 && used.includes(`10.200.${x}.`); i++) x = 20 + ((x - 20 + 1) % 200);
  const name = `phantoma-egress-${tag}-${process.pid}`;
  const hostIf = `pe${x}${tag.slice(0, 3)}h`;
  const nsIf = `pe${x}${tag.slice(0, 3)}n`;
  const v4 = `10.200.${x}.2`;
  const v6 = `fd00:200:${x}::2`;
  const destroy = (): void => {
    spawnSync('ip', ['netns', 'del', name]);
    spawnSync('ip', ['link', 'del', hostIf]);
  };
  destroy();
  try {
    sh('ip', ['netns', 'add', name]);
    sh('ip', ['link', 'add', hostIf, 'type', 'veth', 'peer', 'name', nsIf]);
    sh('ip', ['link', 'set', nsIf, 'netns', name]);
    sh('ip', ['addr', 'add', `10.200.${x}.1/24`, 'dev', hostIf]);
    sh('ip', ['-6', 'addr', 'add', `fd00:200:${x}::1/64`, 'dev', hostIf, 'nodad']);
    sh('ip', ['link', 'set', hostIf, 'up']);
    sh('ip', ['-n', name, 'addr', 'add', `${v4}/24`, 'dev', nsIf]);
    sh('ip', ['-n', name, '-6', 'addr', 'add', `${v6}/64`, 'dev', nsIf, 'nodad']);
    sh('ip', ['-n', name, 'link', 'set', nsIf, 'up']);
    sh('ip', ['-n', name, 'link', 'set', 'lo', 'up']);
  } catch (err) {
    destroy();
    throw err;
  }
  const tcpPort = 7001;
  const udpPort = 7002;
  let listener: Listener;
  try {
    listener = await startListener(['ip', 'netns', 'exec', name, process.execPath, '--disable-warning=ExperimentalWarning', join(ROOT, 'test', 'egress', 'listener.ts'), v4, v6, String(tcpPort), String(udpPort)]);
  } catch (err) {
    destroy();
    throw err;
  }
  return {
    name,
    v4,
    v6,
    hostV4: `10.200.${x}.1`,
    tcpPort,
    udpPort,
    listener,
    destroy: () => {
      destroy();
    },
  };
}

export async function startListener(argv: string[]): Promise<Listener> {
  const proc: ChildProcess = spawn(argv[0]!, argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
  const events: ListenerEvent[] = [];
  const waiters = new Set<() => void>();
  let stderr = '';
  proc.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
  createInterface({ input: proc.stdout! }).on('line', (l) => {
    try {
      events.push(JSON.parse(l) as ListenerEvent);
    } catch {
      return;
    }
    for (const w of waiters) w();
  });
  const waitFor = (pred: (e: ListenerEvent) => boolean, ms: number): Promise<boolean> =>
    new Promise((resolve) => {
      if (events.some(pred)) return resolve(true);
      const check = (): void => {
        if (events.some(pred)) done(true);
      };
      const done = (v: boolean): void => {
        clearTimeout(timer);
        waiters.delete(check);
        resolve(v);
      };
      const timer = setTimeout(() => done(false), ms);
      waiters.add(check);
    });
  if (!(await waitFor((e) => e.ev === 'ready', 15_000))) {
    proc.kill('SIGKILL');
    throw new Error(`the listener did not start: ${stderr}`);
  }
  return {
    events,
    waitFor,
    async inEchos() {
      const before = events.filter((e) => e.ev === 'snmp').length;
      proc.stdin!.write('snmp\n');
      await waitFor(() => events.filter((e) => e.ev === 'snmp').length > before, 5000);
      return events.filter((e) => e.ev === 'snmp').at(-1)!.inEchos!;
    },
    stop: () =>
      new Promise<void>((resolve) => {
        if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
        proc.once('exit', () => resolve());
        proc.kill('SIGKILL');
      }),
  };
}

export interface Warden {
  proc: ChildProcess;
  name: string;
  socketPath: string;
  client: WardenClient;
  egress: EgressClient;
  log: string[];
  workersDir: string;
  downloadDir: string;
  stop(): Promise<number | null>;
  kill(): Promise<void>;
}

export async function startWarden(o: { name: string; sockDir: string; worker?: { exec: string; script: string }; extra?: string[] }): Promise<Warden> {
  const socketPath = join(o.sockDir, `${o.name}.sock`);
  const args = ['--exit-with-parent', '--socket', socketPath, '--client-uid', '0', '--cgroup-name', o.name, '--worker-exec', o.worker?.exec ?? '/bin/true', '--worker-script', o.worker?.script ?? '/nonexistent', '--uid-range', '61000-61999', '--egress', 'enforce', '--expose', ROOT, ...(o.extra ?? [])];
  const proc = spawn(WARDEN, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const log: string[] = [];
  createInterface({ input: proc.stderr! }).on('line', (l) => log.push(l));
  const ready = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), 15_000);
    createInterface({ input: proc.stdout! }).on('line', (l) => {
      if (l === 'ready') {
        clearTimeout(timer);
        resolve(true);
      }
    });
    proc.once('exit', () => resolve(false));
  });
  if (!ready) throw new Error(`the warden did not get ready: ${log.join('\n')}`);
  const client = createWardenClient({ socketPath });
  const workersDir = (await client.ping()).cgroup;
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  return {
    proc,
    name: o.name,
    socketPath,
    client,
    egress: createEgressClient({ socketPath }),
    log,
    workersDir,
    downloadDir: join(workersDir, '..', 'download'),
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      return exited;
    },
    async kill() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      await exited;
    },
  };
}

/** Removes what a warden killed with SIGKILL leaves: its cgroup subtree (v2 + v1) and its pins. */
export function cleanupWardenLeftovers(name: string): void {
  for (const base of ['/sys/fs/cgroup/unified', '/sys/fs/cgroup/memory', '/sys/fs/cgroup/pids']) {
    for (const sub of ['workers/probe', 'workers', 'download', 'warden', '']) {
      const d = join(base, name, sub);
      if (existsSync(d)) rmdirRetry(d);
    }
  }
  const pins = '/sys/fs/bpf/phantoma';
  if (existsSync(pins)) {
    for (const d of spawnSync('ls', [pins], { encoding: 'utf8' }).stdout.split('\n')) {
      if (d.startsWith(`${name}-`)) rmSync(join(pins, d), { recursive: true, force: true });
    }
  }
}

export function rmdirRetry(dir: string, ms = 3000): void {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      rmdirSync(dir);
      return;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      if (Date.now() > deadline) throw err;
      // kill whatever is still in it (a daemon of an attempt), then retry
      try {
        for (const pid of readFileSync(join(dir, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean)) process.kill(Number(pid), 'SIGKILL');
      } catch {
        // gone meanwhile
      }
      spawnSync('sleep', ['0.02']);
    }
  }
}

export interface AttemptCgroup {
  dir: string;
  procs: string;
  id: number;
  remove(): void;
}

/** A fresh child cgroup of `parent` (v2), named like a worker's. */
export function attemptCgroup(parent: string): AttemptCgroup {
  const dir = join(parent, randomBytes(8).toString('hex'));
  mkdirSync(dir);
  return { dir, procs: join(dir, 'cgroup.procs'), id: statSync(dir).ino, remove: () => rmdirRetry(dir) };
}

export interface AttemptResult {
  result: string;
  pid: number;
  daemonPid?: number;
  answer?: string;
}

/** Runs the helper; with `procs` it writes itself into that cgroup before it creates any socket. */
export function runAttempt(bin: string, mode: string, addr: string, port: number, token: string, procs = '-', prefix: string[] = []): Promise<AttemptResult> {
  return new Promise((resolve, reject) => {
    const argv = [...prefix, bin];
    const child = spawn(argv[0]!, [...argv.slice(1), procs, mode, addr, String(port), token], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.on('close', (code) => {
      clearTimeout(timer);
      try {
        resolve(JSON.parse(out.trim().split('\n').at(-1)!) as AttemptResult);
      } catch {
        reject(new Error(`attempt ${mode} exited ${code}: ${out} ${err}`));
      }
    });
  });
}

export interface EventLog {
  events: DenyEvent[];
  stream: EventStream;
  /** Waits until `n` events for the cgroup arrived (or ms passed), then a little longer for extras. */
  forCgroup(id: number, n: number, ms?: number): Promise<DenyEvent[]>;
}

export async function subscribe(egress: EgressClient): Promise<EventLog> {
  const events: DenyEvent[] = [];
  const stream = await egress.events((e) => events.push(e));
  return {
    events,
    stream,
    async forCgroup(id, n, ms = 3000) {
      const deadline = Date.now() + ms;
      while (events.filter((e) => e.cgroupId === id).length < n && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      await new Promise((r) => setTimeout(r, 150));
      return events.filter((e) => e.cgroupId === id);
    },
  };
}

export function tempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), prefix));
}
