// A/B of the sealed path's cost between two source trees, in one run: each tree runs its own
// bench/sealed-e2e.bench.ts (its own node, keyd, warden and client), and the two take turns pair by pair
// (A B B A …, so a drift of the host's load falls on both), each handing the turn back only once its pool
// has refilled. Two runs one after the other differ by ±0.5 ms on a noisy VM; here both trees see the
// same minutes, and what is compared is each tree's sealed-minus-plain with each request's model time
// taken out (bench/README.md). Root (the warden). Each tree needs its set-up (node_modules, dist/, the
// tiny model): `bash scripts/setup.sh` there.
//   . scripts/env.sh && node bench/sealed-e2e-ab.ts --a TREE --b TREE [--iterations 100]
import { parseArgs } from 'node:util';
import { fork, type ChildProcess } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { projectRoot } from '../src/paths.ts';
import { bootstrapMedian, pairedReport, quantile } from './stats.ts';

const { values } = parseArgs({ options: { a: { type: 'string' }, b: { type: 'string' }, iterations: { type: 'string', default: '100' } } });
if (!values.a || !values.b) {
  console.error('usage: node bench/sealed-e2e-ab.ts --a TREE --b TREE [--iterations N]');
  process.exit(2);
}
const N = Number(values.iterations);
if (!Number.isInteger(N) || N < 5) {
  console.error('--iterations: a whole number of at least 5');
  process.exit(2);
}
const resultsDir = join(projectRoot(), 'bench', 'results');
mkdirSync(resultsDir, { recursive: true });

interface Arm {
  name: 'a' | 'b';
  tree: string;
  out: string;
  child: ChildProcess;
  next(): Promise<{ ready?: boolean; done?: number }>;
}
const arms: Arm[] = [];
process.once('SIGINT', () => {
  for (const arm of arms) arm.child.kill('SIGTERM');
  process.exit(130);
});
function start(name: 'a' | 'b', tree: string): Arm {
  const out = join(resultsDir, `sealed-e2e-ab-${name}.json`);
  const child = fork(join(tree, 'bench', 'sealed-e2e.bench.ts'), ['--stepped', '--iterations', String(N), '--out', out], { cwd: tree, stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
  const waiting: Array<(m: { ready?: boolean; done?: number }) => void> = [];
  child.on('message', (m: { ready?: boolean; done?: number }) => waiting.shift()?.(m));
  child.once('exit', (code) => {
    if (code !== 0) {
      console.error(`tree ${name} (${tree}): its bench exited with ${code}`);
      // The other tree's bench (its node, warden and workers) ends with it.
      for (const other of arms) other.child.kill('SIGTERM');
      process.exit(1);
    }
  });
  const arm: Arm = { name, tree, out, child, next: () => new Promise((res) => waiting.push(res)) };
  arms.push(arm);
  return arm;
}
const a = start('a', resolve(values.a));
const b = start('b', resolve(values.b));
await Promise.all([a.next(), b.next()]);
for (let i = 0; i < N + 3; i++) {
  for (const arm of i % 2 === 0 ? [a, b] : [b, a]) {
    const done = arm.next();
    arm.child.send({ turn: i });
    await done;
  }
  if (i % 10 === 9) console.error(`pair ${i + 1} of ${N + 3}`);
}
await Promise.all([a, b].map((arm) => new Promise((res) => arm.child.once('exit', res))));

interface Result {
  modelMeanMs: { plain: number; sealed: number };
  withoutModelTime: ReturnType<typeof pairedReport>;
  pairs: { plainMs: number[]; sealedMs: number[]; plainModelMs: number[]; sealedModelMs: number[] };
}
const added = (r: Result): number[] => r.pairs.sealedMs.map((s, i) => s - r.pairs.sealedModelMs[i]! - (r.pairs.plainMs[i]! - r.pairs.plainModelMs[i]!));
const ra = JSON.parse(readFileSync(a.out, 'utf8')) as Result;
const rb = JSON.parse(readFileSync(b.out, 'utf8')) as Result;
const reportOf = (r: Result) => ({ modelMeanMs: r.modelMeanMs, ...r.withoutModelTime });
// B's added cost minus A's, turn by turn (the two pairs of one turn ran within a few seconds of each other).
const da = added(ra);
const db = added(rb);
const bMinusA = db.map((x, i) => x - da[i]!);
const report = {
  date: new Date().toISOString(),
  iterations: N,
  a: { tree: a.tree, ...reportOf(ra) },
  b: { tree: b.tree, ...reportOf(rb) },
  /** Per turn, B's sealed-minus-plain minus A's (model time taken out): its median and a 95 % interval. */
  bMinusA: { p50Ms: quantile(bMinusA, 0.5), ci95Ms: bootstrapMedian(bMinusA) },
};
writeFileSync(join(resultsDir, 'sealed-e2e-ab.json'), JSON.stringify(report, null, 2) + '\n');
const line = (name: string, r: ReturnType<typeof reportOf>): string =>
  `${name}: sealed adds p50 ${r.p50DifferenceMs.toFixed(2)} ms, per pair ${r.addedP50Ms.toFixed(2)} (95 % CI ${r.addedP50Ci95Ms[0].toFixed(2)}-${r.addedP50Ci95Ms[1].toFixed(2)}), model ${r.modelMeanMs.plain.toFixed(0)}/${r.modelMeanMs.sealed.toFixed(0)} ms`;
console.log(line(`A ${a.tree}`, report.a));
console.log(line(`B ${b.tree}`, report.b));
console.log(`B minus A, per turn: p50 ${report.bMinusA.p50Ms.toFixed(2)} ms (95 % CI ${report.bMinusA.ci95Ms[0].toFixed(2)}-${report.bMinusA.ci95Ms[1].toFixed(2)})`);
