// Memory budgeting (issue 15): what a model's pool needs in RAM when warm, estimated from its GGUF
// header, and the check that refuses a config whose pools cannot all be warm at once. Weights are mapped
// from the page cache and shared by every worker of a model, so they count once per model; each worker
// adds its KV cache (f16 keys and values for its whole context) and a fixed runtime allowance (Node,
// llama.cpp's compute buffers, the worker's heap).
import { statSync } from 'node:fs';
import { totalmem } from 'node:os';
import type { GgufSummary } from './gguf-reader.ts';
import { PhantomaError, ERRORS } from '../errors.ts';

/** Per-worker allowance besides the KV cache (measured on the tiny and bench models: 60-90 MiB). */
export const WORKER_RUNTIME_BYTES = 96 * 2 ** 20;
/** The default budget: this share of the host's RAM. */
export const DEFAULT_BUDGET_SHARE = 0.9;

export interface PoolMemoryInput {
  name: string;
  path: string;
  summary: GgufSummary;
  contextSize: number;
  /** Warm workers (the pool's size). */
  workers: number;
}

export interface PoolMemoryEstimate {
  name: string;
  weightsBytes: number;
  perWorkerBytes: number;
  totalBytes: number;
}

function num(summary: GgufSummary, key: string): number | undefined {
  const arch = String(summary.metadata.get('general.architecture'));
  const v = summary.metadata.get(`${arch}.${key}`);
  return typeof v === 'number' || typeof v === 'bigint' ? Number(v) : undefined;
}

export function estimatePoolMemory(m: PoolMemoryInput): PoolMemoryEstimate {
  const layers = num(m.summary, 'block_count') ?? 0;
  const width = num(m.summary, 'embedding_length') ?? 0;
  const heads = num(m.summary, 'attention.head_count') ?? 1;
  const kvHeads = num(m.summary, 'attention.head_count_kv') ?? heads;
  const kvWidth = heads > 0 ? (width / heads) * kvHeads : width;
  const kvBytes = 2 * layers * m.contextSize * kvWidth * 2;
  const weightsBytes = statSync(m.path).size;
  const perWorkerBytes = Math.ceil(kvBytes) + WORKER_RUNTIME_BYTES;
  return { name: m.name, weightsBytes, perWorkerBytes, totalBytes: weightsBytes + m.workers * perWorkerBytes };
}

const mib = (b: number): string => `${Math.ceil(b / 2 ** 20)} MiB`;

/** Refuses (config_invalid-like `memory_budget_exceeded`) when every pool warm at once would not fit. */
export function checkMemoryBudget(pools: readonly PoolMemoryInput[], budgetBytes: number | undefined): PoolMemoryEstimate[] {
  const estimates = pools.map(estimatePoolMemory);
  const budget = budgetBytes ?? Math.floor(totalmem() * DEFAULT_BUDGET_SHARE);
  const total = estimates.reduce((a, e) => a + e.totalBytes, 0);
  if (total > budget) {
    const parts = estimates.map((e) => `${e.name}: ${mib(e.weightsBytes)} weights + ${pools.find((p) => p.name === e.name)!.workers} × ${mib(e.perWorkerBytes)} per worker`).join('; ');
    throw new PhantomaError(
      ERRORS.MEMORY_BUDGET_EXCEEDED,
      `the configured pools need about ${mib(total)} when warm but the memory budget is ${mib(budget)} (${parts}); lower a model's pool.size or contextSize, drop a model, or raise inference.memoryBudgetBytes`,
      { details: { neededBytes: total, budgetBytes: budget } },
    );
  }
  return estimates;
}
