// The gateway's keyd client over a real socket to an in-process keyd server: prepare's held connection is
// opened before any sealed request and kept past keyd's idle limit, so no request pays for a connect and
// keyd's identification of the caller. (Worker-side behaviour: test/vault/keyd.test.ts.)
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { makeVaultContents } from '../../src/vault/contents.ts';
import { createKeyService, listenKeyd } from '../../src/vault/keyd.ts';
import { createKeydClient } from '../../src/vault/keyd-client.ts';
import { createLogger } from '../../src/logger.ts';

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-keyd-client-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));
const contents = makeVaultContents({ now: new Date(), requestKeyValidityMs: 86_400_000 });
const policy = { gatewayUid: process.getuid!(), workerUids: { from: 61000, to: 61999 }, cgroupName: 'phantoma' };
const IDLE_MS = 300;

async function keydWithCount(name: string) {
  const socketPath = join(tmp, name, 'keyd.sock');
  const k = await listenKeyd({ socketPath, service: createKeyService({ contents: () => contents, policy }), logger: createLogger({ level: 'silent' }), idleMs: IDLE_MS });
  let connections = 0;
  k.server.on('connection', () => connections++);
  return { socketPath, close: () => k.close(), connections: () => connections };
}

// A prepare for a worker that holds no connection: keyd answers keyd_worker_not_connected over the
// gateway's held connection without counting anything — enough to see which connection carried it.
const kem = { keyId: contents.requestKeys[0]!.id, ephemeralPublicKey: Buffer.alloc(32, 9), kemCiphertext: Buffer.alloc(1088, 1), transcriptHash: Buffer.alloc(32, 2) };
const prepareCode = (c: ReturnType<typeof createKeydClient>) => c.prepare('0123456789abcdef', kem).then(() => 'ok', (e: { code?: string }) => e.code);

t.test('held and pinged: one connection carries prepares spaced past the idle limit', async (t) => {
  const k = await keydWithCount('kept');
  t.teardown(k.close);
  const client = createKeydClient({ socketPath: k.socketPath, keepAliveMs: IDLE_MS / 3 });
  await client.holdPrepareConnection();
  t.equal(k.connections(), 1, 'opened before any prepare');
  t.equal(await prepareCode(client), 'keyd_worker_not_connected');
  await new Promise((r) => setTimeout(r, IDLE_MS * 3));
  t.equal(await prepareCode(client), 'keyd_worker_not_connected');
  t.equal(k.connections(), 1, 'the same connection, three idle limits later');
  client.close();
});

t.test('control: without the pings keyd closes it as idle and the next prepare connects again', async (t) => {
  const k = await keydWithCount('dropped');
  t.teardown(k.close);
  const client = createKeydClient({ socketPath: k.socketPath, keepAliveMs: 60_000 });
  await client.holdPrepareConnection();
  await new Promise((r) => setTimeout(r, IDLE_MS * 3));
  t.equal(await prepareCode(client), 'keyd_worker_not_connected');
  t.equal(k.connections(), 2, 'a second connection');
  client.close();
});
