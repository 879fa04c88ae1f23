// Prometheus metrics on their own registry (never the global one, so two gateways in one test process
// do not mix). Labels are route patterns, status codes, error codes and configured model names only:
// nothing a client typed ever becomes a label.
import { Registry, Counter, Gauge, Histogram, collectDefaultMetrics } from 'prom-client';
import type { JobResult, PoolObserver, WorkerPool } from '../ephemeral/pool.ts';

/**
 * A job's worker-side timings for its request log line, plain or sealed (the gateway sees a sealed answer's
 * chunks pass anyway; its token counts stay inside it): time to first token and the whole job's, and the
 * model's own share of each (the rest is the node's).
 */
export function workerTimingFields(r: JobResult): Record<string, number> {
  return {
    ...(r.firstTokenMs === null ? {} : { workerTtftMs: Math.round(r.firstTokenMs * 10) / 10 }),
    ...(r.promptEvalMs === null ? {} : { workerPromptEvalMs: Math.round(r.promptEvalMs * 100) / 100 }),
    ...(r.modelMs === null ? {} : { workerModelMs: Math.round(r.modelMs * 100) / 100 }),
    workerGenerateMs: Math.round(r.generateMs * 10) / 10,
  };
}

export interface GatewayMetrics {
  registry: Registry;
  requests: Counter<'route' | 'status'>;
  errors: Counter<'code'>;
  timeToFirstToken: Histogram<'model'>;
  promptEval: Histogram<'model'>;
  tokensPerSecond: Histogram<'model'>;
  poolObserver: PoolObserver;
  watchPools(pools: readonly WorkerPool[]): void;
}

export function createGatewayMetrics(): GatewayMetrics {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'phantoma_' });
  const requests = new Counter({ name: 'phantoma_http_requests_total', help: 'HTTP requests by route pattern and status', labelNames: ['route', 'status'] as const, registers: [registry] });
  const errors = new Counter({ name: 'phantoma_errors_total', help: 'Errors returned, by stable error code', labelNames: ['code'] as const, registers: [registry] });
  const workerStart = new Histogram({
    name: 'phantoma_worker_start_seconds',
    help: 'Spawn to ready (model loaded, context created) per worker',
    labelNames: ['model'] as const,
    buckets: [0.1, 0.25, 0.5, 1, 2, 4, 8, 16],
    registers: [registry],
  });
  const workerStartFailures = new Counter({ name: 'phantoma_worker_start_failures_total', help: 'Workers that exited before becoming ready', labelNames: ['model', 'code'] as const, registers: [registry] });
  const workersEnded = new Counter({ name: 'phantoma_workers_ended_total', help: 'Workers ended after a lease, by outcome', labelNames: ['model', 'outcome'] as const, registers: [registry] });
  const latencyPerModel = (name: string, help: string): Histogram<'model'> =>
    new Histogram({ name, help, labelNames: ['model'] as const, buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5], registers: [registry] });
  const timeToFirstToken = latencyPerModel('phantoma_time_to_first_token_seconds', 'Job start to first generated text');
  // The model's own share of the time to first token; the rest (job hand-over, a sealed body's opening)
  // is the node's overhead, which this split lets an operator see apart from prompt length and load.
  const promptEval = latencyPerModel('phantoma_prompt_eval_seconds', 'Input handed to the model to its first generated text');
  const tokensPerSecond = new Histogram({
    name: 'phantoma_decode_tokens_per_second',
    help: 'Completion tokens per second of generation, per request',
    labelNames: ['model'] as const,
    buckets: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000],
    registers: [registry],
  });
  let pools: readonly WorkerPool[] = [];
  new Gauge({
    name: 'phantoma_pool_workers',
    help: 'Workers by model and state',
    labelNames: ['model', 'state'] as const,
    registers: [registry],
    collect() {
      this.reset();
      for (const p of pools) {
        const s = p.stats();
        for (const state of ['starting', 'ready', 'busy'] as const) this.set({ model: p.model, state }, s[state]);
      }
    },
  });
  new Gauge({
    name: 'phantoma_queue_depth',
    help: 'Requests waiting for a worker, by model',
    labelNames: ['model'] as const,
    registers: [registry],
    collect() {
      this.reset();
      for (const p of pools) this.set({ model: p.model }, p.stats().queued);
    },
  });
  return {
    registry,
    requests,
    errors,
    timeToFirstToken,
    promptEval,
    tokensPerSecond,
    poolObserver: {
      workerStarted: (model, ms) => workerStart.observe({ model }, ms / 1000),
      workerStartFailed: (model, code) => workerStartFailures.inc({ model, code }),
      workerEnded: (model, outcome) => workersEnded.inc({ model, outcome }),
    },
    watchPools(p) {
      pools = p;
    },
  };
}
