// Benchmark: the sealed path against the plain path end to end on one real node (warden-isolated workers,
// keyd from a vault, tiny model, 1 thread), alternating A/B: a 4 KiB prompt, streamed, 8 tokens, greedy.
// Time is measured from sending the request to the last content chunk (not the receipt), and the pool is
// let refill between requests so neither arm waits for a worker start. The client is a process of its own
// (bench/sealed-e2e-client.ts), as a real client is. Root (the warden).
//   . scripts/env.sh && node bench/sealed-e2e.bench.ts [--iterations 30]
import { parseArgs } from 'node:util';
import { fork } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { validateConfig } from '../src/config/load.ts';
import { startNode } from '../src/main.ts';
import { createLogger } from '../src/logger.ts';
import { makeVaultContents, addClient, identityFingerprint, rawEd25519Public } from '../src/vault/contents.ts';
import { createVault } from '../src/vault/store.ts';
import { projectRoot } from '../src/paths.ts';
import { pairedReport } from './stats.ts';

const { values } = parseArgs({ options: { iterations: { type: 'string', default: '30' } } });
const N = Number(values.iterations);
const root = projectRoot();
const dir = mkdtempSync(join(tmpdir(), 'phantoma-sealed-bench-'));
const alice = generateKeyPairSync('ed25519');
const now = new Date();
const contents = addClient(makeVaultContents({ now, requestKeyValidityMs: 86_400_000 }), 'alice', rawEd25519Public(alice.publicKey), now);
createVault(join(dir, 'vault.phv'), { kind: 'passphrase', secret: Buffer.from('bench') }, { log2N: 10, r: 8, p: 1 }, contents);
const r = validateConfig({
  stateDir: join(dir, 'state'),
  cacheDir: join(root, '.cache'),
  logLevel: 'warn',
  gateway: { host: '127.0.0.1', port: 0, metricsPort: 0, tls: 'off', auth: 'api-keys', rateLimitPerMinute: 100000, maxConcurrentPerKey: 8 },
  pool: { size: 2, maxActive: 1 },
  inference: { threads: 1, contextSize: 4096 },
  warden: { start: true, socket: join(dir, 'warden.sock'), cgroupName: `phantoma-sealed-bench-${process.pid}` },
  vault: { path: join(dir, 'vault.phv'), keydSocket: join(dir, 'keyd', 'keyd.sock') },
});
if (!r.ok) throw new Error(JSON.stringify(r.issues));
const node = await startNode(r.config, { logger: createLogger({ level: 'warn' }), vaultEnv: { ...process.env, PHANTOMA_VAULT_PASSPHRASE: 'bench' } });
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
const answers: Array<(m: { ms?: number; error?: string; ready?: boolean }) => void> = [];
client.on('message', (m: { ms?: number; error?: string; ready?: boolean }) => answers.shift()?.(m));
const next = (): Promise<{ ms?: number; error?: string; ready?: boolean }> => new Promise((res) => answers.push(res));
await next(); // ready
async function run(arm: 'plain' | 'sealed'): Promise<number> {
  const answer = next();
  client.send({ arm });
  const m = await answer;
  if (m.ms === undefined) throw new Error(`the ${arm} request failed: ${m.error}`);
  return m.ms;
}
const plain = (): Promise<number> => run('plain');
const sealed = (): Promise<number> => run('sealed');

const samples = { plain: [] as number[], sealed: [] as number[] };
for (let i = 0; i < N + 3; i++) {
  await full();
  const p = await plain();
  await full();
  const s = await sealed();
  if (i >= 3) {
    samples.plain.push(p);
    samples.sealed.push(s);
  }
}
// The prompt's evaluation varies by a few ms from one request to the next on this 2-vCPU VM, far more than
// the sealed path adds, so one median of N pairs moves by about a millisecond between runs. The report gives
// a 95 % interval for the paired median (bootstrap over the pairs, fixed seed) and a 25 %-trimmed mean;
// bench/sealed-e2e-pool.ts pools the pairs of several runs.
const report = { date: new Date().toISOString(), iterations: N, promptBytes: prompt.length, ...pairedReport(samples.plain, samples.sealed) };
const [ciLow, ciHigh] = report.addedP50Ci95Ms;
console.log(JSON.stringify(report, null, 2));
console.log(`\nto the last content chunk, 4 KiB prompt, 8 tokens, ${N} pairs: plain p50 ${report.plainP50Ms.toFixed(1)} ms, sealed p50 ${report.sealedP50Ms.toFixed(1)} ms (difference ${report.p50DifferenceMs.toFixed(2)} ms); per pair sealed adds p50 ${report.addedP50Ms.toFixed(2)} ms (95 % CI ${ciLow.toFixed(2)}-${ciHigh.toFixed(2)}), trimmed mean ${report.addedTrimmedMeanMs.toFixed(2)}, p95 ${report.addedP95Ms.toFixed(2)} ms`);
mkdirSync(join(root, 'bench', 'results'), { recursive: true });
// The pairs themselves too, so runs can be pooled (bench/README.md).
const round2 = (xs: number[]): number[] => xs.map((x) => Math.round(x * 100) / 100);
writeFileSync(join(root, 'bench', 'results', 'sealed-e2e.json'), JSON.stringify({ ...report, pairs: { plainMs: round2(samples.plain), sealedMs: round2(samples.sealed) } }) + '\n');
client.send({ arm: 'exit' });
await new Promise((res) => client.once('exit', res));
await node.close();
rmSync(dir, { recursive: true, force: true });
