// Benchmark: the same generation (model, prompt, seed, max tokens, threads) through
//   A   node-llama-cpp in this process (the baseline a user would write), and
//   B   the full Phantoma path: HTTPS gateway → warm one-shot worker → SSE, with and without the
//       persistent-threadpool shim,
// alternating A/B/B' request by request so machine noise spreads over every arm. Also pool memory: the
// PSS (shared pages counted once) of 4 warm workers against 1, and optionally llama-server on the same
// model (LLAMA_SERVER=/path/to/llama-server). Only loopback traffic. Prints a table and writes JSON.
//
// Run: . scripts/env.sh && node bench/gateway.bench.ts [--iterations N] [--max-tokens N] [--model bench|tiny]
// llama-server for the comparison can be built offline from the llama.cpp source that node-llama-cpp ships
// (node_modules/node-llama-cpp/llama/gitRelease.bundle: git clone it, cmake --build --target llama-server);
// its prompt cache is turned off per request so it does the same work as a one-shot worker.
import { parseArgs } from 'node:util';
import { readFileSync, mkdirSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { Agent, fetch as undiciFetch } from 'undici';
import { validateConfig } from '../src/config/load.ts';
import { createLogger } from '../src/logger.ts';
import { startNode, type RunningNode } from '../src/main.ts';
import { ensureTestModel } from '../src/models/test-models.ts';
import { createLlamaRuntime, loadModelFile, createContext, prepareChatWrapper, generateChat } from '../src/models/llama.ts';
import { projectRoot } from '../src/paths.ts';

const { values } = parseArgs({
  options: {
    iterations: { type: 'string', default: '10' },
    'max-tokens': { type: 'string', default: '48' },
    model: { type: 'string', default: 'bench' },
    threads: { type: 'string', default: '2' },
  },
});
const ITERATIONS = Number(values.iterations);
const MAX_TOKENS = Number(values['max-tokens']);
const THREADS = Number(values.threads);
const PROMPT = 'Write a short story about a lighthouse keeper who finds a message in a bottle.';
const SEED = 42;
const CONTEXT = 2048;

const root = projectRoot();
const logger = createLogger({ level: 'warn' });
const modelPath = (await ensureTestModel(values.model!, { cacheDir: join(root, '.cache', 'models') })).path;

interface Sample {
  totalMs: number;
  ttftMs: number;
  decodeTps: number;
  tokens: number;
  text: string;
}

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  const pos = (s.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return s[lo]! + (s[hi]! - s[lo]!) * (pos - lo);
}

// ---- A: in-process node-llama-cpp, model and context created once (as a warm worker has them) ----
const runtime = await createLlamaRuntime({ logger });
const loaded = await loadModelFile(runtime, modelPath);
const context = await createContext(loaded.model, { contextSize: CONTEXT, threads: THREADS, batchSize: 512 });
const chatWrapper = prepareChatWrapper(loaded.model);

async function runInProcess(): Promise<Sample> {
  const t0 = performance.now();
  let first = 0;
  let last = 0;
  let chunks = 0;
  const r = await generateChat(context, [{ role: 'user', content: PROMPT }], {
    chatWrapper,
    maxTokens: MAX_TOKENS,
    seed: SEED,
    temperature: 0,
    onText: () => {
      last = performance.now();
      first ||= last;
      chunks++;
    },
  });
  return { totalMs: last - t0, ttftMs: first - t0, decodeTps: (r.completionTokens - 1) / ((last - first) / 1000), tokens: r.completionTokens, text: r.text };
}

// ---- B: a real node over HTTPS ----
let benchNodes = 0;
async function startBenchNode(poolSize: number, persistentThreadpool: boolean): Promise<{ node: RunningNode; key: string; dispatcher: Agent; state: string }> {
  const state = mkdtempSync(join(tmpdir(), 'phantoma-bench-'));
  const r = validateConfig({
    stateDir: state,
    cacheDir: join(root, '.cache'),
    models: [{ name: 'm', builtin: values.model }],
    defaultModel: 'm',
    logLevel: 'warn',
    gateway: { host: '127.0.0.1', port: 0, metricsPort: 0, tls: 'self-signed', requestTimeoutMs: 600_000 },
    pool: { size: poolSize, maxActive: 1 },
    inference: { threads: THREADS, contextSize: CONTEXT, persistentThreadpool },
    // The real path: isolated workers from a warden this benchmark starts (root).
    warden: { start: true, socket: join(state, 'warden.sock'), cgroupName: `phantoma-bench-${process.pid}-${++benchNodes}` },
  });
  if (!r.ok) throw new Error(JSON.stringify(r.issues));
  const node = await startNode(r.config, { logger });
  const key = node.apiKeys!.create('bench').key;
  await waitFull(node, poolSize);
  return { node, key, dispatcher: new Agent({ connect: { ca: node.tls!.cert } }), state };
}

async function waitFull(node: RunningNode, size: number): Promise<void> {
  const deadline = Date.now() + 120_000;
  while (node.models[0]!.pool.stats().ready < size) {
    if (Date.now() > deadline) throw new Error('pool did not fill');
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function streamChat(url: string, init: { headers: Record<string, string>; dispatcher?: Agent }, body: Record<string, unknown>): Promise<Sample> {
  const t0 = performance.now();
  const res = await undiciFetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...init.headers }, body: JSON.stringify(body), ...(init.dispatcher ? { dispatcher: init.dispatcher } : {}) });
  if (res.status !== 200) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  let first = 0;
  let last = 0;
  let text = '';
  let tokens = 0;
  let buffered = '';
  const decoder = new TextDecoder();
  for await (const chunk of res.body!) {
    buffered += decoder.decode(chunk as Uint8Array, { stream: true });
    for (let i = buffered.indexOf('\n\n'); i !== -1; i = buffered.indexOf('\n\n')) {
      const line = buffered.slice(0, i).replace(/^data: /, '');
      buffered = buffered.slice(i + 2);
      if (line === '[DONE]' || line === '') continue;
      const ev = JSON.parse(line) as { choices?: Array<{ delta?: { content?: string } }>; usage?: { completion_tokens: number }; timings?: { predicted_n: number } };
      const content = ev.choices?.[0]?.delta?.content;
      if (content) {
        last = performance.now();
        first ||= last;
        text += content;
      }
      if (ev.usage) tokens = ev.usage.completion_tokens;
      if (ev.timings) tokens = ev.timings.predicted_n;
    }
  }
  return { totalMs: last - t0, ttftMs: first - t0, decodeTps: (tokens - 1) / ((last - first) / 1000), tokens, text };
}

const chatBody = { model: 'm', messages: [{ role: 'user', content: PROMPT }], max_tokens: MAX_TOKENS, seed: SEED, temperature: 0, stream: true, stream_options: { include_usage: true } };

// ---- optional: llama-server on the same model ----
async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

let llamaServer: { proc: ChildProcess; url: string } | undefined;
if (process.env.LLAMA_SERVER) {
  const port = await freePort();
  const proc = spawn(process.env.LLAMA_SERVER, ['-m', modelPath, '--host', '127.0.0.1', '--port', String(port), '-t', String(THREADS), '-tb', String(THREADS), '-c', String(CONTEXT), '-np', '1', '--jinja', '--no-webui', '--log-disable'], { stdio: 'ignore' });
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 120_000;
  for (;;) {
    const ok = await fetch(url + '/health').then((r) => r.ok, () => false);
    if (ok) break;
    if (Date.now() > deadline) throw new Error('llama-server did not start');
    await new Promise((r) => setTimeout(r, 200));
  }
  llamaServer = { proc, url };
  // Never leave it running, whatever happens to this benchmark.
  process.on('exit', () => proc.kill('SIGKILL'));
}

// ---- the alternating runs ----
const withShim = await startBenchNode(2, true);
const withoutShim = await startBenchNode(2, false);
const arms: Record<string, () => Promise<Sample>> = {
  'in-process node-llama-cpp': runInProcess,
  'gateway (HTTPS, warm worker)': async () => {
    const s = await streamChat(withShim.node.url + '/v1/chat/completions', { headers: { authorization: `Bearer ${withShim.key}` }, dispatcher: withShim.dispatcher }, chatBody);
    await waitFull(withShim.node, 2); // the refill happens between requests, not inside the next one
    return s;
  },
  'gateway without threadpool shim': async () => {
    const s = await streamChat(withoutShim.node.url + '/v1/chat/completions', { headers: { authorization: `Bearer ${withoutShim.key}` }, dispatcher: withoutShim.dispatcher }, chatBody);
    await waitFull(withoutShim.node, 2);
    return s;
  },
  ...(llamaServer ? { 'llama-server': () => streamChat(llamaServer!.url + '/v1/chat/completions', { headers: {} }, { ...chatBody, model: undefined, cache_prompt: false }) } : {}),
};
const samples: Record<string, Sample[]> = Object.fromEntries(Object.keys(arms).map((k) => [k, []]));
for (const fn of Object.values(arms)) await fn(); // warm-up: JIT, page cache, TLS session
for (let i = 0; i < ITERATIONS; i++) {
  for (const [name, fn] of Object.entries(arms)) samples[name]!.push(await fn());
  process.stderr.write(`iteration ${i + 1}/${ITERATIONS}\n`);
}

process.stderr.write(`timings: ${JSON.stringify(Object.fromEntries(Object.entries(samples).map(([k, v]) => [k, { totalMsP50: quantile(v.map((x) => x.totalMs), 0.5), ttftMsP50: quantile(v.map((x) => x.ttftMs), 0.5), decodeTpsP50: quantile(v.map((x) => x.decodeTps), 0.5) }])))}\n`);

// ---- pool memory: PSS of 4 warm workers against 1 ----
/**
 * Memory of a set of workers with shared pages counted once: each worker's PSS without the model
 * mapping, plus the model's resident pages once. (Plain PSS would also divide the model among every other
 * process that maps it — this benchmark's own in-process baseline included.)
 */
function poolMemoryKb(pids: number[]): number {
  let rest = 0;
  let model = 0;
  for (const pid of pids) {
    let inModel = false;
    let modelRss = 0;
    let modelPss = 0;
    let total = 0;
    for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
      if (/^[0-9a-f]+-[0-9a-f]+ /.test(line)) inModel = line.endsWith('.gguf');
      const rss = /^Rss:\s+(\d+) kB/.exec(line);
      const pss = /^Pss:\s+(\d+) kB/.exec(line);
      if (rss && inModel) modelRss += Number(rss[1]);
      if (pss) {
        total += Number(pss[1]);
        if (inModel) modelPss += Number(pss[1]);
      }
    }
    rest += total - modelPss;
    model = Math.max(model, modelRss);
  }
  return rest + model;
}
async function poolPss(size: number): Promise<number> {
  const b = await startBenchNode(size, true);
  await new Promise((r) => setTimeout(r, 500));
  const total = poolMemoryKb(b.node.models[0]!.pool.workers().map((w) => w.pid!));
  await b.node.close();
  await b.dispatcher.close();
  rmSync(b.state, { recursive: true, force: true });
  return total;
}
const pss1 = await poolPss(1);
const pss4 = await poolPss(4);

// ---- report ----
const base = samples['in-process node-llama-cpp']!;
const report = {
  date: new Date().toISOString(),
  model: values.model,
  modelBytes: readFileSync(modelPath).length,
  threads: THREADS,
  maxTokens: MAX_TOKENS,
  iterations: ITERATIONS,
  sameTextAsBaseline: Object.fromEntries(Object.entries(samples).map(([k, s]) => [k, s.every((x, i) => x.text === base[i]!.text)])),
  arms: Object.fromEntries(
    Object.entries(samples).map(([k, s]) => [
      k,
      {
        totalMsP50: quantile(s.map((x) => x.totalMs), 0.5),
        ttftMsP50: quantile(s.map((x) => x.ttftMs), 0.5),
        decodeTpsP50: quantile(s.map((x) => x.decodeTps), 0.5),
        addedMsP50: quantile(s.map((x, i) => x.totalMs - base[i]!.totalMs), 0.5),
        addedMsP95: quantile(s.map((x, i) => x.totalMs - base[i]!.totalMs), 0.95),
        ttftRatio: quantile(s.map((x) => x.ttftMs), 0.5) / quantile(base.map((x) => x.ttftMs), 0.5),
        decodeRatio: quantile(s.map((x) => x.decodeTps), 0.5) / quantile(base.map((x) => x.decodeTps), 0.5),
      },
    ]),
  ),
  poolMemory: { pss1WorkerMiB: pss1 / 1024, pss4WorkersMiB: pss4 / 1024, ratio: pss4 / pss1 },
};
console.log(JSON.stringify(report, null, 2));
console.log('\n| path | total p50 ms | added p50 / p95 ms | TTFT p50 ms (× in-process) | decode tok/s p50 (× in-process) |');
console.log('|---|---|---|---|---|');
for (const [k, a] of Object.entries(report.arms)) {
  console.log(`| ${k} | ${a.totalMsP50.toFixed(1)} | ${a.addedMsP50.toFixed(1)} / ${a.addedMsP95.toFixed(1)} | ${a.ttftMsP50.toFixed(1)} (${a.ttftRatio.toFixed(2)}×) | ${a.decodeTpsP50.toFixed(2)} (${a.decodeRatio.toFixed(2)}×) |`);
}
console.log(`\npool memory (PSS, model pages once): 1 warm worker ${report.poolMemory.pss1WorkerMiB.toFixed(0)} MiB, 4 warm workers ${report.poolMemory.pss4WorkersMiB.toFixed(0)} MiB: ${report.poolMemory.ratio.toFixed(2)}×`);
mkdirSync(join(root, 'bench', 'results'), { recursive: true });
writeFileSync(join(root, 'bench', 'results', `gateway-${values.model}.json`), JSON.stringify(report, null, 2) + '\n');

for (const b of [withShim, withoutShim]) {
  await b.node.close();
  await b.dispatcher.close();
  rmSync(b.state, { recursive: true, force: true });
}
llamaServer?.proc.kill('SIGTERM');
await context.dispose();
await loaded.model.dispose();
await runtime.dispose();
