// Benchmark: the sealed path against the plain path end to end on one real node (warden-isolated workers,
// keyd from a vault, tiny model, 1 thread), alternating A/B: a 4 KiB prompt, streamed, 8 tokens, greedy.
// Time is measured from sending the request to the last content chunk (not the receipt), and the pool is
// let refill between requests so neither arm waits for a worker start. The client is a process of its own
// (bench/sealed-e2e-client.ts), as a real client is. Root (the warden).
// On a noisy VM the model's evaluation of the prompt and tokens varies by tens of ms from one request to
// the next, far more than the sealed path adds. The worker reports each request's model time (input handed
// to the model to its last token: workerModelMs in the node's request log line), and the report also gives
// both arms with it taken out: a control variate, the same evaluation of the same prompt in both arms, so
// it cancels in expectation while its noise goes. What stays is the node's and the client's own work
// (request, job hand-over, keyd, opening the body, the last chunk's way out), sealed or not. The sealed
// arm's chunk sealing runs beside the token evaluations; it would be taken out only where it delayed a
// token, which the per-arm mean model times check.
//   . scripts/env.sh && node bench/sealed-e2e.bench.ts [--iterations 30]
import { parseArgs } from 'node:util';
import { fork } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { Writable } from 'node:stream';
import { join } from 'node:path';
import { validateConfig } from '../src/config/load.ts';
import { startNode } from '../src/main.ts';
import { createLogger } from '../src/logger.ts';
import type { DestinationStream } from 'pino';
import { makeVaultContents, addClient, identityFingerprint, rawEd25519Public } from '../src/vault/contents.ts';
import { createVault } from '../src/vault/store.ts';
import { projectRoot } from '../src/paths.ts';
import { pairedReport } from './stats.ts';

// --stepped: run by bench/sealed-e2e-ab.ts, which compares two source trees in one run; each pair then
// waits for its turn (an IPC message) and the pool has refilled before the turn is handed back, so the
// other tree's node runs its pair on an idle machine. --out: where the report goes.
const { values } = parseArgs({ options: { iterations: { type: 'string', default: '30' }, stepped: { type: 'boolean', default: false }, out: { type: 'string' } } });
const N = Number(values.iterations);
const stepped = values.stepped && process.send !== undefined;
const root = projectRoot();
const dir = mkdtempSync(join(tmpdir(), 'phantoma-sealed-bench-'));
const alice = generateKeyPairSync('ed25519');
const now = new Date();
const contents = addClient(makeVaultContents({ now, requestKeyValidityMs: 86_400_000 }), 'alice', rawEd25519Public(alice.publicKey), now);
createVault(join(dir, 'vault.phv'), { kind: 'passphrase', secret: Buffer.from('bench') }, { log2N: 10, r: 8, p: 1 }, contents);
const r = validateConfig({
  stateDir: join(dir, 'state'),
  cacheDir: join(root, '.cache'),
  logLevel: 'info',
  gateway: { host: '127.0.0.1', port: 0, metricsPort: 0, tls: 'off', auth: 'api-keys', rateLimitPerMinute: 100000, maxConcurrentPerKey: 8 },
  pool: { size: 2, maxActive: 1 },
  inference: { threads: 1, contextSize: 4096 },
  warden: { start: true, socket: join(dir, 'warden.sock'), cgroupName: `phantoma-sealed-bench-${process.pid}` },
  vault: { path: join(dir, 'vault.phv'), keydSocket: join(dir, 'keyd', 'keyd.sock') },
});
if (!r.ok) throw new Error(JSON.stringify(r.issues));
// The request log lines carry each worker's model time; everything else at warn and above goes
// to stderr as before.
const modelTimeOf = new Map<string, { promptEvalMs: number; modelMs: number }>();
const logSink = new Writable({
  write(chunk: Buffer, _enc, done): void {
    for (const line of String(chunk).split('\n')) {
      if (line.length === 0) continue;
      const entry = JSON.parse(line) as { level: number; reqId?: string; workerPromptEvalMs?: number; workerModelMs?: number };
      if (entry.reqId !== undefined && entry.workerPromptEvalMs !== undefined && entry.workerModelMs !== undefined) {
        modelTimeOf.set(entry.reqId, { promptEvalMs: entry.workerPromptEvalMs, modelMs: entry.workerModelMs });
      }
      else if (entry.level >= 40) process.stderr.write(line + '\n');
    }
    done();
  },
});
const node = await startNode(r.config, { logger: createLogger({ level: 'info', destination: logSink as unknown as DestinationStream }), vaultEnv: { ...process.env, PHANTOMA_VAULT_PASSPHRASE: 'bench' } });
const apiKey = node.apiKeys!.create('bench').key;
const pool = node.models[0]!.pool;
const full = async (): Promise<void> => {
  const deadline = Date.now() + 60_000;
  while (pool.stats().ready < 2 || pool.stats().busy > 0) {
    if (Date.now() > deadline) throw new Error('pool did not refill');
    await new Promise((res) => setTimeout(res, 10));
  }
};
const prompt = 'lorem ipsum dolor sit amet '.repeat(152).slice(0, 4096);
// The client runs in its own process (bench/sealed-e2e-client.ts), as a real one does.
const client = fork(join(root, 'bench', 'sealed-e2e-client.ts'), {
  env: { ...process.env, PHANTOMA_BENCH_CLIENT: JSON.stringify({ url: node.url, apiKey, identityPin: identityFingerprint(Buffer.from(contents.identity.publicKey, 'base64')), clientKeyPem: alice.privateKey.export({ format: 'pem', type: 'pkcs8' }) }) },
  stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
});
type ClientAnswer = { ms?: number; requestId?: string; error?: string; ready?: boolean };
const answers: Array<(m: ClientAnswer) => void> = [];
client.on('message', (m: ClientAnswer) => answers.shift()?.(m));
const next = (): Promise<ClientAnswer> => new Promise((res) => answers.push(res));
await next(); // ready
async function run(arm: 'plain' | 'sealed'): Promise<{ ms: number; requestId: string }> {
  const answer = next();
  client.send({ arm });
  const m = await answer;
  if (m.ms === undefined || m.requestId === undefined) throw new Error(`the ${arm} request failed: ${m.error}`);
  return { ms: m.ms, requestId: m.requestId };
}

const turns: Array<() => void> = [];
if (stepped) process.on('message', (m: { turn?: number }) => void (m.turn !== undefined && turns.shift()?.()));
const myTurn = (): Promise<void> => new Promise((res) => turns.push(res));
if (stepped) process.send!({ ready: true });

const timed = { plain: [] as Array<{ ms: number; requestId: string }>, sealed: [] as Array<{ ms: number; requestId: string }> };
for (let i = 0; i < N + 3; i++) {
  if (stepped) await myTurn();
  await full();
  const p = await run('plain');
  await full();
  const s = await run('sealed');
  if (stepped) {
    await full();
    process.send!({ done: i });
  }
  if (i >= 3) {
    timed.plain.push(p);
    timed.sealed.push(s);
  }
}
await full(); // the last request's log line is written by now
const modelTime = (t: { requestId: string }): { promptEvalMs: number; modelMs: number } => {
  const m = modelTimeOf.get(t.requestId);
  if (m === undefined) throw new Error(`no model time was logged for request ${t.requestId}`);
  return m;
};
const samples = { plain: timed.plain.map((t) => t.ms), sealed: timed.sealed.map((t) => t.ms) };
const models = { plain: timed.plain.map((t) => modelTime(t).modelMs), sealed: timed.sealed.map((t) => modelTime(t).modelMs) };
const evals = { plain: timed.plain.map((t) => modelTime(t).promptEvalMs), sealed: timed.sealed.map((t) => modelTime(t).promptEvalMs) };
const mean = (xs: readonly number[]): number => xs.reduce((a, b) => a + b, 0) / xs.length;
const withoutModel = { plain: samples.plain.map((ms, i) => ms - models.plain[i]!), sealed: samples.sealed.map((ms, i) => ms - models.sealed[i]!) };
// Both readings (as measured, and with each request's model time taken out) give a 95 % interval for the
// paired median (bootstrap over the pairs, fixed seed) and a 25 %-trimmed mean; one run's median still
// moves between runs, and bench/sealed-e2e-pool.ts pools the pairs of several.
const adjusted = pairedReport(withoutModel.plain, withoutModel.sealed);
const report = {
  date: new Date().toISOString(),
  iterations: N,
  promptBytes: prompt.length,
  ...pairedReport(samples.plain, samples.sealed),
  /** The check on the control variate: both arms evaluate the same prompt, so these means should agree. */
  modelMeanMs: { plain: mean(models.plain), sealed: mean(models.sealed) },
  promptEvalMeanMs: { plain: mean(evals.plain), sealed: mean(evals.sealed) },
  /** Each request's time with its own model time taken out. */
  withoutModelTime: adjusted,
};
const [ciLow, ciHigh] = report.addedP50Ci95Ms;
console.log(JSON.stringify(report, null, 2));
console.log(`without each request's model time (plain ${report.modelMeanMs.plain.toFixed(1)} ms, sealed ${report.modelMeanMs.sealed.toFixed(1)} ms on average): sealed p50 minus plain p50 ${adjusted.p50DifferenceMs.toFixed(2)} ms; per pair p50 ${adjusted.addedP50Ms.toFixed(2)} ms (95 % CI ${adjusted.addedP50Ci95Ms[0].toFixed(2)}-${adjusted.addedP50Ci95Ms[1].toFixed(2)}), trimmed mean ${adjusted.addedTrimmedMeanMs.toFixed(2)} ms`);
console.log(`\nto the last content chunk, 4 KiB prompt, 8 tokens, ${N} pairs: plain p50 ${report.plainP50Ms.toFixed(1)} ms, sealed p50 ${report.sealedP50Ms.toFixed(1)} ms (difference ${report.p50DifferenceMs.toFixed(2)} ms); per pair sealed adds p50 ${report.addedP50Ms.toFixed(2)} ms (95 % CI ${ciLow.toFixed(2)}-${ciHigh.toFixed(2)}), trimmed mean ${report.addedTrimmedMeanMs.toFixed(2)}, p95 ${report.addedP95Ms.toFixed(2)} ms`);
mkdirSync(join(root, 'bench', 'results'), { recursive: true });
// The pairs themselves too, so runs can be pooled (bench/README.md).
const round2 = (xs: number[]): number[] => xs.map((x) => Math.round(x * 100) / 100);
writeFileSync(values.out ?? join(root, 'bench', 'results', 'sealed-e2e.json'), JSON.stringify({ ...report, pairs: { plainMs: round2(samples.plain), sealedMs: round2(samples.sealed), plainModelMs: round2(models.plain), sealedModelMs: round2(models.sealed) } }) + '\n');
client.send({ arm: 'exit' });
await new Promise((res) => client.once('exit', res));
await node.close();
rmSync(dir, { recursive: true, force: true });
if (stepped) process.disconnect();
