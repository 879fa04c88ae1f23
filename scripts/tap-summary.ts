// Reads tap's raw TAP stream on stdin, echoes it, and ends with the line "N passed, N failed" counting
// leaf assertions. A skipped or todo test counts as a failure of the suite (a test that needs root, BPF,
// Docker or Postgres must run, not skip), and so does a run that executed no test at all.
import { Parser } from 'tap-parser';
import type { Result } from 'tap-parser';

let passed = 0;
let failed = 0;
let skipped = 0;
const failures: string[] = [];

function watch(parser: Parser, path: string[]): { leafFailures: number } {
  const state = { leafFailures: 0 };
  let openChild: { name: string; state: { leafFailures: number } } | undefined;
  parser.on('child', (child: Parser) => {
    openChild = { name: child.name, state: watch(child, [...path, child.name]) };
  });
  parser.on('assert', (r: Result) => {
    const name = [...path, r.name].filter(Boolean).join(' › ');
    if (openChild) {
      // The summary line of a subtest: its leaves were counted already, unless the subtest itself failed
      // without a failing leaf (an exception, a timeout, a plan mismatch).
      const child = openChild;
      openChild = undefined;
      if (!r.ok && child.state.leafFailures === 0) {
        failed++;
        state.leafFailures++;
        failures.push(name);
      }
      state.leafFailures += child.state.leafFailures;
      if (r.skip || r.todo) {
        skipped++;
        failures.push(`${name} (skipped: ${String(r.skip || r.todo)})`);
      }
      return;
    }
    if (r.skip || r.todo) {
      skipped++;
      failures.push(`${name} (skipped: ${String(r.skip || r.todo)})`);
    } else if (r.ok) {
      passed++;
    } else {
      failed++;
      state.leafFailures++;
      failures.push(name);
    }
  });
  return state;
}

const root = new Parser();
watch(root, []);
process.stdin.on('data', (chunk) => {
  process.stdout.write(chunk);
  root.write(chunk);
});
process.stdin.on('end', () => {
  root.end();
  const total = passed + failed + skipped;
  if (failures.length > 0) {
    process.stdout.write(`\nnot passing (${failures.length}):\n${failures.map((f) => `  - ${f}`).join('\n')}\n`);
  }
  if (skipped > 0) process.stdout.write(`${skipped} skipped: a skipped test fails the suite\n`);
  if (total === 0) process.stdout.write('no test ran: that fails the suite\n');
  process.stdout.write(`\n${passed} passed, ${failed + skipped} failed\n`);
  process.exitCode = failed + skipped > 0 || total === 0 ? 1 : 0;
});
