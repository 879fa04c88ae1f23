// A node with a vault: startNode starts keyd, takes its TLS key and certificate from the vault (no
// plaintext key in the state directory), serves the signed key document over HTTPS, and a restart keeps
// the same identity and TLS pin. keyd stops with the node.
import t from 'tap';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { request } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ROOT } from '../helpers.ts';
import { validateConfig } from '../../src/config/load.ts';
import { createLogger } from '../../src/logger.ts';
import { startNode } from '../../src/main.ts';
import { makeVaultContents, identityFingerprint } from '../../src/vault/contents.ts';
import { createVault } from '../../src/vault/store.ts';
import { makeSelfSignedCertificate, certificateFingerprint } from '../../src/gateway/tls.ts';
import { verifyKeyDocument } from '../../src/vault/signing.ts';
import { KEY_DOCUMENT_PATH } from '../../src/gateway/key-document.ts';
import { createKeydClient } from '../../src/vault/keyd-client.ts';

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-vault-node-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));
const state = join(tmp, 'state');
const keydSocket = join(tmp, 'keyd', 'keyd.sock');
const tls = await makeSelfSignedCertificate({ commonName: 'phantoma node', dnsNames: ['localhost'], ips: ['127.0.0.1'], days: 1 });
const contents = makeVaultContents({ now: new Date(), requestKeyValidityMs: 86_400_000, tls });
createVault(join(state, 'vault.phv'), { kind: 'passphrase', secret: Buffer.from('node pass') }, { log2N: 10, r: 8, p: 1 }, contents);
const pin = identityFingerprint(Buffer.from(contents.identity.publicKey, 'base64'));

const cfg = validateConfig({
  stateDir: state,
  cacheDir: join(ROOT, '.cache'),
  gateway: { host: '127.0.0.1', port: 0, metricsPort: 0, tls: 'self-signed', auth: 'none', shutdownGraceMs: 1000 },
  workers: { backend: 'process' },
  pool: { size: 1, allowUnencryptedSwap: true },
  inference: { threads: 1 },
  egress: { mode: 'off' },
  vault: { keydSocket },
});
if (!cfg.ok) throw new Error(JSON.stringify(cfg.issues));
const config = cfg.config;

function get(url: string, ca: string): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = request(url, { ca, method: 'GET' }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
    });
    req.on('error', reject);
    req.end();
  });
}

t.test('TLS from the vault, key document over HTTPS, same identity after a restart', async (t) => {
  const env = { ...process.env, PHANTOMA_VAULT_PASSPHRASE: 'node pass' };
  // Two starts: the second (a restart) must serve the same TLS pin and identity, from the vault.
  for (const round of [1, 2]) {
    const node = await startNode(config, { logger: createLogger({ level: 'silent' }), vaultEnv: env });
    try {
      t.equal(node.tls?.fingerprint, certificateFingerprint(tls.cert), `round ${round}: the gateway serves the vault's certificate`);
      t.notOk(existsSync(join(state, 'tls-key.pem')), `round ${round}: no plaintext TLS key in the state directory`);
      const res = await get(`${node.url}${KEY_DOCUMENT_PATH}`, tls.cert);
      t.equal(res.status, 200);
      const doc = verifyKeyDocument(res.body, pin);
      t.equal(doc.tlsCertificateSha256, certificateFingerprint(tls.cert), 'the document names the TLS certificate');
      t.equal(doc.egressPolicyHash, node.egressPolicyHash(), "the document carries the node's egress policy hash");
      t.same(doc.requestKeys.map((k) => k.id), contents.requestKeys.map((k) => k.id));
    } finally {
      await node.close();
    }
    const gone = await createKeydClient({ socketPath: keydSocket, timeoutMs: 500 }).ping().catch((e: { code?: string }) => e.code);
    t.equal(gone, 'keyd_unavailable', `round ${round}: keyd stopped with the node`);
  }
  const wrong = await startNode(config, { logger: createLogger({ level: 'silent' }), vaultEnv: { ...process.env, PHANTOMA_VAULT_PASSPHRASE: 'wrong' } }).catch((e: { code?: string }) => e.code);
  t.equal(wrong, 'vault_passphrase_wrong', 'a wrong passphrase stops the node from starting, with its code');
});

t.test('with the warden backend, keyd starts first and the warden binds its socket into workers', async (t) => {
  const wardenCfg = validateConfig({
    ...JSON.parse(JSON.stringify(config)),
    workers: { backend: 'warden' },
    warden: { start: true, socket: join(tmp, 'warden', 'warden.sock'), cgroupName: `phantoma-vault-node-${process.pid}` },
    inference: { threads: 1, persistentThreadpool: false },
  });
  if (!wardenCfg.ok) throw new Error(JSON.stringify(wardenCfg.issues));
  const node = await startNode(wardenCfg.config, { logger: createLogger({ level: 'silent' }), vaultEnv: { ...process.env, PHANTOMA_VAULT_PASSPHRASE: 'node pass' } });
  try {
    const children = readdirSync('/proc').filter((p) => /^\d+$/.test(p)).filter((p) => {
      try {
        return readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1]!.split(' ')[1] === String(process.pid);
      } catch {
        return false;
      }
    });
    const cmdlines = children.map((p) => readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0'));
    const warden = cmdlines.find((c) => c[0]!.endsWith('phantoma-warden'));
    t.ok(warden, 'the warden runs');
    t.equal(warden![warden!.indexOf('--keyd-socket') + 1], keydSocket, "the warden was given keyd's socket");
    t.ok(cmdlines.some((c) => c.includes('keyd')), 'keyd runs beside it');
    t.equal((await createKeydClient({ socketPath: keydSocket }).ping()).pid > 0, true);
  } finally {
    await node.close();
  }
});
