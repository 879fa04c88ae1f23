// The pool of warm one-shot workers for one model. Each worker loads the model and its context before a
// request exists, serves exactly one job, and is gone; the pool refills in the background. Requests wait
// in a bounded queue when every worker is busy; past the bound they are refused, never held unboundedly.
import type { Logger } from '../logger.ts';
import { PhantomaError, ERRORS } from '../errors.ts';
import type { WorkerBackend, WorkerHandle } from './backend.ts';
import type { WorkerSpec } from './worker-main.ts';
import type { JobTimes } from './job-timing.ts';
import { createLineDecoder, encodeMessage, type FromWorker, type JobMessage, type Usage, type FinishReason, type ToolCall, type TokenLogprob } from './worker-protocol.ts';

export type WorkerState = 'starting' | 'ready' | 'busy';

export interface PoolObserver {
  workerStarted?(model: string, ms: number, workerId: string): void;
  workerStartFailed?(model: string, code: string): void;
  /** verified: the backend confirmed the worker is gone (the warden: cgroup killed, empty, removed). */
  workerEnded?(model: string, outcome: JobOutcome, workerId: string, endMs: number, verified: boolean, detail?: string): void;
}

export type JobOutcome = 'ok' | 'refused' | 'timeout' | 'client_closed' | 'worker_failed' | 'out_of_memory' | 'unused';

/** A worker's error: the client's own mistakes pass through with their code, anything else is worker_failed. */
function workerError(code: string, message: string): PhantomaError {
  if (code === ERRORS.CONTEXT_LENGTH_EXCEEDED.code) return new PhantomaError(ERRORS.CONTEXT_LENGTH_EXCEEDED, message, { details: { param: 'messages' } });
  return new PhantomaError(ERRORS.WORKER_FAILED, `the worker failed (${code})`, { details: { workerCode: code } });
}

export interface PoolOptions {
  backend: WorkerBackend;
  spec: WorkerSpec;
  /** Warm workers kept ready. */
  size: number;
  /** Jobs running at once; more wait in the queue. */
  maxActive: number;
  maxQueue: number;
  logger: Logger;
  observer?: PoolObserver;
  /** How long a finished worker may take to exit by itself before it is killed. */
  exitGraceMs?: number;
  /** When set, the pool starts no worker and refuses every request with this error (fail closed). */
  blocked?: PhantomaError;
  /** Start no worker until the first request (issue 15: models loaded lazily). */
  lazy?: boolean;
  /** After this long without a request, warm workers end and the pool holds none until the next (scale to zero). */
  idleMs?: number;
}

/** For /v1/models: serving now, warming up, scaled to zero (starts on demand), or unable to start. */
export type PoolState = 'ready' | 'starting' | 'idle' | 'unavailable';

/** What a job's worker reported at its end: its times (job and model, src/ephemeral/job-timing.ts) and more. */
export interface JobResult extends JobTimes {
  finishReason: FinishReason;
  usage: Usage;
  /** A sealed job: whether the worker's sealed answer ended in its `done` or its `error` event. */
  sealedOutcome?: 'ok' | 'error';
}

/** How the worker's end went, for a receipt: killed, and (warden) its cgroup verified empty and removed. */
export interface JobEnd {
  verified: boolean;
  ms: number | null;
}

export interface RunOptions {
  /** Generated text; with the log-probabilities of its tokens when the job asked for them. */
  onChunk(text: string, logprobs?: TokenLogprob[]): void;
  /** The model's tool calls (chat with tools), once, before the job settles. */
  onToolCalls?(calls: ToolCall[]): void;
  /** One input's embedding (embeddings jobs), in input order. */
  onEmbedding?(index: number, embedding: number[]): void;
  /** A sealed chunk (base64), relayed to the client as it is. */
  onSealed?(data: string, final: boolean): void;
  /** Called once the worker has ended, before the job's promise settles, whatever the outcome. */
  onEnded?(end: JobEnd): void;
  /** Aborted when the client goes away: the worker is killed at once. */
  signal?: AbortSignal;
  timeoutMs: number;
}

export interface Lease {
  readonly workerId: string;
  readonly pid: number | undefined;
  /** The worker's id as keyd knows it (WorkerHandle.keydId), when it has one. */
  readonly keydWorkerId: string | undefined;
  /** Runs the one job this worker will ever serve. Ends the worker whatever happens. */
  run(job: JobMessage, opts: RunOptions): Promise<JobResult>;
  /** Ends the worker without running a job (e.g. validation failed after acquiring). */
  release(): Promise<void>;
}

export interface PoolStats {
  starting: number;
  ready: number;
  busy: number;
  queued: number;
}

export interface WorkerPool {
  readonly model: string;
  start(): void;
  acquire(signal?: AbortSignal): Promise<Lease>;
  stats(): PoolStats;
  /** Why the pool cannot serve right now, or undefined when it can. */
  notReadyReason(): string | undefined;
  /** ready/starting/idle (scaled to zero or lazy, not yet used)/unavailable. */
  state(): PoolState;
  /** Warm workers the pool is filling to right now: 0 while scaled to zero. */
  warmTarget(): number;
  /** Every live worker with its state (tests and diagnostics). */
  workers(): Array<{ id: string; pid: number | undefined; state: WorkerState }>;
  close(): Promise<void>;
}

interface LiveWorker {
  handle: WorkerHandle;
  state: WorkerState;
  ready?: Extract<FromWorker, { type: 'ready' }>;
  onMessage?: (m: FromWorker) => void;
  protocolError?: string;
}

interface Waiter {
  resolve(lease: Lease): void;
  reject(err: unknown): void;
}

export function createWorkerPool(opts: PoolOptions): WorkerPool {
  const log = opts.logger.child({ component: 'pool', model: opts.spec.modelName });
  const workers = new Map<string, LiveWorker>();
  const queue: Waiter[] = [];
  let active = 0;
  let closed = false;
  let started = false;
  let consecutiveFailures = 0;
  let lastStartError: string | undefined;
  let backoffTimer: NodeJS.Timeout | undefined;
  // Scaled to zero: no worker is kept warm until the next acquire (lazy pools start this way).
  let scaledDown = opts.lazy === true;
  let idleTimer: NodeJS.Timeout | undefined;
  const armIdle = (): void => {
    if (opts.idleMs === undefined || closed) return;
    clearTimeout(idleTimer);
    idleTimer = setTimeout(() => {
      idleTimer = undefined;
      if (active > 0 || queue.length > 0 || closed) return armIdle();
      scaledDown = true;
      log.info({ idleMs: opts.idleMs }, 'pool idle: scaling to zero');
      for (const w of workers.values()) if (w.state === 'ready') void w.handle.kill();
    }, opts.idleMs);
    idleTimer.unref();
  };
  const exitGraceMs = opts.exitGraceMs ?? 2000;

  function count(state: WorkerState): number {
    let n = 0;
    for (const w of workers.values()) if (w.state === state) n++;
    return n;
  }

  function spawnOne(): void {
    const spawnedAt = performance.now();
    const handle = opts.backend.spawn(opts.spec, { lowPriority: started && workers.size > 0 });
    const w: LiveWorker = { handle, state: 'starting' };
    workers.set(handle.id, w);
    let startError: string | undefined;
    const decode = createLineDecoder<FromWorker>((m) => {
      if (w.state === 'starting') {
        if (m.type === 'ready') {
          w.ready = m;
          w.state = 'ready';
          // Scaled to zero while it was starting: it is not wanted any more.
          if (scaledDown) {
            void handle.kill();
            return;
          }
          consecutiveFailures = 0;
          lastStartError = undefined;
          opts.observer?.workerStarted?.(opts.spec.modelName, performance.now() - spawnedAt, handle.id);
          log.debug({ workerId: handle.id, pid: handle.pid, loadMs: m.loadMs }, 'worker ready');
          dispatch();
        } else if (m.type === 'error') {
          startError = m.code;
        }
        return;
      }
      w.onMessage?.(m);
    });
    handle.stdout.on('data', (chunk: Buffer) => {
      try {
        decode(chunk);
      } catch (err) {
        w.protocolError = (err as Error).message;
        void handle.kill();
      }
    });
    // The worker's stderr carries its own structured log (no content); drained so it never blocks.
    handle.stderr.resume();
    void handle.exited.then((exit) => {
      const wasStarting = w.state === 'starting';
      workers.delete(handle.id);
      if (wasStarting && !closed) {
        consecutiveFailures++;
        lastStartError = startError ?? `exit code ${String(exit.code)}, signal ${String(exit.signal)}`;
        opts.observer?.workerStartFailed?.(opts.spec.modelName, startError ?? 'worker_failed');
        log.warn({ workerId: handle.id, code: startError, exitCode: exit.code, signal: exit.signal, failures: consecutiveFailures }, 'worker failed to start');
        // A model that cannot load must not become a spawn loop: back off exponentially up to 30 s.
        const delay = Math.min(30_000, 250 * 2 ** Math.min(consecutiveFailures - 1, 7));
        clearTimeout(backoffTimer);
        backoffTimer = setTimeout(() => {
          backoffTimer = undefined;
          refill();
        }, delay);
        backoffTimer.unref();
        // Waiters cannot be served while no worker can start.
        if (count('ready') === 0 && count('starting') === 0) {
          for (const q of queue.splice(0)) q.reject(new PhantomaError(ERRORS.NOT_READY, `no worker could start for model "${opts.spec.modelName}": ${lastStartError}`));
        }
        return;
      }
      refill();
    });
  }

  function refill(): void {
    if (closed || backoffTimer || opts.blocked || scaledDown) return;
    // A worker warming up (model load, first decode) takes a core from the request being answered: on
    // 2 cores it halved decoding (measured). So while a job runs and another worker is ready, the refill
    // waits until the job ends; with none ready it starts at once, or the next request would wait.
    if (active > 0 && count('ready') > 0) return;
    while (count('starting') + count('ready') < opts.size) spawnOne();
  }

  function makeLease(w: LiveWorker): Lease {
    let ended: Promise<JobEnd> | undefined;
    const end = (outcome: JobOutcome, immediately: boolean): Promise<JobEnd> => {
      ended ??= (async () => {
        if (!immediately) {
          const graceful = await Promise.race([w.handle.exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), exitGraceMs).unref())]);
          if (!graceful) log.warn({ workerId: w.handle.id }, 'worker did not exit after its job; killing it');
        }
        const endStart = performance.now();
        await w.handle.kill();
        const end = w.handle.endResult ? await w.handle.endResult.catch(() => ({ verified: false, ms: null, error: 'no_answer' })) : undefined;
        active--;
        if (end && !end.verified) log.error({ workerId: w.handle.id, error: end.error }, 'worker end NOT verified');
        const endMs = end?.ms ?? performance.now() - endStart;
        opts.observer?.workerEnded?.(opts.spec.modelName, outcome, w.handle.id, endMs, end ? end.verified : true, end?.error);
        dispatch();
        refill();
        armIdle();
        return { verified: end ? end.verified : true, ms: end ? end.ms : endMs };
      })();
      return ended;
    };
    return {
      workerId: w.handle.id,
      pid: w.handle.pid,
      keydWorkerId: w.handle.keydId,
      release: () => end('unused', true).then(() => undefined),
      run(job, run) {
        return new Promise<JobResult>((resolve, reject) => {
          let settled = false;
          // The job (prompt included) goes out as a Buffer of our own, zero-filled once the job is over
          // (not on the write callback: a backend may still be passing the same Buffer along then).
          const text = encodeMessage(job);
          const jobBytes = Buffer.alloc(Buffer.byteLength(text));
          jobBytes.write(text);
          const finish = (outcome: JobOutcome, err: unknown, result?: JobResult): void => {
            if (settled) return;
            settled = true;
            jobBytes.fill(0);
            clearTimeout(timer);
            run.signal?.removeEventListener('abort', onAbort);
            w.onMessage = undefined;
            const ending = end(outcome, outcome !== 'ok');
            // Resolve only once the worker is gone: "answered" implies "ended".
            void ending.then((e) => {
              run.onEnded?.(e);
              if (err) reject(err);
              else resolve(result!);
            });
          };
          const onAbort = (): void => finish('client_closed', new PhantomaError(ERRORS.CLIENT_CLOSED, 'the client closed the connection'));
          const timer = setTimeout(
            () => finish('timeout', new PhantomaError(ERRORS.REQUEST_TIMEOUT, `the request took longer than ${run.timeoutMs} ms; its worker was ended`)),
            run.timeoutMs,
          );
          if (run.signal?.aborted) return onAbort();
          run.signal?.addEventListener('abort', onAbort, { once: true });
          w.onMessage = (m) => {
            if (m.type === 'chunk') run.onChunk(m.text, m.logprobs);
            else if (m.type === 'tool_calls') run.onToolCalls?.(m.calls);
            else if (m.type === 'embedding') run.onEmbedding?.(m.index, m.embedding);
            else if (m.type === 'sealed') run.onSealed?.(m.data, m.final);
            else if (m.type === 'done') {
              finish('ok', undefined, { finishReason: m.finishReason, usage: m.usage, firstTokenMs: m.firstTokenMs, promptEvalMs: m.promptEvalMs, modelMs: m.modelMs, generateMs: m.generateMs, ...(m.sealedOutcome ? { sealedOutcome: m.sealedOutcome } : {}) });
            }
            else if (m.type === 'error') finish(m.code === ERRORS.CONTEXT_LENGTH_EXCEEDED.code ? 'refused' : 'worker_failed', workerError(m.code, m.message));
          };
          void w.handle.exited.then((exit) => {
            if (exit.outOfMemory) {
              return finish('out_of_memory', new PhantomaError(ERRORS.WORKER_OUT_OF_MEMORY, 'the request needed more memory than a worker may use (workers.memoryMaxBytes); its worker was ended', {
                details: { signal: exit.signal },
              }));
            }
            finish('worker_failed', new PhantomaError(ERRORS.WORKER_FAILED, 'the worker ended before finishing the request', {
              details: { exitCode: exit.code, signal: exit.signal, ...(w.protocolError ? { protocol: w.protocolError } : {}) },
            }));
          });
          w.handle.stdin.write(jobBytes);
        });
      },
    };
  }

  function takeReady(): Lease | undefined {
    if (active >= opts.maxActive) return undefined;
    for (const w of workers.values()) {
      if (w.state === 'ready') {
        w.state = 'busy';
        active++;
        w.handle.promote?.();
        return makeLease(w);
      }
    }
    return undefined;
  }

  function dispatch(): void {
    while (queue.length > 0) {
      const lease = takeReady();
      if (!lease) break;
      queue.shift()!.resolve(lease);
    }
  }

  return {
    model: opts.spec.modelName,
    start() {
      started = false;
      refill();
      started = true;
      armIdle();
    },
    acquire(signal) {
      if (opts.blocked) return Promise.reject(opts.blocked);
      if (closed) return Promise.reject(new PhantomaError(ERRORS.NOT_READY, 'the node is shutting down'));
      armIdle();
      if (scaledDown) {
        // On demand: warm the pool again; this request waits for the first worker.
        scaledDown = false;
        log.info('pool scaled up on demand');
        refill();
      }
      const lease = queue.length === 0 ? takeReady() : undefined;
      if (lease) {
        refill();
        return Promise.resolve(lease);
      }
      if (count('ready') === 0 && count('starting') === 0 && lastStartError !== undefined) {
        return Promise.reject(new PhantomaError(ERRORS.NOT_READY, `no worker could start for model "${opts.spec.modelName}": ${lastStartError}`));
      }
      if (queue.length >= opts.maxQueue) {
        return Promise.reject(new PhantomaError(ERRORS.QUEUE_FULL, `all workers are busy and ${queue.length} requests are waiting`));
      }
      return new Promise<Lease>((resolve, reject) => {
        const waiter: Waiter = {
          resolve: (l) => {
            signal?.removeEventListener('abort', onAbort);
            refill();
            resolve(l);
          },
          reject,
        };
        const onAbort = (): void => {
          const i = queue.indexOf(waiter);
          if (i !== -1) queue.splice(i, 1);
          reject(new PhantomaError(ERRORS.CLIENT_CLOSED, 'the client closed the connection while queued'));
        };
        signal?.addEventListener('abort', onAbort, { once: true });
        queue.push(waiter);
      });
    },
    stats: () => ({ starting: count('starting'), ready: count('ready'), busy: count('busy'), queued: queue.length }),
    state() {
      if (closed || opts.blocked || (lastStartError !== undefined && count('ready') === 0 && count('starting') === 0)) return 'unavailable';
      if (count('ready') > 0 || active > 0) return 'ready';
      return scaledDown ? 'idle' : 'starting';
    },
    warmTarget: () => (scaledDown || opts.blocked ? 0 : opts.size),
    notReadyReason() {
      if (closed) return 'shutting down';
      if (opts.blocked) return opts.blocked.message;
      // Scaled to zero serves on demand: not a reason to take the node out of rotation.
      if (scaledDown) return undefined;
      if (count('ready') > 0 || active > 0) return undefined;
      if (lastStartError) return `model ${opts.spec.modelName}: no worker could start (${lastStartError})`;
      return `model ${opts.spec.modelName}: no warm worker yet (${count('starting')} starting)`;
    },
    workers: () => [...workers.values()].map((w) => ({ id: w.handle.id, pid: w.handle.pid, state: w.state })),
    async close() {
      closed = true;
      clearTimeout(backoffTimer);
      clearTimeout(idleTimer);
      for (const q of queue.splice(0)) q.reject(new PhantomaError(ERRORS.NOT_READY, 'the node is shutting down'));
      await Promise.all([...workers.values()].map((w) => w.handle.kill()));
    },
  };
}
