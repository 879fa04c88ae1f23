// A model that appears in the node's model directory (as `phantoma model pull` leaves it: the verified file,
// then its manifest) is served without a restart: /v1/models shows it and a real warden worker answers on
// it; `model remove` takes it away again. Also: the node started its warden with the download helper, and
// its window keeper runs (an expired window left in the state directory is closed at start, audited).
import t from 'tap';
import { copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { startTestNode, until, type TestNode } from '../gateway/fixture.ts';
import { tinyModelPath } from '../helpers.ts';
import { describeGguf, modelDirOf, removeModel, writeManifest, isServed } from '../../src/models/store.ts';
import { readGgufSummary } from '../../src/models/gguf-reader.ts';
import { tailAuditLog, auditDirOf } from '../../src/audit/audit-log.ts';
import { windowPath } from '../../src/egress/window.ts';

let n: TestNode | undefined;
t.teardown(async () => {
  await n?.close();
});

t.test('a pulled model is served without a restart, and removed again', async (t) => {
  n = await startTestNode({ pool: { size: 1, maxActive: 1 } });
  const get = async (): Promise<string[]> => ((await (await fetch(`${n!.url}/v1/models`, { headers: { authorization: `Bearer ${n!.apiKey}` } })).json()) as { data: Array<{ id: string }> }).data.map((m) => m.id);
  t.same(await get(), ['tiny'], 'only the configured model at first');
  const dir = modelDirOf(n.stateDir);
  const src = await tinyModelPath();
  mkdirSync(dir, { recursive: true });
  copyFileSync(src, join(dir, 'pulled-tiny.gguf'));
  const sha256 = createHash('sha256').update(readFileSync(src)).digest('hex');
  writeManifest(dir, { v: 1, name: 'pulled-tiny', file: 'pulled-tiny.gguf', sha256, bytes: readFileSync(src).length, source: { kind: 'url', url: 'http://10.0.0.1/x.gguf' }, ...describeGguf(readGgufSummary(src)), addedAt: new Date().toISOString() });
  const deadline = Date.now() + 10_000;
  let ids: string[] = [];
  while (!(ids = await get()).includes('pulled-tiny') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  t.same(ids, ['tiny', 'pulled-tiny'], '/v1/models shows the pulled model');
  t.ok(isServed(dir, 'pulled-tiny'), 'the gateway records that it serves it (pull refuses to overwrite it)');
  const res = await n.post('/v1/chat/completions', { model: 'pulled-tiny', messages: [{ role: 'user', content: 'hi' }], max_tokens: 4 });
  t.equal(res.status, 200, 'a worker answers on it');
  const body = (await res.json()) as { model: string };
  t.equal(body.model, 'pulled-tiny');
  removeModel(dir, 'pulled-tiny');
  await until(() => !n!.node.models.some((m) => m.name === 'pulled-tiny'), 10_000, 'the model to go');
  t.same(await get(), ['tiny'], 'removed: /v1/models no longer shows it');
  const types = tailAuditLog(auditDirOf({ stateDir: n.stateDir }), 200).map((e) => e.type);
  t.ok(types.includes('model_added') && types.includes('model_removed'), 'model_added and model_removed audited');
  await n.close();
  n = undefined;
});

t.test('an expired window left in the state directory is closed when the node starts', async (t) => {
  // The first node made its state dir; this one gets a fresh one with a window file from before.
  const { mkdtempSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const pre = mkdtempSync(join(tmpdir(), 'phantoma-node-'));
  writeFileSync(windowPath(pre), JSON.stringify({ v: 1, id: 'deadbeefdeadbeef', by: 'operator', openedAt: Date.now() - 5000, until: Date.now() - 1000, targets: [], entries: [{ proto: 'tcp', cidr: '127.0.0.2/32', port: 443 }] }));
  n = await startTestNode({ stateDir: pre, pool: { size: 1, maxActive: 1 } });
  t.teardown(() => rmSync(pre, { recursive: true, force: true })); // the fixture removes only its own dir
  t.notOk(existsSync(windowPath(pre)), 'the window file is gone');
  const ev = tailAuditLog(auditDirOf({ stateDir: pre }), 200).filter((e) => e.type === 'egress_window_closed');
  t.match(ev[0], { windowId: 'deadbeefdeadbeef', reason: 'expired_at_start' }, 'closed at start, audited');
  t.same(n.node.egress?.lastStatus()?.downloadAllow ?? [], [], 'the download allowlist is empty');
});
