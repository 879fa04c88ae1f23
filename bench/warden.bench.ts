// Benchmark: what isolation costs. (1) SPAWN and END + verify latency of the warden, p50/p95, for a
// minimal isolated worker (a Node script that says hello and waits), with the warden's own END timing;
// (2) sustained one-shot requests per second through a real node (tiny model, warm pool of 2, warden
// backend) against the same node with the unisolated process backend. Loopback only. Needs root.
//
// Run: . scripts/env.sh && node bench/warden.bench.ts [--spawns N] [--requests N]
import { parseArgs } from 'node:util';
import { mkdtempSync, writeFileSync, chmodSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createLogger } from '../src/logger.ts';
import { startWardenProcess } from '../src/ephemeral/warden-process.ts';
import { createWardenClient } from '../src/ephemeral/warden-client.ts';
import { validateConfig } from '../src/config/load.ts';
import { startNode } from '../src/main.ts';
import { projectRoot } from '../src/paths.ts';

const { values } = parseArgs({ options: { spawns: { type: 'string', default: '40' }, requests: { type: 'string', default: '40' } } });
const SPAWNS = Number(values.spawns);
const REQUESTS = Number(values.requests);
const logger = createLogger({ level: 'warn' });
const root = projectRoot();

function q(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p * (s.length - 1) + 0.5))]!;
}

// ---- (1) spawn and end ----
const fix = mkdtempSync('/var/tmp/phantoma-bench-');
chmodSync(fix, 0o755);
const script = join(fix, 'hello.mjs');
writeFileSync(script, "process.stdout.write('hello\\n'); process.stdin.resume();\n");
chmodSync(script, 0o644);
const sockDir = mkdtempSync(join(tmpdir(), 'phantoma-bench-sock-'));
const warden = await startWardenProcess({
  socketPath: join(sockDir, 'w.sock'),
  clientUid: 0,
  cgroupName: `phantoma-bench-${process.pid}`,
  workerExec: process.execPath,
  workerScript: script,
  workerArgs: [],
  expose: [],
  uidRange: { from: 61000, to: 61999 },
  memoryMaxBytes: 256 << 20,
  pidsMax: 64,
  tmpfsBytes: 16 << 20,
  logger,
});
const client = createWardenClient({ socketPath: join(sockDir, 'w.sock') });
const spawnMs: number[] = [];
const firstByteMs: number[] = [];
const endClientMs: number[] = [];
const endWardenMs: number[] = [];
let unverified = 0;
for (let i = 0; i < SPAWNS; i++) {
  const id = (BigInt(Date.now()) * 1000n + BigInt(i)).toString(16).padStart(16, '0').slice(-16);
  const t0 = performance.now();
  const w = await client.spawn({ id, uid: 61000 + (i % 500), gid: 61000 + (i % 500), nice: 0, exec: process.execPath, args: [script] });
  const t1 = performance.now();
  // First byte from the isolated worker (bounded: the bytes may already have come with the reply header).
  if (w.head.length === 0) await Promise.race([new Promise<void>((resolve) => w.stdio.once('data', () => resolve())), new Promise<void>((r) => setTimeout(r, 3000))]);
  const t2 = performance.now();
  const end = await client.end(id);
  const t3 = performance.now();
  spawnMs.push(t1 - t0);
  firstByteMs.push(t2 - t0);
  endClientMs.push(t3 - t2);
  process.stderr.write(`spawn ${i + 1}/${SPAWNS}\n`);
  endWardenMs.push(end.ms);
  if (!end.verified) unverified++;
  w.stdio.destroy();
  w.stderr.destroy();
}
await warden.stop();
rmSync(fix, { recursive: true, force: true });
rmSync(sockDir, { recursive: true, force: true });

// ---- (2) sustained one-shot requests per second ----
async function sustained(backend: 'warden' | 'process'): Promise<{ rps: number; p50: number; p95: number }> {
  const state = mkdtempSync(join(tmpdir(), 'phantoma-bench-node-'));
  mkdirSync(state, { recursive: true });
  const r = validateConfig({
    stateDir: state,
    cacheDir: join(root, '.cache'),
    logLevel: 'warn',
    gateway: { host: '127.0.0.1', port: 0, metricsPort: 0, tls: 'off', auth: 'none', maxQueue: 1000 },
    pool: { size: 2, maxActive: 1 },
    inference: { threads: 1 },
    workers: { backend },
    warden: { start: true, socket: join(state, 'w.sock'), cgroupName: `phantoma-bench-rps-${process.pid}` },
  });
  if (!r.ok) throw new Error(JSON.stringify(r.issues));
  const node = await startNode(r.config, { logger });
  while (node.models[0]!.pool.stats().ready < 2) await new Promise((res) => setTimeout(res, 20));
  const lat: number[] = [];
  const t0 = performance.now();
  for (let i = 0; i < REQUESTS; i++) {
    const s = performance.now();
    const res = await fetch(node.url + '/v1/chat/completions', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'hello' }], max_tokens: 8, seed: i }),
    });
    if (res.status !== 200) throw new Error(`HTTP ${res.status}`);
    await res.text();
    lat.push(performance.now() - s);
  }
  const rps = REQUESTS / ((performance.now() - t0) / 1000);
  await node.close();
  rmSync(state, { recursive: true, force: true });
  return { rps, p50: q(lat, 0.5), p95: q(lat, 0.95) };
}
const isolated = await sustained('warden');
const plain = await sustained('process');

const report = {
  date: new Date().toISOString(),
  spawns: SPAWNS,
  spawnMs: { p50: q(spawnMs, 0.5), p95: q(spawnMs, 0.95) },
  spawnToFirstByteMs: { p50: q(firstByteMs, 0.5), p95: q(firstByteMs, 0.95) },
  endVerifyClientMs: { p50: q(endClientMs, 0.5), p95: q(endClientMs, 0.95) },
  endVerifyWardenMs: { p50: q(endWardenMs, 0.5), p95: q(endWardenMs, 0.95) },
  unverified,
  sustained: { requests: REQUESTS, warden: isolated, process: plain, ratio: isolated.rps / plain.rps },
};
console.log(JSON.stringify(report, null, 2));
mkdirSync(join(root, 'bench', 'results'), { recursive: true });
writeFileSync(join(root, 'bench', 'results', 'warden.json'), JSON.stringify(report, null, 2) + '\n');
