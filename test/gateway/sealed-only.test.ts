// gateway.plaintextApi=false: the node accepts sealed requests only. Every plaintext /v1 route answers
// 403 plaintext_api_disabled (with or without a key); health, readiness and the key document stay open.
import t from 'tap';
import { validateConfig } from '../../src/config/load.ts';
import { buildGateway } from '../../src/gateway/app.ts';
import { createGatewayMetrics } from '../../src/gateway/metrics.ts';
import { createLogger } from '../../src/logger.ts';

async function gateway(plaintextApi: boolean) {
  const cfg = validateConfig({ gateway: { host: '127.0.0.1', port: 0, tls: 'off', auth: 'none', plaintextApi } });
  if (!cfg.ok) throw new Error(JSON.stringify(cfg.issues));
  const g = await buildGateway({ config: cfg.config.gateway, models: [], apiKeys: undefined, logger: createLogger({ level: 'silent' }), metrics: createGatewayMetrics() });
  t.teardown(async () => {
    await g.app.close();
    await g.metricsApp.close();
  });
  return g.app;
}

t.test('plaintext API off: every /v1 route is refused with its code', async (t) => {
  const app = await gateway(false);
  for (const [method, url] of [['POST', '/v1/chat/completions'], ['POST', '/v1/completions'], ['GET', '/v1/models']] as const) {
    const res = await app.inject({ method, url, ...(method === 'POST' ? { payload: { model: 'tiny', messages: [{ role: 'user', content: 'x' }] } } : {}) });
    t.equal(res.statusCode, 403, `${method} ${url}`);
    t.equal(res.json().error.code, 'plaintext_api_disabled');
  }
  t.equal((await app.inject({ method: 'GET', url: '/healthz' })).statusCode, 200, 'health stays open');
});

t.test('positive control: with the plaintext API on, the same route is served', async (t) => {
  const app = await gateway(true);
  const res = await app.inject({ method: 'GET', url: '/v1/models' });
  t.equal(res.statusCode, 200);
  t.same(res.json().data, []);
});
