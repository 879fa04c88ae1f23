// One-shot lifecycle under stress: cancellation, a full queue, timeouts, a killed worker, auth and limits.
import t from 'tap';
import { startTestNode, isAlive, until, type TestNode } from './fixture.ts';

// Long generations (~1,000 tokens/s on the tiny model with one thread) so requests overlap.
const long = (extra: Record<string, unknown> = {}) => ({ model: 'tiny', messages: [{ role: 'user', content: 'go on' }], max_tokens: 3500, ...extra });

const n: TestNode = await startTestNode({
  inference: { contextSize: 4096 },
  gateway: { maxQueue: 1, requestTimeoutMs: 20_000, maxConcurrentPerKey: 8 },
});
t.teardown(() => n.close());
const pool = n.node.models[0]!.pool;

async function busyPid(): Promise<number> {
  await until(() => pool.workers().some((w) => w.state === 'busy'), 10_000, 'a busy worker');
  return pool.workers().find((w) => w.state === 'busy')!.pid!;
}

t.test('a client that disconnects cancels its generation and its worker process is gone', async (t) => {
  const ac = new AbortController();
  const streaming = fetch(n.url + '/v1/chat/completions', {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${n.apiKey}` },
    body: JSON.stringify(long({ stream: true })),
    signal: ac.signal,
  });
  const pid = await busyPid();
  const r = await streaming;
  const reader = r.body!.getReader();
  await reader.read(); // the first event arrived: generation is under way
  ac.abort();
  await until(() => !isAlive(pid), 5_000, `worker ${pid} to be gone`);
  t.notOk(isAlive(pid), `worker ${pid} was killed`);
  await n.waitReady(60_000);
  t.same(pool.stats(), { starting: 0, ready: 2, busy: 0, queued: 0 }, 'the pool refilled');
  const metrics = await (await fetch(n.node.metricsUrl)).text();
  t.match(metrics, /phantoma_workers_ended_total\{model="tiny",outcome="client_closed"\} [1-9]/);
});

t.test('past the queue bound: 503 queue_full with Retry-After, and the queued request is still served', async (t) => {
  await n.waitReady(60_000);
  const first = n.post('/v1/chat/completions', long({ max_tokens: 1500 }));
  await busyPid();
  const queued = n.post('/v1/chat/completions', long({ max_tokens: 5 }));
  await until(() => pool.stats().queued === 1, 5_000, 'one queued request');
  const refused = await n.post('/v1/chat/completions', long({ max_tokens: 5 }));
  t.equal(refused.status, 503);
  t.equal(refused.headers.get('retry-after'), '2');
  t.equal(((await refused.json()) as any).error.code, 'queue_full');
  t.equal((await first).status, 200);
  t.equal((await queued).status, 200, 'the queued request ran after the first');
});

t.test('a worker killed mid-request gives a clean 502 worker_failed and the pool recovers', async (t) => {
  await n.waitReady(60_000);
  const pending = n.post('/v1/chat/completions', long());
  const pid = await busyPid();
  process.kill(pid, 'SIGKILL');
  const res = await pending;
  t.equal(res.status, 502);
  const err = ((await res.json()) as any).error;
  t.equal(err.code, 'worker_failed');
  t.equal(err.type, 'server_error');
  await n.waitReady(60_000);
  t.same(pool.stats(), { starting: 0, ready: 2, busy: 0, queued: 0 });
  t.equal((await n.post('/v1/chat/completions', long({ max_tokens: 3 }))).status, 200, 'and serves again');
});

t.test('a killed worker during a stream ends the stream with an error event, then [DONE]', async (t) => {
  await n.waitReady(60_000);
  const pending = n.post('/v1/chat/completions', long({ stream: true }));
  const pid = await busyPid();
  const res = await pending;
  process.kill(pid, 'SIGKILL');
  const text = await res.text();
  t.match(text, /data: \{"error":\{"message":"[^"]+","type":"server_error","param":null,"code":"worker_failed"\}\}\n\ndata: \[DONE\]\n\n$/);
});

t.test('authentication: 401 without a key, with a wrong key, with a revoked key', async (t) => {
  const noKey = await fetch(n.url + '/v1/models');
  t.equal(noKey.status, 401);
  t.same(await noKey.json(), { error: { message: 'missing API key: send Authorization: Bearer <key>', type: 'authentication_error', param: null, code: 'invalid_api_key' } });
  const wrong = await fetch(n.url + '/v1/models', { headers: { authorization: 'Bearer phk_000000000000_' + 'A'.repeat(43) } });
  t.equal(wrong.status, 401);
  const store = n.node.apiKeys!;
  const { id, key } = store.create('short-lived');
  t.equal((await fetch(n.url + '/v1/models', { headers: { authorization: `Bearer ${key}` } })).status, 200);
  store.revoke(id);
  const revoked = await fetch(n.url + '/v1/models', { headers: { authorization: `Bearer ${key}` } });
  t.equal(revoked.status, 401);
  t.equal(((await revoked.json()) as any).error.code, 'invalid_api_key');
  t.equal((await fetch(n.url + '/healthz')).status, 200, 'health needs no key');
});

t.test('a request that runs past the timeout is ended with 504 request_timeout, worker and all', async (t) => {
  const slow = await startTestNode({ inference: { contextSize: 4096 }, gateway: { requestTimeoutMs: 300 }, pool: { size: 1 } });
  t.teardown(() => slow.close());
  const slowPool = slow.node.models[0]!.pool;
  const pidBefore = slowPool.workers()[0]!.pid!;
  const res = await slow.post('/v1/chat/completions', long());
  t.equal(res.status, 504);
  t.equal(((await res.json()) as any).error.code, 'request_timeout');
  t.notOk(isAlive(pidBefore), 'the worker was killed');
  await slow.waitReady(60_000);
});

t.test('per-key rate limit and concurrency cap: 429 with Retry-After', async (t) => {
  const limited = await startTestNode({ inference: { contextSize: 4096 }, gateway: { rateLimitPerMinute: 3, maxConcurrentPerKey: 1 }, pool: { size: 1 } });
  t.teardown(() => limited.close());
  const first = limited.post('/v1/chat/completions', long({ max_tokens: 1500 }));
  await until(() => limited.node.models[0]!.pool.workers().some((w) => w.state === 'busy'), 10_000, 'busy');
  const second = await limited.post('/v1/chat/completions', long({ max_tokens: 2 }));
  t.equal(second.status, 429);
  t.equal(second.headers.get('retry-after'), '1');
  t.equal(((await second.json()) as any).error.code, 'concurrency_limit_exceeded');
  t.equal((await first).status, 200);
  const third = await fetch(limited.url + '/v1/models', { headers: { authorization: `Bearer ${limited.apiKey}` } });
  t.equal(third.status, 200, 'third request in the minute is allowed');
  const fourth = await fetch(limited.url + '/v1/models', { headers: { authorization: `Bearer ${limited.apiKey}` } });
  t.equal(fourth.status, 429);
  t.ok(Number(fourth.headers.get('retry-after')) > 0, 'Retry-After says when');
  t.equal(((await fourth.json()) as any).error.code, 'rate_limit_exceeded');
  const other = limited.node.apiKeys!.create('other').key;
  t.equal((await fetch(limited.url + '/v1/models', { headers: { authorization: `Bearer ${other}` } })).status, 200, 'another key has its own budget');
});

t.test('unencrypted swap: workers are not started and requests get 503 unencrypted_swap, unless allowed', async (t) => {
  const { startNode } = await import('../../src/main.ts');
  const { validateConfig } = await import('../../src/config/load.ts');
  const { createLogger } = await import('../../src/logger.ts');
  const { mkdtempSync, rmSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const { join } = await import('node:path');
  const swap = [{ path: '/swapfile', type: 'file', sizeKiB: 1024, usedKiB: 0, priority: -2, backing: 'plain' as const, via: 'vda' }];
  for (const allow of [false, true]) {
    const state = mkdtempSync(join(tmpdir(), 'phantoma-swap-'));
    const lines: string[] = [];
    const cfg = validateConfig({ stateDir: state, cacheDir: join(process.cwd(), '.cache'), gateway: { host: '127.0.0.1', port: 0, metricsPort: 0, tls: 'off', auth: 'none' }, pool: { size: 1, allowUnencryptedSwap: allow }, inference: { threads: 1 }, workers: { backend: 'process' } });
    if (!cfg.ok) throw new Error('bad config');
    const logger = createLogger({ level: 'info', destination: { write: (s: string) => void lines.push(s) } as never });
    const node = await startNode(cfg.config, { logger, probeSwaps: () => swap });
    try {
      if (!allow) {
        const ready = await fetch(node.url + '/readyz');
        t.equal(ready.status, 503);
        t.match(((await ready.json()) as any).reasons[0], /workers are not started: .*\/swapfile \(plain\)/);
        const res = await fetch(node.url + '/v1/chat/completions', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'x' }], max_tokens: 2 }) });
        t.equal(res.status, 503);
        t.equal(((await res.json()) as any).error.code, 'unencrypted_swap');
        t.same(node.models[0]!.pool.workers(), [], 'no worker was started');
        t.ok(lines.some((l) => l.includes('"level":50') && l.includes('unencrypted_swap')), 'logged as an error');
      } else {
        await until(() => node.models[0]!.pool.stats().ready === 1, 30_000, 'a worker');
        t.ok(lines.some((l) => l.includes('"level":40') && l.includes('UNENCRYPTED SWAP IS ON')), 'a loud warning when allowed');
      }
    } finally {
      await node.close();
      rmSync(state, { recursive: true, force: true });
    }
  }
});
