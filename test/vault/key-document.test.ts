// The key document: served by a real gateway route through a real keyd socket, it verifies against the
// pinned identity fingerprint; every single altered byte of the served bytes, a different pin, and a
// document signed for another purpose all fail with key_document_invalid.
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createLogger } from '../../src/logger.ts';
import { makeVaultContents, identityFingerprint, identityPrivateKey } from '../../src/vault/contents.ts';
import { createKeyService, listenKeyd } from '../../src/vault/keyd.ts';
import { createKeydClient } from '../../src/vault/keyd-client.ts';
import { canonicalJson, encodeSignedKeyDocument, signPayload, verifyKeyDocument } from '../../src/vault/signing.ts';
import { createKeyDocumentSource, KEY_DOCUMENT_PATH } from '../../src/gateway/key-document.ts';
import { buildGateway } from '../../src/gateway/app.ts';
import { createGatewayMetrics } from '../../src/gateway/metrics.ts';
import { validateConfig } from '../../src/config/load.ts';
import { isPhantomaError } from '../../src/errors.ts';

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-keydoc-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));
const logger = createLogger({ level: 'silent' });
const contents = makeVaultContents({ now: new Date(), requestKeyValidityMs: 86_400_000 });
const pin = identityFingerprint(Buffer.from(contents.identity.publicKey, 'base64'));
const service = createKeyService({ contents: () => contents, policy: { gatewayUid: process.getuid!(), workerUids: { from: 61000, to: 61999 }, cgroupName: 'phantoma' } });
const keyd = await listenKeyd({ socketPath: join(tmp, 'keyd.sock'), service, logger });
t.teardown(() => keyd.close());

const codeOf = (f: () => unknown): string => {
  try {
    f();
    return 'verified';
  } catch (err) {
    return isPhantomaError(err) ? err.code : `other: ${(err as Error).message}`;
  }
};

t.test('GET /.well-known/phantoma/keys verifies against the pinned identity; any altered byte fails', async (t) => {
  const cfg = validateConfig({ gateway: { host: '127.0.0.1', port: 0, tls: 'off', auth: 'api-keys' } });
  if (!cfg.ok) throw new Error('config');
  const source = createKeyDocumentSource({ keyd: createKeydClient({ socketPath: join(tmp, 'keyd.sock') }), egressPolicyHash: () => 'ab'.repeat(32), tlsFingerprint: undefined });
  const { app, metricsApp } = await buildGateway({ config: cfg.config.gateway, models: [], apiKeys: undefined, logger, metrics: createGatewayMetrics(), keyDocument: source });
  t.teardown(async () => {
    await app.close();
    await metricsApp.close();
  });
  const res = await app.inject({ method: 'GET', url: KEY_DOCUMENT_PATH });
  t.equal(res.statusCode, 200, 'served without an API key');
  t.match(res.headers['content-type'], /application\/json/);
  const served = res.rawPayload;
  const doc = verifyKeyDocument(served, pin);
  t.equal(doc.egressPolicyHash, 'ab'.repeat(32));
  t.equal(doc.releaseVersion, '0.1.0');
  t.equal(doc.tlsCertificateSha256, '');
  t.same(doc.requestKeys.map((k) => k.id), contents.requestKeys.map((k) => k.id));
  t.equal(doc.identityPublicKey, contents.identity.publicKey);

  let refused = 0;
  const other: string[] = [];
  for (let i = 0; i < served.length; i++) {
    for (const mask of [0x01, 0x20]) {
      const bad = Buffer.from(served);
      bad[i]! ^= mask;
      const code = codeOf(() => verifyKeyDocument(bad, pin));
      if (code === 'key_document_invalid') refused++;
      else other.push(`byte ${i} ^ ${mask}: ${code}`);
    }
  }
  t.same(other, [], 'no altered byte verifies or fails otherwise');
  t.equal(refused, served.length * 2, `all ${served.length} bytes × 2 flips refused with key_document_invalid`);

  t.equal(codeOf(() => verifyKeyDocument(served, 'sha256:' + '0'.repeat(64))), 'key_document_invalid', 'another pinned identity');
  // The same canonical bytes signed for another purpose (a receipt) are not a key document signature.
  const asReceipt = signPayload(identityPrivateKey(contents), 'receipt', Buffer.from(canonicalJson(doc)));
  t.equal(codeOf(() => verifyKeyDocument(encodeSignedKeyDocument(doc, asReceipt), pin)), 'key_document_invalid', 'a receipt signature is refused');
});
