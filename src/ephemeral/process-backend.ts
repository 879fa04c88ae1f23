// Workers as plain child processes of the gateway, with a scrubbed environment. The warden backend
// (issue 5) adds the isolation; this one is the same lifecycle without privilege.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { setPriority } from 'node:os';
import type { WorkerBackend, WorkerHandle, WorkerExit } from './backend.ts';
import type { WorkerCommand } from './worker-command.ts';

export interface ProcessBackendDeps {
  command: WorkerCommand;
  cwd: string;
  /** Shared libraries preloaded into each worker (the persistent-threadpool shim). */
  preload?: readonly string[];
}

export function createProcessBackend(deps: ProcessBackendDeps): WorkerBackend {
  const canPromote = process.getuid?.() === 0;
  return {
    name: 'process',
    spawn(spec, opts): WorkerHandle {
      const id = randomBytes(8).toString('hex');
      const child = spawn(deps.command.exec, [...deps.command.flags, deps.command.script, JSON.stringify(spec)], {
        cwd: deps.cwd,
        stdio: ['pipe', 'pipe', 'pipe'],
        // Only what the worker needs: no credentials, proxies or tokens from the gateway's environment.
        env: { PATH: '/usr/bin:/bin', NODE_LLAMA_CPP_SKIP_DOWNLOAD: 'true', LANG: 'C.UTF-8', ...(deps.preload?.length ? { LD_PRELOAD: deps.preload.join(':') } : {}) },
      });
      const exited = new Promise<WorkerExit>((resolve) => {
        // 'close', not 'exit': it fires after the worker's stdout is drained, so a final message is never lost.
        child.once('close', (code, signal) => resolve({ code, signal }));
        child.once('error', () => resolve({ code: null, signal: null }));
      });
      // Lowering a priority again needs CAP_SYS_NICE: without it a refill would serve its request at
      // nice 10 behind anything else on the host, so only refill at low priority when we can promote.
      if (opts.lowPriority && canPromote && child.pid) {
        try {
          // A refill competes with decoding on a small machine; let the active request win.
          setPriority(child.pid, 10);
        } catch {
          /* exited already */
        }
      }
      // An unread pipe would block the worker; stdin errors (EPIPE after exit) are expected.
      child.stdin.on('error', () => undefined);
      return {
        id,
        pid: child.pid,
        stdin: child.stdin,
        stdout: child.stdout,
        stderr: child.stderr,
        exited,
        promote() {
          if (!canPromote || !child.pid) return;
          try {
            setPriority(child.pid, 0);
          } catch {
            /* exited already */
          }
        },
        async kill() {
          if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
          return exited;
        },
      };
    },
  };
}
