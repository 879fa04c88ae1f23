// Workers spawned by the warden: each in its own cgroup, namespaces and uid, with no capabilities and a
// read-only view (native/warden/README.md). Same lifecycle as the process backend: stdio is ours, the
// worker serves one job, and kill() resolves only once the warden has ended it and verified the end.
import { randomBytes } from 'node:crypto';
import { constants as osConstants } from 'node:os';
import { PassThrough } from 'node:stream';
import type { Logger } from '../logger.ts';
import type { WorkerBackend, WorkerEndResult, WorkerExit, WorkerHandle } from './backend.ts';
import { WardenError, type EndResult, type WardenClient } from './warden-client.ts';
import { encodeMessage } from './worker-protocol.ts';

export interface WardenBackendOptions {
  client: WardenClient;
  /** The warden's --worker-exec (the Node runtime) and --worker-script (worker-main.ts). */
  workerExec: string;
  workerScript: string;
  /** The warden's --uid-range; each live worker gets a uid (and gid) of its own from it. */
  uidRange: { from: number; to: number };
  logger: Logger;
}

const SIGNAL_NAMES = new Map<number, NodeJS.Signals>(Object.entries(osConstants.signals).map(([name, n]) => [n, name as NodeJS.Signals]));

export function createWardenBackend(opts: WardenBackendOptions): WorkerBackend & { uidsInUse(): number } {
  const log = opts.logger.child({ component: 'warden-backend' });
  const { from, to } = opts.uidRange;
  if (!Number.isInteger(from) || !Number.isInteger(to) || from < 1 || to < from) throw new Error('invalid worker uid range');
  const inUse = new Set<number>();
  let next = from;

  // Distinct uids keep workers apart from each other too: a worker cannot signal, ptrace or read the
  // /proc files of another. A uid comes back only once its worker's end was verified.
  function takeUid(): number | undefined {
    for (let i = 0; i <= to - from; i++) {
      const uid = next;
      next = next === to ? from : next + 1;
      if (!inUse.has(uid)) {
        inUse.add(uid);
        return uid;
      }
    }
    return undefined;
  }

  return {
    name: 'warden',
    uidsInUse: () => inUse.size,
    spawn(spec): WorkerHandle {
      const id = randomBytes(8).toString('hex');
      const stdin = new PassThrough();
      const stdout = new PassThrough();
      const stderr = new PassThrough();
      let pid: number | undefined;
      let uid: number | undefined;
      let ending: Promise<WorkerEndResult> | undefined;
      const endResult = Promise.withResolvers<WorkerEndResult>();
      let exitInfo: EndResult['exit'] = { code: null, signal: null };
      let oomKills = 0;
      // An unread stdin would hold data forever; EPIPE after the worker is gone is expected.
      stdin.on('error', () => undefined);

      // The worker's stdio is spawned asynchronously; until then the handle's streams just buffer.
      const spawned = (async () => {
        uid = takeUid();
        if (uid === undefined) throw new WardenError('too_many_workers', 'no free worker uid in the range');
        const w = await opts.client.spawn({
          id,
          uid,
          gid: uid,
          // Always nice 0: lowering a priority again for the request would need CAP_SYS_NICE on every
          // worker thread; an unprivileged gateway cannot promote, so it never demotes either.
          nice: 0,
          exec: opts.workerExec,
          args: [opts.workerScript, JSON.stringify(spec)],
        });
        pid = w.pid;
        if (w.head.length) stdout.write(w.head);
        w.stdio.pipe(stdout, { end: false });
        w.stderr.pipe(stderr, { end: false });
        stdin.pipe(w.stdio);
        // EOF on the connection means every process that held it is gone (the warden kills the rest of
        // the cgroup as soon as the worker's main process exits): close our half too, and end the
        // stream the pool reads. A reset or destroy ('close' without 'end') ends it as well.
        for (const [sock, out] of [
          [w.stdio, stdout],
          [w.stderr, stderr],
        ] as const) {
          const finish = (): void => {
            if (!out.writableEnded) out.end();
          };
          sock.once('end', () => {
            sock.end();
            finish();
          });
          sock.once('close', finish);
        }
        return w;
      })();

      const end = (): Promise<WorkerEndResult> => {
        ending ??= (async () => {
          let worker: Awaited<typeof spawned> | undefined;
          try {
            worker = await spawned;
          } catch {
            /* nothing was spawned: nothing to end */
          }
          if (!worker) {
            if (uid !== undefined) inUse.delete(uid);
            return { verified: true, ms: 0 };
          }
          try {
            const r = await opts.client.end(id);
            exitInfo = r.exit;
            oomKills = r.oomKills;
            if (uid !== undefined) inUse.delete(uid);
            return { verified: r.verified, ms: r.ms };
          } catch (err) {
            const code = err instanceof WardenError ? err.code : 'end_failed';
            // The uid stays reserved: something may still run as it.
            log.error({ workerId: id, pid, code }, 'the warden could not verify the end of a worker');
            // Without the warden's word nobody will close these for us; stop waiting on them.
            worker.stdio.destroy();
            worker.stderr.destroy();
            return { verified: false, ms: null, error: code };
          }
        })();
        void ending.then(endResult.resolve);
        return ending;
      };

      const exited: Promise<WorkerExit> = (async () => {
        try {
          await spawned;
        } catch (err) {
          const code = err instanceof WardenError ? err.code : 'warden_failed';
          log.warn({ workerId: id, code }, 'the warden did not spawn a worker');
          // Reported through the worker protocol, so the pool names the reason for a failed start.
          stdout.end(encodeMessage({ type: 'error', code: `warden_${code}`, message: `the warden did not spawn the worker (${code})` }));
          stderr.end();
          void end();
          await new Promise<void>((r) => stdout.once('end', () => r()).once('close', () => r()));
          return { code: null, signal: null };
        }
        // Gone and drained: stdout has ended (the consumer read it all), then the end is verified.
        await new Promise<void>((r) => {
          if (stdout.readableEnded) return r();
          stdout.once('end', () => r()).once('close', () => r());
        });
        await end();
        const signal = exitInfo.signal === null ? null : (SIGNAL_NAMES.get(exitInfo.signal) ?? null);
        return { code: exitInfo.code, signal, ...(oomKills > 0 ? { outOfMemory: true } : {}) };
      })();

      return {
        id,
        // The warden makes the worker's cgroup workers/<id>, by which keyd knows it.
        keydId: id,
        get pid() {
          return pid;
        },
        stdin,
        stdout,
        stderr,
        exited,
        endResult: endResult.promise,
        async kill() {
          await end();
          return exited;
        },
      };
    },
  };
}
