// Fail closed around the pool without the pool knowing: a backend wrapper that starts no worker while the
// egress filter is not verified (a spawn waits until it is) and ends every live worker the moment it is
// lost (warm and in flight), and a pool wrapper whose acquire() refuses and whose notReadyReason() names
// the egress reason first, so /readyz says why.
import { PassThrough } from 'node:stream';
import { PhantomaError, ERRORS } from '../errors.ts';
import type { WorkerBackend, WorkerEndResult, WorkerExit, WorkerHandle } from '../ephemeral/backend.ts';
import type { WorkerPool } from '../ephemeral/pool.ts';
import type { EgressMonitor } from './monitor.ts';

export function egressError(monitor: EgressMonitor): PhantomaError {
  return new PhantomaError(ERRORS.EGRESS_UNVERIFIED, `workers are not started: the egress filter is not verified (${monitor.reason() ?? 'unknown'})`);
}

export function gateBackend(inner: WorkerBackend, monitor: EgressMonitor): WorkerBackend & { live(): number } {
  const live = new Set<WorkerHandle>();
  const pending = new Set<() => void>();
  monitor.onChange((ok) => {
    if (ok) {
      for (const go of [...pending]) go();
      return;
    }
    // Lost: every running worker ends now (in-flight requests fail with worker_failed).
    for (const h of [...live]) void h.kill();
  });
  const track = (h: WorkerHandle): WorkerHandle => {
    live.add(h);
    void h.exited.finally(() => live.delete(h));
    // Verification may have been lost between the check and this spawn.
    if (!monitor.ok()) void h.kill();
    return h;
  };
  return {
    name: inner.name,
    live: () => live.size,
    spawn(spec, opts) {
      if (monitor.ok()) return track(inner.spawn(spec, opts));
      // Deferred: looks like a worker that is still starting until the filter is verified again.
      const stdin = new PassThrough();
      const stdout = new PassThrough();
      const stderr = new PassThrough();
      stdin.on('error', () => undefined);
      let real: WorkerHandle | undefined;
      let killed = false;
      const exit = Promise.withResolvers<WorkerExit>();
      const endResult = Promise.withResolvers<WorkerEndResult>();
      const go = (): void => {
        pending.delete(go);
        if (killed) return;
        real = track(inner.spawn(spec, opts));
        stdin.pipe(real.stdin);
        real.stdout.pipe(stdout);
        real.stderr.pipe(stderr);
        void real.exited.then(exit.resolve, exit.reject);
        // The real end's proof (the warden's verified end) is this handle's proof.
        void (real.endResult ?? real.exited.then((): WorkerEndResult => ({ verified: false, ms: null, error: 'no_proof' }))).then(endResult.resolve);
      };
      pending.add(go);
      const handle: WorkerHandle = {
        id: `deferred-${Math.random().toString(16).slice(2, 10)}`,
        get pid() {
          return real?.pid;
        },
        // keyd's name for the worker (for the gateway's prepare) once the real one exists.
        get keydId() {
          return real?.keydId;
        },
        stdin,
        stdout,
        stderr,
        exited: exit.promise,
        endResult: endResult.promise,
        async kill() {
          if (real) return real.kill();
          killed = true;
          pending.delete(go);
          stdout.end();
          stderr.end();
          exit.resolve({ code: null, signal: 'SIGKILL' });
          endResult.resolve({ verified: true, ms: 0 }); // nothing was ever started
          return exit.promise;
        },
      };
      return handle;
    },
  };
}

export function gatePool(pool: WorkerPool, monitor: EgressMonitor): WorkerPool {
  return {
    ...pool,
    model: pool.model,
    acquire(signal) {
      if (!monitor.ok()) return Promise.reject(egressError(monitor));
      return pool.acquire(signal);
    },
    notReadyReason() {
      if (!monitor.ok()) return `egress filter not verified: ${monitor.reason() ?? 'unknown'}`;
      return pool.notReadyReason();
    },
  };
}
