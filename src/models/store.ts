// The model directory (issue 10): models pulled onto the node, `<stateDir>/models/<name>.gguf` each with a
// manifest `<name>.json` written after the file is in place (so a manifest always names a complete,
// verified file). A manifest records where the model came from: a URL pull today, a TUF target of a signed
// release (the updates issue) by the same shape ({ kind: 'tuf', repository, target }). The gateway scans
// this directory and serves what it finds (src/models/watch.ts), and records the names it serves in
// `.served.json` so `model pull` and `model remove` can refuse to replace or delete a model in use.
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { ERRORS, ModelError } from '../errors.ts';
import { writeFileAtomic } from '../util/atomic-file.ts';
import type { GgufSummary } from './gguf-reader.ts';
import { processExists } from '../util/process.ts';

export const MODEL_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$/;

export type ModelSource = { kind: 'url'; url: string } | { kind: 'tuf'; repository: string; target: string };

export interface ModelManifest {
  v: 1;
  name: string;
  file: string;
  sha256: string;
  bytes: number;
  source: ModelSource;
  architecture: string;
  quantisation: string;
  contextLength: number;
  addedAt: string;
}

export function modelDirOf(stateDir: string): string {
  return join(stateDir, 'models');
}

export function modelFile(dir: string, name: string): string {
  return join(dir, `${name}.gguf`);
}

function manifestFile(dir: string, name: string): string {
  return join(dir, `${name}.json`);
}

const FILE_TYPES: Record<number, string> = { 0: 'F32', 1: 'F16', 2: 'Q4_0', 3: 'Q4_1', 7: 'Q8_0', 8: 'Q5_0', 9: 'Q5_1', 10: 'Q2_K', 12: 'Q3_K_M', 15: 'Q4_K_M', 17: 'Q5_K_M', 18: 'Q6_K', 32: 'BF16' };
const TENSOR_TYPES: Record<number, string> = { 0: 'F32', 1: 'F16', 2: 'Q4_0', 3: 'Q4_1', 8: 'Q8_0', 30: 'BF16' };

/** Quantisation and context length as the file states them. */
export function describeGguf(s: GgufSummary): { architecture: string; quantisation: string; contextLength: number } {
  const architecture = String(s.metadata.get('general.architecture') ?? 'unknown');
  const ft = s.metadata.get('general.file_type');
  let quantisation = typeof ft === 'number' ? (FILE_TYPES[ft] ?? `file_type_${ft}`) : '';
  if (!quantisation) {
    const counts = new Map<number, number>();
    for (const t of s.tensors) if (t.dims.length >= 2) counts.set(t.type, (counts.get(t.type) ?? 0) + 1);
    const top = [...counts.entries()].sort((a, b) => b[1] - a[1])[0];
    quantisation = top ? (TENSOR_TYPES[top[0]] ?? `type_${top[0]}`) : 'unknown';
  }
  const ctx = s.metadata.get(`${architecture}.context_length`);
  return { architecture, quantisation, contextLength: typeof ctx === 'number' ? ctx : 0 };
}

export function readManifest(dir: string, name: string): ModelManifest | undefined {
  try {
    const m = JSON.parse(readFileSync(manifestFile(dir, name), 'utf8')) as ModelManifest;
    return m.v === 1 && m.name === name ? m : undefined;
  } catch {
    return undefined;
  }
}

export function writeManifest(dir: string, m: ModelManifest): void {
  writeFileAtomic(manifestFile(dir, m.name), JSON.stringify(m, null, 2) + '\n', 0o644);
}

/** Every pulled model whose manifest and file are both present. */
export function listModels(dir: string): ModelManifest[] {
  if (!existsSync(dir)) return [];
  const out: ModelManifest[] = [];
  for (const f of readdirSync(dir).sort()) {
    if (!f.endsWith('.json') || f.startsWith('.')) continue;
    const m = readManifest(dir, f.slice(0, -5));
    if (m && existsSync(join(dir, m.file))) out.push(m);
  }
  return out;
}

// ---- what the gateway serves (written by the gateway, read by the CLI) ----
const SERVED = '.served.json';

export function writeServed(dir: string, names: readonly string[], pid = process.pid): void {
  mkdirSync(dir, { recursive: true });
  writeFileAtomic(join(dir, SERVED), JSON.stringify({ pid, names: [...names] }) + '\n', 0o644);
}


/** True when a running gateway serves this model from the directory. */
export function isServed(dir: string, name: string): boolean {
  try {
    const s = JSON.parse(readFileSync(join(dir, SERVED), 'utf8')) as { pid: number; names: string[] };
    return Array.isArray(s.names) && s.names.includes(name) && Number.isInteger(s.pid) && processExists(s.pid);
  } catch {
    return false;
  }
}

export function removeModel(dir: string, name: string): ModelManifest {
  const m = readManifest(dir, name);
  if (!m) throw new ModelError(ERRORS.MODEL_NOT_FOUND, `no pulled model named "${name}" in ${dir}`, { details: { model: name } });
  // A running gateway notices at its next scan and stops serving it (its pool is closed).
  // Manifest first: from then on nothing treats the file as a model.
  unlinkSync(manifestFile(dir, name));
  try {
    unlinkSync(join(dir, m.file));
  } catch {
    // already gone
  }
  return m;
}

export function fileBytes(path: string): number {
  try {
    return statSync(path).size;
  } catch {
    return 0;
  }
}
