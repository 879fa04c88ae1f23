// Starts a real node in this process (gateway on 127.0.0.1 port 0, real worker processes on the tiny
// model) in a temp state dir, captures its log lines, and tears everything down.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { validateConfig } from '../../src/config/load.ts';
import { createLogger } from '../../src/logger.ts';
import { startNode, type RunningNode } from '../../src/main.ts';
import { ROOT } from '../helpers.ts';

export interface TestNode {
  node: RunningNode;
  url: string;
  apiKey: string;
  logs: string[];
  logger: ReturnType<typeof createLogger>;
  stateDir: string;
  close(): Promise<void>;
  waitReady(timeoutMs?: number): Promise<void>;
  post(path: string, body: unknown, headers?: Record<string, string>): Promise<Response>;
}

export function deepMerge(a: Record<string, unknown>, b: Record<string, unknown>): Record<string, unknown> {
  const out = { ...a };
  for (const [k, v] of Object.entries(b)) {
    out[k] = v && typeof v === 'object' && !Array.isArray(v) && typeof out[k] === 'object' ? deepMerge(out[k] as Record<string, unknown>, v as Record<string, unknown>) : v;
  }
  return out;
}

let nodeCounter = 0;

export async function startTestNode(overrides: Record<string, unknown> = {}): Promise<TestNode> {
  const stateDir = mkdtempSync(join(tmpdir(), 'phantoma-node-'));
  const base = {
    logLevel: 'info',
    stateDir,
    cacheDir: join(ROOT, '.cache'),
    gateway: { host: '127.0.0.1', port: 0, metricsPort: 0, tls: 'off', auth: 'api-keys', shutdownGraceMs: 2000 },
    pool: { size: 2, maxActive: 1 },
    // Real isolated workers: each test node starts its own warden (tests run as root) in its own subtree.
    workers: { backend: 'warden', memoryMaxBytes: 1 << 30 },
    warden: { start: true, socket: join(stateDir, 'warden.sock'), cgroupName: `phantoma-test-${process.pid}-${++nodeCounter}` },
    // One thread: on this 2-core machine the tiny model decodes ~15x faster with 1 than with 2.
    inference: { threads: 1, contextSize: 2048 },
  };
  const r = validateConfig(deepMerge(base, overrides));
  if (!r.ok) throw new Error(`test config invalid: ${JSON.stringify(r.issues)}`);
  const logs: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString('utf8').split('\n')) if (line) logs.push(line);
      cb();
    },
  });
  const logger = createLogger({ level: 'debug', destination });
  const node = await startNode(r.config, { logger });
  const apiKey = node.apiKeys ? node.apiKeys.create('test').key : '';
  const t: TestNode = {
    node,
    url: node.url,
    apiKey,
    logs,
    logger,
    stateDir,
    async close() {
      await node.close();
      rmSync(stateDir, { recursive: true, force: true });
    },
    async waitReady(timeoutMs = 60_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        // Each pool to its own warm size (per-model pool.size; 0 while a lazy pool is unused, issue 15).
        const full = node.models.every((m) => m.pool.stats().ready >= m.pool.warmTarget());
        if (full) return;
        if (Date.now() > deadline) throw new Error(`pool not full after ${timeoutMs} ms: ${JSON.stringify(node.models.map((m) => m.pool.stats()))}`);
        await new Promise((res) => setTimeout(res, 50));
      }
    },
    post(path, body, headers = {}) {
      return fetch(node.url + path, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${apiKey}`, ...headers },
        body: typeof body === 'string' ? body : JSON.stringify(body),
      });
    },
  };
  await t.waitReady();
  return t;
}

/** Parses an SSE body into its data payloads (without the final [DONE]) and whether [DONE] came. */
export function parseSse(text: string): { events: any[]; done: boolean } {
  const datas = text.split('\n\n').map((e) => e.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('')).filter(Boolean);
  const done = datas.at(-1) === '[DONE]';
  return { events: datas.filter((d) => d !== '[DONE]').map((d) => JSON.parse(d)), done };
}

export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export async function until(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
