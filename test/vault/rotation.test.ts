// Rotation: a request sealed to the previous key opens during the overlap and is refused after it; the
// next rotation past the overlap removes the old key from the vault file; the key document lists what
// opens now. keyd's decisions run here without sockets (createKeyService) under an injected clock; the
// caller is a warden-style worker identity (socket identification is test/vault/keyd.test.ts).
import t from 'tap';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { makeVaultContents, rotateRequestKeys, type VaultContents } from '../../src/vault/contents.ts';
import { createVault, readVault, updateVault } from '../../src/vault/store.ts';
import { createKeyService, pruneExpiredInVault, type Caller } from '../../src/vault/keyd.ts';
import { combineKem, encapsulate } from '../../src/sealed/kem.ts';
import { sessionKeysB64, keysOf } from './session-keys.ts';

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-rotation-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));
const HOUR = 3_600_000;
const t0 = new Date('2026-01-01T00:00:00.000Z');
const policy = { gatewayUid: 0, workerUids: { from: 61000, to: 61999 }, cgroupName: 'phantoma' };
const worker = (): Caller => ({ pid: 4242, uid: 61010, cgroup: `/phantoma/workers/${randomBytes(8).toString('hex')}` });

function sealTo(c: VaultContents, id: string): { request: Record<string, string>; expected: { bodyKey: string; responseKey: string } } {
  const k = c.requestKeys.find((x) => x.id === id)!;
  const kem = encapsulate({ x25519: Buffer.from(k.x25519Public, 'base64'), mlkem: Buffer.from(k.mlkemPublic, 'base64') });
  const th = randomBytes(32);
  const b64 = (b: Uint8Array): string => Buffer.from(b).toString('base64');
  return { request: { op: 'decapsulate', keyId: id, ephemeralPublicKey: b64(kem.ephemeralPublicKey), kemCiphertext: b64(kem.kemCiphertext), transcriptHash: b64(th) }, expected: sessionKeysB64(combineKem(kem, th)) };
}

t.test('a request sealed to the old key opens during the overlap and is refused after it', async (t) => {
  const path = join(tmp, 'v.phv');
  const pass = { kind: 'passphrase' as const, secret: Buffer.from('p') };
  createVault(path, pass, { log2N: 10, r: 8, p: 1 }, makeVaultContents({ now: t0, requestKeyValidityMs: 90 * 24 * HOUR }));
  const before = readVault(path, pass).contents;
  const oldId = before.requestKeys[0]!.id;
  // A client fetched the key document before the rotation and seals to the old key.
  const sealedToOld = [sealTo(before, oldId), sealTo(before, oldId), sealTo(before, oldId)];

  const rotatedAt = new Date(t0.getTime() + 10 * HOUR);
  const after = updateVault(path, pass, (c) => rotateRequestKeys(c, rotatedAt, { overlapMs: HOUR, validityMs: 90 * 24 * HOUR })).contents;
  t.equal(after.requestKeys.length, 2);
  const newId = after.requestKeys[1]!.id;
  t.not(newId, oldId);
  t.equal(after.requestKeys[0]!.notAfter, new Date(rotatedAt.getTime() + HOUR).toISOString(), 'old key cut to rotation + overlap');

  let now = new Date(rotatedAt.getTime() + 30 * 60_000);
  const audits: unknown[] = [];
  const service = createKeyService({ contents: () => readVault(path, pass).contents, policy, now: () => now, audit: (e) => audits.push(e) });
  const inOverlap = service.handle(worker(), sealedToOld[0]!.request);
  t.same(inOverlap, { ok: true, ...sealedToOld[0]!.expected }, 'old key opens 30 min into the 1 h overlap');
  const toNew = sealTo(after, newId);
  t.same(service.handle(worker(), toNew.request), { ok: true, ...toNew.expected }, 'the new key opens');
  const doc = service.handle({ pid: 1, uid: 0, cgroup: '/' }, { op: 'key-document', egressPolicyHash: 'e'.repeat(64) }) as { document: { requestKeys: Array<{ id: string }> } };
  t.same(doc.document.requestKeys.map((k) => k.id), [oldId, newId], 'during the overlap the key document lists both');

  now = new Date(rotatedAt.getTime() + HOUR + 1);
  const late = service.handle(worker(), sealedToOld[1]!.request);
  t.equal(late.code, 'request_key_unknown', 'after the overlap the old key is refused');
  t.match(audits.at(-1), { type: 'keyd_refusal', reason: 'key_expired', code: 'request_key_unknown' });
  const doc2 = service.handle({ pid: 1, uid: 0, cgroup: '/' }, { op: 'key-document', egressPolicyHash: 'e'.repeat(64) }) as { document: { requestKeys: Array<{ id: string }> } };
  t.same(doc2.document.requestKeys.map((k) => k.id), [newId], 'after the overlap the key document lists only the new key');

  // keyd's minute prune removes it from the vault file once the overlap is over, without a new rotation.
  const { keys } = readVault(path, pass);
  t.same(pruneExpiredInVault(path, keys, new Date(rotatedAt.getTime() + 30 * 60_000)), [], 'nothing to prune during the overlap');
  t.same(pruneExpiredInVault(path, keys, now), [oldId], 'pruned after the overlap');
  t.same(readVault(path, pass).contents.requestKeys.map((k) => k.id), [newId], 'the vault file holds only the new key');
  t.same(pruneExpiredInVault(path, keys, new Date(now.getTime() + 1000 * 24 * HOUR)), [], 'the last key is never pruned');

  // A rotation after the overlap also drops expired keys (here none are left), and adds a key.
  const later = new Date(rotatedAt.getTime() + 2 * HOUR);
  updateVault(path, pass, (c) => rotateRequestKeys(c, later, { overlapMs: HOUR, validityMs: 90 * 24 * HOUR }));
  const ids = readVault(path, pass).contents.requestKeys.map((k) => k.id);
  t.notOk(ids.includes(oldId), 'the old key is gone from the vault');
  t.ok(ids.includes(newId));
  t.notOk(readFileSync(path).includes(Buffer.from(before.requestKeys[0]!.x25519Private, 'base64')), 'and its private bytes are not in the file (it is sealed anyway)');
  const gone = createKeyService({ contents: () => readVault(path, pass).contents, policy, now: () => later }).handle(worker(), sealedToOld[2]!.request);
  t.equal(gone.code, 'request_key_unknown', 'a removed key is unknown');
});
