// The vault file: it keeps identity across re-opening; a wrong passphrase, a truncated file, any flipped
// header byte and hundreds of flipped body bytes are each refused with their exact code and leave the file
// unchanged; absurd KDF parameters are refused before deriving; a SIGKILL at every write step leaves the
// old or the new vault; a key-file credential works.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ROOT } from '../helpers.ts';
import { isPhantomaError } from '../../src/errors.ts';
import { HEADER_BYTES, SCRYPT_BOUNDS, parseHeader } from '../../src/vault/format.ts';
import { makeVaultContents, identityFingerprint, addClient } from '../../src/vault/contents.ts';
import { createVault, readVault, updateVault, WRITE_STEPS } from '../../src/vault/store.ts';

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-vault-'));
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));
// Small scrypt parameters keep the test fast (the config's allowWeakKdf bound); production uses 2^17.
const WEAK = { log2N: 10, r: 8, p: 1 };
const PASS = { kind: 'passphrase' as const, secret: Buffer.from('correct horse battery staple') };

function codeOf(f: () => unknown): string {
  try {
    f();
    return 'no error';
  } catch (err) {
    return isPhantomaError(err) ? err.code : `not a PhantomaError: ${(err as Error).message}`;
  }
}

function fresh(name: string): { path: string; bytes: Buffer; fp: string } {
  const path = join(tmp, name);
  const contents = makeVaultContents({ now: new Date(), requestKeyValidityMs: 86_400_000, tls: { key: 'k', cert: 'c' } });
  createVault(path, PASS, WEAK, contents);
  return { path, bytes: readFileSync(path), fp: identityFingerprint(Buffer.from(contents.identity.publicKey, 'base64')) };
}

t.test('re-opening keeps identity and request keys; a second create is refused', async (t) => {
  const { path, fp } = fresh('a.phv');
  const a = readVault(path, PASS);
  const b = readVault(path, PASS);
  t.equal(identityFingerprint(Buffer.from(b.contents.identity.publicKey, 'base64')), fp);
  t.same(b.contents.requestKeys, a.contents.requestKeys);
  t.equal(codeOf(() => createVault(path, PASS, WEAK, a.contents)), 'vault_exists');
  const updated = updateVault(path, a.keys, (c) => addClient(c, 'alice', Buffer.alloc(32, 1), new Date()));
  t.equal(readVault(path, PASS).contents.clients[0]?.name, 'alice', 'an update under the cached keys opens with the passphrase');
  t.equal(updated.contents.identity.privateKey, a.contents.identity.privateKey);
  t.match(readFileSync(path).subarray(0, 8).toString('latin1'), 'PHANTOMA');
});

t.test('wrong passphrase, truncation and flipped bytes are refused with exact codes; the file is unchanged', async (t) => {
  const { path, bytes } = fresh('b.phv');
  const unchanged = (label: string, expected: Buffer): void => {
    if (!readFileSync(path).equals(expected)) t.fail(`${label}: the file changed`);
  };
  t.equal(codeOf(() => readVault(path, { kind: 'passphrase', secret: Buffer.from('wrong') })), 'vault_passphrase_wrong');
  unchanged('wrong passphrase', bytes);
  t.equal(codeOf(() => readVault(path, { kind: 'keyfile', secret: randomBytes(32) })), 'vault_passphrase_wrong', 'a key file for a passphrase vault');

  for (const len of [0, 1, 8, 40, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 1, bytes.length >> 1, bytes.length - 16, bytes.length - 1]) {
    const cut = bytes.subarray(0, len);
    writeFileSync(path, cut);
    t.equal(codeOf(() => readVault(path, PASS)), 'vault_corrupt', `truncated to ${len} bytes`);
    unchanged(`truncated ${len}`, cut);
  }
  writeFileSync(path, Buffer.concat([bytes, Buffer.from([0])]));
  t.equal(codeOf(() => readVault(path, PASS)), 'vault_corrupt', 'a trailing byte');

  // Every header byte, two flips each (low bit, all bits): refused before any KDF runs.
  const headerCodes = new Set<string>();
  let headerBytes = 0;
  for (let i = 0; i < HEADER_BYTES; i++) {
    for (const mask of [0x01, 0xff]) {
      const bad = Buffer.from(bytes);
      bad[i]! ^= mask;
      writeFileSync(path, bad);
      const code = codeOf(() => readVault(path, PASS));
      headerCodes.add(code);
      if (code !== 'vault_corrupt') t.fail(`header byte ${i} ^ ${mask}: ${code}`);
      unchanged(`header byte ${i}`, bad);
    }
    headerBytes++;
  }
  t.equal(headerBytes, HEADER_BYTES);
  t.same([...headerCodes], ['vault_corrupt'], `all ${HEADER_BYTES} header bytes × 2 flips: vault_corrupt`);

  // 300 body positions spread over the whole body, including the first and last (tag) bytes.
  const bodyLen = bytes.length - HEADER_BYTES;
  const positions = new Set<number>([0, 1, bodyLen - 16, bodyLen - 1]);
  for (let k = 0; positions.size < 300 && k < 10_000; k++) positions.add(Math.floor((k * bodyLen) / 296 + k * 7) % bodyLen);
  t.equal(positions.size, 300);
  const bodyCodes = new Set<string>();
  for (const p of positions) {
    const bad = Buffer.from(bytes);
    bad[HEADER_BYTES + p]! ^= 1 << (p % 8);
    writeFileSync(path, bad);
    const code = codeOf(() => readVault(path, PASS));
    bodyCodes.add(code);
    if (code !== 'vault_corrupt') t.fail(`body byte ${p}: ${code}`);
    unchanged(`body byte ${p}`, bad);
  }
  t.same([...bodyCodes], ['vault_corrupt'], `${positions.size} body positions: vault_corrupt`);
  writeFileSync(path, bytes);
  t.ok(readVault(path, PASS), 'the intact file still opens');
});

t.test('absurd KDF parameters are refused before deriving, even with a valid header checksum', async (t) => {
  const { path, bytes } = fresh('c.phv');
  const cases: Array<[string, number, number]> = [
    ['log2N 30', 11, 30],
    ['log2N 21', 11, 21],
    ['log2N 9', 11, 9],
    ['r 255', 12, 255],
    ['r 0', 12, 0],
    ['p 200', 13, 200],
    ['memory 2 GiB (log2N 20, r 16)', -1, 0],
  ];
  for (const [label, offset, value] of cases) {
    const bad = Buffer.from(bytes);
    if (offset >= 0) bad[offset] = value;
    else {
      bad[11] = 20;
      bad[12] = 16;
    }
    createHash('sha256').update(bad.subarray(0, 64)).digest().copy(bad, 64, 0, 16);
    writeFileSync(path, bad);
    const started = performance.now();
    t.equal(codeOf(() => readVault(path, PASS)), 'vault_kdf_refused', label);
    t.ok(performance.now() - started < 200, `${label}: refused in ${(performance.now() - started).toFixed(1)} ms (no derivation)`);
    t.ok(readFileSync(path).equals(bad), `${label}: file unchanged`);
  }
  t.equal(SCRYPT_BOUNDS.maxMemBytes, 1 << 30);
});

t.test('a key-file credential (systemd credential) opens its vault; a passphrase does not', async (t) => {
  const path = join(tmp, 'k.phv');
  const keyfile = { kind: 'keyfile' as const, secret: randomBytes(32) };
  createVault(path, keyfile, WEAK, makeVaultContents({ now: new Date(), requestKeyValidityMs: 1000 }));
  t.equal(parseHeader(readFileSync(path), 'vault').kdf, 2);
  t.ok(readVault(path, keyfile).contents.identity.publicKey);
  t.equal(codeOf(() => readVault(path, PASS)), 'vault_passphrase_wrong');
  t.equal(codeOf(() => readVault(path, { kind: 'keyfile', secret: randomBytes(32) })), 'vault_passphrase_wrong');
  t.equal(codeOf(() => readVault(path, keyfile, 'backup')), 'vault_corrupt', 'a vault is not opened as a backup');
  t.equal(codeOf(() => createVault(join(tmp, 'short.phv'), { kind: 'keyfile', secret: randomBytes(16) }, WEAK, makeVaultContents({ now: new Date(), requestKeyValidityMs: 1000 }))), 'vault_credential_missing');
});

t.test('SIGKILL after every write step leaves the old or the new vault, never neither; no temp file survives a read', async (t) => {
  const { path, bytes } = fresh('crash.phv');
  let old = bytes;
  for (const step of WRITE_STEPS) {
    const r = spawnSync(process.execPath, [join(ROOT, 'test', 'vault', 'crash-writer.ts'), path, step, PASS.secret.toString()], { encoding: 'utf8', timeout: 30_000 });
    t.equal(r.signal, 'SIGKILL', `${step}: the writer was killed (${r.stderr.trim()})`);
    const now = readFileSync(path);
    const opened = readVault(path, PASS);
    const hasNew = opened.contents.clients.some((c) => c.name === 'crash-client');
    const renamed = WRITE_STEPS.indexOf(step) >= WRITE_STEPS.indexOf('renamed');
    t.equal(hasNew, renamed, `${step}: ${renamed ? 'the new' : 'the old'} vault`);
    if (!renamed) t.ok(now.equals(old), `${step}: the old vault byte for byte`);
    t.same(readdirSync(tmp).filter((n) => n.startsWith('.crash.phv.')), [], `${step}: no temp file left after a read`);
    if (hasNew) {
      // Back to the old contents for the next step, so each step starts from a vault without the client.
      writeFileSync(path, bytes);
      old = bytes;
    }
  }
});

t.test('one writer at a time: a live writer holds the lock and keeps its temp file; a dead one loses both', async (t) => {
  const { path } = fresh('lock.phv');
  const sleeper = spawn('sleep', ['30'], { stdio: 'ignore' });
  t.teardown(() => sleeper.kill('SIGKILL'));
  const lock = join(tmp, '.lock.phv.lock');
  const temp = join(tmp, `.lock.phv.${sleeper.pid}.${'ab'.repeat(6)}.tmp`);
  writeFileSync(lock, String(sleeper.pid));
  writeFileSync(temp, 'a live writer is still writing this');
  const before = readFileSync(path);
  t.equal(codeOf(() => updateVault(path, PASS, (c) => addClient(c, 'x', Buffer.alloc(32, 2), new Date()))), 'vault_locked');
  t.ok(readFileSync(path).equals(before), 'the vault is unchanged');
  readVault(path, PASS);
  t.ok(existsSync(temp), "a live writer's temp file is left alone");
  sleeper.kill('SIGKILL');
  await new Promise((r) => sleeper.once('exit', r));
  updateVault(path, PASS, (c) => addClient(c, 'x', Buffer.alloc(32, 2), new Date()));
  t.equal(readVault(path, PASS).contents.clients.length, 1, "a dead writer's lock is taken over");
  t.notOk(existsSync(lock), 'and released');
  t.notOk(existsSync(temp), "a dead writer's temp file is removed");
});
