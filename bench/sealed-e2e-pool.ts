// Pools the pairs of several sealed-e2e runs (bench/results/sealed-e2e*.json written by
// bench/sealed-e2e.bench.ts) into one report: one run's median moves by about a millisecond. Runs that
// recorded each request's model time are also pooled with it taken out (the bench's control variate).
//   . scripts/env.sh && node bench/sealed-e2e-pool.ts RESULT.json [RESULT.json ...]
import { readFileSync } from 'node:fs';
import { pairedReport } from './stats.ts';

interface Pairs {
  plainMs: number[];
  sealedMs: number[];
  plainModelMs?: number[];
  sealedModelMs?: number[];
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error('usage: node bench/sealed-e2e-pool.ts RESULT.json [RESULT.json ...]');
  process.exit(2);
}
const plain: number[] = [];
const sealed: number[] = [];
const adjusted = { plain: [] as number[], sealed: [] as number[], runs: 0 };
for (const f of files) {
  const r = JSON.parse(readFileSync(f, 'utf8')) as { pairs?: Pairs };
  const p = r.pairs;
  if (!p || p.plainMs.length !== p.sealedMs.length) {
    console.error(`${f}: no pairs in it (written by an older sealed-e2e.bench.ts?)`);
    process.exit(2);
  }
  plain.push(...p.plainMs);
  sealed.push(...p.sealedMs);
  if (p.plainModelMs?.length === p.plainMs.length && p.sealedModelMs?.length === p.sealedMs.length) {
    adjusted.runs++;
    adjusted.plain.push(...p.plainMs.map((ms, i) => ms - p.plainModelMs![i]!));
    adjusted.sealed.push(...p.sealedMs.map((ms, i) => ms - p.sealedModelMs![i]!));
  }
}
const withoutModelTime = adjusted.runs > 0 ? { withoutModelTime: { runs: adjusted.runs, ...pairedReport(adjusted.plain, adjusted.sealed) } } : {};
console.log(JSON.stringify({ runs: files.length, ...pairedReport(plain, sealed), ...withoutModelTime }, null, 2));
