// Starts the warden binary as a child process: for `phantoma serve` with warden.start (development, tests,
// the README's main job, all as root) — in production the warden is its own systemd unit (issue 13).
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { projectRoot } from '../paths.ts';
import { PhantomaError, ERRORS } from '../errors.ts';
import type { Logger } from '../logger.ts';

export interface WardenProcessOptions {
  socketPath: string;
  clientUid: number;
  cgroupName: string;
  workerExec: string;
  workerScript: string;
  workerArgs: readonly string[];
  preload?: string;
  /** Directories workers must see read-only even under a masked path (/tmp, /root, /home, /run). */
  expose: readonly string[];
  uidRange: { from: number; to: number };
  memoryMaxBytes: number;
  pidsMax: number;
  tmpfsBytes: number;
  /** --egress: enforce loads and attaches the egress BPF programs (issue 9). */
  egress?: 'enforce' | 'off';
  /** --keyd-socket: keyd's socket, bind-mounted into every worker's view at /run/phantoma/keyd.sock (issue 7). */
  keydSocket?: string;
  /** --download-script/--download-uid: the model download helper run in download/ (issue 10). */
  download?: { script: string; uid: number };
  /** --gateway-egress: the allowlist ("tcp|udp,ADDR/BITS,PORT" or "none") CONFINE attaches to a gateway's own cgroup (issue 13). */
  gatewayEgress?: readonly string[];
  logger: Logger;
}

export interface WardenProcess {
  readonly pid: number | undefined;
  stop(): Promise<number | null>;
}

export function wardenBinaryPath(): string {
  return join(projectRoot(), 'native', 'warden', 'build', 'phantoma-warden');
}

export async function startWardenProcess(o: WardenProcessOptions): Promise<WardenProcess> {
  if (process.getuid?.() !== 0) throw new PhantomaError(ERRORS.CONFIG_INVALID, 'warden.start needs root: the warden is the one privileged process');
  mkdirSync(dirname(o.socketPath), { recursive: true, mode: 0o711 });
  const args = [
    '--exit-with-parent',
    '--socket', o.socketPath,
    '--client-uid', String(o.clientUid),
    '--cgroup-name', o.cgroupName,
    '--worker-exec', o.workerExec,
    '--worker-script', o.workerScript,
    '--uid-range', `${o.uidRange.from}-${o.uidRange.to}`,
    '--memory-max', String(o.memoryMaxBytes),
    '--pids-max', String(o.pidsMax),
    '--tmpfs-size', String(o.tmpfsBytes),
    ...o.workerArgs.flatMap((a) => ['--worker-arg', a]),
    ...(o.preload ? ['--worker-preload', o.preload] : []),
    ...o.expose.flatMap((d) => ['--expose', d]),
    ...(o.keydSocket ? ['--keyd-socket', o.keydSocket] : []),
    '--egress', o.egress ?? 'enforce',
    ...(o.download ? ['--download-script', o.download.script, '--download-uid', String(o.download.uid)] : []),
    ...(o.gatewayEgress ?? []).flatMap((e) => ['--gateway-egress', e]),
  ];
  const log = o.logger.child({ component: 'warden' });
  const proc: ChildProcess = spawn(wardenBinaryPath(), args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const lines: string[] = [];
  // The warden's stderr names ids, codes and paths only; it never sees a request.
  createInterface({ input: proc.stderr! }).on('line', (l) => {
    lines.push(l);
    if (lines.length > 50) lines.shift();
    log.info({ warden: l }, 'warden');
  });
  const ready = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), 30_000);
    createInterface({ input: proc.stdout! }).on('line', (l) => {
      if (l === 'ready') {
        clearTimeout(timer);
        resolve(true);
      }
    });
    proc.once('exit', () => {
      clearTimeout(timer);
      resolve(false);
    });
    proc.once('error', () => resolve(false));
  });
  if (!ready) {
    proc.kill('SIGKILL');
    throw new PhantomaError(ERRORS.NOT_READY, `the warden did not start: ${lines.slice(-5).join(' | ') || 'no output'}`);
  }
  const exited = new Promise<number | null>((r) => {
    if (proc.exitCode !== null) r(proc.exitCode);
    else proc.once('exit', (code) => r(code));
  });
  return {
    pid: proc.pid,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      return exited;
    },
  };
}
