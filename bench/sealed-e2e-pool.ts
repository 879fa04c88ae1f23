// Pools the pairs of several sealed-e2e runs (bench/results/sealed-e2e*.json written by
// bench/sealed-e2e.bench.ts) into one report: one run's median moves by about a millisecond.
//   . scripts/env.sh && node bench/sealed-e2e-pool.ts RESULT.json [RESULT.json ...]
import { readFileSync } from 'node:fs';
import { pairedReport } from './stats.ts';

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error('usage: node bench/sealed-e2e-pool.ts RESULT.json [RESULT.json ...]');
  process.exit(2);
}
const plain: number[] = [];
const sealed: number[] = [];
for (const f of files) {
  const r = JSON.parse(readFileSync(f, 'utf8')) as { pairs?: { plainMs: number[]; sealedMs: number[] } };
  if (!r.pairs || r.pairs.plainMs.length !== r.pairs.sealedMs.length) {
    console.error(`${f}: no pairs in it (written by an older sealed-e2e.bench.ts?)`);
    process.exit(2);
  }
  plain.push(...r.pairs.plainMs);
  sealed.push(...r.pairs.sealedMs);
}
console.log(JSON.stringify({ runs: files.length, ...pairedReport(plain, sealed) }, null, 2));
