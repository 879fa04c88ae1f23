// One model's pool settings (issue 15): its own `pool` entry in the config where given, the node-wide
// pool.* and inference.* otherwise; the context never exceeds what the model was trained for.
import { availableParallelism } from 'node:os';
import type { Config } from '../config/schema.ts';
import type { GgufSummary } from './gguf-reader.ts';
import { PhantomaError, ERRORS } from '../errors.ts';

export interface ModelPoolSettings {
  size: number;
  maxActive: number;
  threads: number;
  batchSize: number;
  contextSize: number;
  lazy: boolean;
  idleMs?: number;
}

export function trainedContextLength(summary: GgufSummary): number | undefined {
  const v = summary.metadata.get(`${String(summary.metadata.get('general.architecture'))}.context_length`);
  return v === undefined ? undefined : Number(v);
}

export function modelPoolSettings(config: Readonly<Config>, name: string, summary: GgufSummary): ModelPoolSettings {
  const own = config.models.find((m) => m.name === name)?.pool ?? {};
  const threads = own.threads ?? config.inference.threads;
  if (own.threads !== undefined && own.threads > availableParallelism()) {
    throw new PhantomaError(ERRORS.CONFIG_INVALID, `model ${name}: pool.threads ${own.threads} is more than this host's ${availableParallelism()} cores`);
  }
  const wanted = own.contextSize ?? config.inference.contextSize;
  return {
    size: own.size ?? config.pool.size,
    maxActive: own.maxActive ?? config.pool.maxActive,
    threads,
    batchSize: own.batchSize ?? config.inference.batchSize,
    contextSize: Math.min(wanted, trainedContextLength(summary) ?? wanted),
    lazy: own.load === 'lazy',
    ...(own.idleSeconds !== undefined ? { idleMs: own.idleSeconds * 1000 } : {}),
  };
}
