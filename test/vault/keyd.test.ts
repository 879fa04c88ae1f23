// keyd on real sockets and real cgroups: a process placed in a warden-style worker cgroup
// (<name>/workers/<16 hex>, worker uid) decapsulates exactly once — a second attempt is refused, also over
// a new connection — and the key matches the client's; another worker cgroup gets its own one; a plain
// process, a root process in a worker cgroup and a worker asking for a signature are refused; refusals
// and decapsulations reach the audit callback; the gateway's uid gets signatures and the key document.
import t from 'tap';
import { spawn } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { createLogger } from '../../src/logger.ts';
import { makeVaultContents, identityFingerprint, requestKeyId } from '../../src/vault/contents.ts';
import { createVault } from '../../src/vault/store.ts';
import { startKeydProcess } from '../../src/vault/keyd-process.ts';
import { createKeydClient } from '../../src/vault/keyd-client.ts';
import type { KeydAuditEvent } from '../../src/vault/keyd.ts';
import { combineKem, encapsulate } from '../../src/sealed/kem.ts';
import { sessionKeysB64, keysOf } from './session-keys.ts';
import { encodeSignedKeyDocument, verifyKeyDocument, verifyPayload } from '../../src/vault/signing.ts';
import { ed25519PublicKeyObject } from '../../src/vault/contents.ts';
import { isPhantomaError } from '../../src/errors.ts';

t.equal(process.getuid?.(), 0, 'keyd tests run as root (they make cgroups and switch uids)');
const RUN = `${process.pid}-${Date.now().toString(36)}`;
const CG_NAME = `phantoma-keyd-test-${RUN}`;
// The socket directory must be reachable by the worker uids.
const dir = mkdtempSync('/var/tmp/phantoma-keyd-test-');
chmodSync(dir, 0o755);
const socketPath = join(dir, 'keyd.sock');
const vaultPath = join(dir, 'vault.phv');
const passphrase = 'keyd test passphrase';

// The v2 hierarchy of this process: <mount><own cgroup>/<CG_NAME>/workers/<id>, as the warden makes it.
function v2Base(): string {
  const mount = readFileSync('/proc/self/mountinfo', 'utf8').split('\n').map((l) => l.split(' ')).find((f) => f[f.indexOf('-') + 1] === 'cgroup2')![4]!;
  const own = readFileSync('/proc/self/cgroup', 'utf8').split('\n').find((l) => l.startsWith('0::'))!.slice(3);
  return join(mount, own === '/' ? '' : own, CG_NAME);
}
const base = v2Base();
// The same subtree as /proc/<pid>/cgroup names it (relative to the v2 root), for the Docker-style parent.
const ownRel = readFileSync('/proc/self/cgroup', 'utf8').split('\n').find((l) => l.startsWith('0::'))!.slice(3).replace(/^\/$/, '');
const DOCKER_PARENT = `${ownRel}/${CG_NAME}/docker`;
const made: string[] = [];
function workerCgroup(id = randomBytes(8).toString('hex')): { path: string; id: string } {
  const path = join(base, 'workers', id);
  mkdirSync(path, { recursive: true });
  made.push(path);
  return { path, id };
}

const contents = makeVaultContents({ now: new Date(), requestKeyValidityMs: 86_400_000, tls: { key: 'tls-key-pem', cert: 'not a cert' } });
createVault(vaultPath, { kind: 'passphrase', secret: Buffer.from(passphrase) }, { log2N: 10, r: 8, p: 1 }, contents);
const key = contents.requestKeys[0]!;
const nodePub = { x25519: Buffer.from(key.x25519Public, 'base64'), mlkem: Buffer.from(key.mlkemPublic, 'base64') };

const audits: KeydAuditEvent[] = [];
const keyd = await startKeydProcess({
  vaultPath,
  socketPath,
  gatewayUid: 0,
  cgroupName: CG_NAME,
  workerUids: { from: 61000, to: 61999 },
  dockerCgroupParent: DOCKER_PARENT,
  logLevel: 'warn',
  env: { ...process.env, PHANTOMA_VAULT_PASSPHRASE: passphrase },
  logger: createLogger({ level: 'silent' }),
  audit: (e) => audits.push(e),
});
t.teardown(async () => {
  await keyd.stop();
  for (const p of made.reverse()) rmdirSync(p);
  for (const p of [join(base, 'workers'), join(base, 'docker'), base]) {
    try {
      rmdirSync(p);
    } catch {
      /* not made */
    }
  }
  rmSync(dir, { recursive: true, force: true });
});

/** One sealed request's KEM fields, and the key the client derived for it. */
function sealedFields(): { request: Record<string, string>; expected: { bodyKey: string; responseKey: string } } {
  const kem = encapsulate(nodePub);
  const transcriptHash = randomBytes(32);
  const expected = sessionKeysB64(combineKem(kem, transcriptHash));
  const b64 = (b: Uint8Array): string => Buffer.from(b).toString('base64');
  return { request: { op: 'decapsulate', keyId: key.id, ephemeralPublicKey: b64(kem.ephemeralPublicKey), kemCiphertext: b64(kem.kemCiphertext), transcriptHash: b64(transcriptHash) }, expected };
}

// A caller: a plain node process with the given uid which, once placed (in a cgroup or not), sends each
// request over its own new connection and prints the replies.
const CALLER = `
const net = require('node:net');
const reqs = JSON.parse(process.argv[1]);
const one = (r) => new Promise((resolve) => {
  const s = net.connect(process.argv[2]);
  let b = '';
  s.on('data', (c) => { b += c; if (b.includes('\\n')) { s.end(); resolve(JSON.parse(b)); } });
  s.on('error', (e) => resolve({ ok: false, code: 'connect_' + e.code }));
  s.write(JSON.stringify(r) + '\\n');
});
process.stdin.once('data', async () => {
  const out = [];
  for (const r of reqs) out.push(await one(r));
  process.stdout.write(JSON.stringify(out));
  process.exit(0);
});`;

async function runCaller(opts: { uid: number; cgroup?: string; requests: object[] }): Promise<Array<Record<string, unknown>>> {
  const child = spawn(process.execPath, ['-e', CALLER, JSON.stringify(opts.requests), socketPath], { uid: opts.uid, gid: opts.uid, cwd: '/', stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (c: Buffer) => (out += c));
  child.stderr.on('data', (c: Buffer) => (err += c));
  const done = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
  // Placed before it connects: keyd reads the caller's cgroup when the connection arrives.
  if (opts.cgroup) writeFileSync(join(opts.cgroup, 'cgroup.procs'), String(child.pid));
  child.stdin.write('go\n');
  const code = await done;
  if (code !== 0) throw new Error(`caller exited ${code}: ${err}`);
  return JSON.parse(out) as Array<Record<string, unknown>>;
}

t.test('a worker decapsulates once; a second try is refused, also over a new connection', async (t) => {
  const w = workerCgroup();
  const a = sealedFields();
  const b = sealedFields();
  const [first, second] = await runCaller({ uid: 61001, cgroup: w.path, requests: [a.request, b.request] });
  t.equal(first?.ok, true, JSON.stringify(first));
  t.same(keysOf(first), a.expected, "keyd derived the client's two one-way keys");
  t.notOk('requestKey' in (first ?? {}), 'the per-request key itself stays in keyd');
  t.same(second, { ok: false, code: 'keyd_refused', message: 'this worker has already had its one decapsulation' });
  // A new process in the same worker cgroup (a child the worker forked) is the same worker.
  const [again] = await runCaller({ uid: 61001, cgroup: w.path, requests: [sealedFields().request] });
  t.equal(again?.code, 'keyd_refused', 'still refused from a new process and connection in that cgroup');
  const w2 = workerCgroup();
  const c = sealedFields();
  const [other] = await runCaller({ uid: 61002, cgroup: w2.path, requests: [c.request] });
  t.same(keysOf(other), c.expected, 'another worker cgroup has its own one decapsulation');
  t.same(
    audits.filter((e) => e.type === 'keyd_decapsulated').map((e) => (e as { workerId: string }).workerId),
    [w.id, w2.id],
    'each decapsulation is audited with its worker id',
  );
  t.equal(audits.filter((e) => e.type === 'keyd_refusal' && e.reason === 'second_decapsulation' && e.workerId === w.id).length, 2, 'both refusals audited');
});

t.test('a Docker-backend worker (<cgroupParent>/<64 hex container id>) also decapsulates exactly once', async (t) => {
  const id = randomBytes(32).toString('hex');
  const c = workerCgroup(`../docker/${id}`);
  const a = sealedFields();
  const [first, second] = await runCaller({ uid: 61006, cgroup: c.path, requests: [a.request, sealedFields().request] });
  t.same(keysOf(first), a.expected);
  t.equal(second?.code, 'keyd_refused');
  const short = workerCgroup(`../docker/${id.slice(0, 63)}`);
  t.equal((await runCaller({ uid: 61007, cgroup: short.path, requests: [sealedFields().request] }))[0]?.code, 'keyd_refused', 'not a container id: refused');
});

t.test('processes the warden did not start as workers are refused', async (t) => {
  const plain = await runCaller({ uid: 61003, requests: [sealedFields().request] });
  t.equal(plain[0]?.code, 'keyd_refused', 'a worker uid outside a worker cgroup');
  const w = workerCgroup();
  const root = await runCaller({ uid: 0, cgroup: w.path, requests: [sealedFields().request] });
  t.equal(root[0]?.code, 'keyd_refused', 'a worker cgroup but not a worker uid');
  const fake = join(base, 'not-workers', randomBytes(8).toString('hex'));
  mkdirSync(fake, { recursive: true });
  made.push(join(base, 'not-workers'), fake);
  const elsewhere = await runCaller({ uid: 61004, cgroup: fake, requests: [sealedFields().request] });
  t.equal(elsewhere[0]?.code, 'keyd_refused', 'a cgroup that is not under workers/');
  const w3 = workerCgroup();
  const signing = await runCaller({ uid: 61005, cgroup: w3.path, requests: [{ op: 'sign', purpose: 'receipt', payload: 'AAAA' }, { op: 'tls' }, { op: 'key-document', egressPolicyHash: '0'.repeat(64) }] });
  t.same(signing.map((r) => r.code), ['keyd_refused', 'keyd_refused', 'keyd_refused'], 'a worker cannot sign or read the TLS key');
  const reasons = audits.filter((e) => e.type === 'keyd_refusal').map((e) => e.reason);
  t.ok(reasons.includes('not_worker') && reasons.includes('not_gateway'), `refusals audited: ${[...new Set(reasons)].join(', ')}`);
});

t.test('the gateway uid gets signatures, TLS and the key document, but no decapsulation', async (t) => {
  const client = createKeydClient({ socketPath });
  const payload = Buffer.from('{"envelope":"abc","outcome":"ok"}');
  const sig = await client.sign('receipt', payload);
  const idPub = ed25519PublicKeyObject(Buffer.from(contents.identity.publicKey, 'base64'));
  t.ok(verifyPayload(idPub, 'receipt', payload, sig), 'receipt signature verifies');
  t.notOk(verifyPayload(idPub, 'heartbeat', payload, sig), 'a receipt signature is not a heartbeat signature');
  t.same(await client.tls(), { key: 'tls-key-pem', cert: 'not a cert' });
  const doc = await client.keyDocument({ egressPolicyHash: 'a'.repeat(64), tlsCertificateSha256: '' });
  const verified = verifyKeyDocument(encodeSignedKeyDocument(doc.document, Buffer.from(doc.signature, 'base64')), identityFingerprint(Buffer.from(contents.identity.publicKey, 'base64')));
  t.same(verified.requestKeys.map((k) => k.id), [requestKeyId(nodePub)]);
  await t.rejects(client.decapsulate({ keyId: key.id, ephemeralPublicKey: Buffer.alloc(32, 9), kemCiphertext: Buffer.alloc(1088), transcriptHash: Buffer.alloc(32) }), { code: 'keyd_refused' });
  const down = createKeydClient({ socketPath: join(dir, 'nothing.sock'), timeoutMs: 500 });
  const err = await down.ping().catch((e: unknown) => e);
  t.ok(isPhantomaError(err) && err.code === 'keyd_unavailable', 'no keyd: keyd_unavailable');
});

// A worker that holds its connection, as a warm worker does: pings, says "ready", records every line keyd
// sends, and on command reports them or sends a request over the same connection.
const HOLDER = `
const net = require('node:net');
const s = net.connect(process.argv[1]);
let b = '';
const lines = [];
s.on('data', (c) => {
  b += c;
  for (let i = b.indexOf('\\n'); i >= 0; i = b.indexOf('\\n')) {
    lines.push(JSON.parse(b.slice(0, i)));
    b = b.slice(i + 1);
    if (lines.length === 1) process.stdout.write('ready\\n');
  }
});
s.write('{"op":"ping"}\\n');
let cmd = '';
process.stdin.on('data', (d) => {
  cmd += d;
  for (let i = cmd.indexOf('\\n'); i >= 0; i = cmd.indexOf('\\n')) {
    const c = cmd.slice(0, i);
    cmd = cmd.slice(i + 1);
    if (c === 'report') process.stdout.write(JSON.stringify(lines.slice(1)) + '\\n');
    else if (c === 'exit') process.exit(0);
    else s.write(c + '\\n');
  }
});`;

async function holder(uid: number, cgroup: string): Promise<{ send(line: string): void; lines(min: number): Promise<Array<Record<string, unknown>>>; stop(): Promise<void> }> {
  const child = spawn(process.execPath, ['-e', HOLDER, socketPath], { uid, gid: uid, cwd: '/', stdio: ['pipe', 'pipe', 'pipe'] });
  writeFileSync(join(cgroup, 'cgroup.procs'), String(child.pid));
  let out = '';
  child.stdout.on('data', (c: Buffer) => (out += c));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const waitFor = async (pred: () => boolean, what: string): Promise<void> => {
    for (let i = 0; i < 200 && !pred(); i++) await new Promise((r) => setTimeout(r, 10));
    if (!pred()) throw new Error(`holder: no ${what}`);
  };
  await waitFor(() => out.startsWith('ready\n'), 'ready');
  return {
    send: (line) => child.stdin.write(line + '\n'),
    async lines(min) {
      // Asks until at least `min` lines arrived (bounded), then returns what keyd sent after the ping.
      for (let i = 0; i < 50; i++) {
        out = 'ready\n';
        child.stdin.write('report\n');
        await waitFor(() => out.split('\n').length > 2, 'report');
        const got = JSON.parse(out.split('\n')[1]!) as Array<Record<string, unknown>>;
        if (got.length >= min) return got;
        await new Promise((r) => setTimeout(r, 20));
      }
      throw new Error(`holder: fewer than ${min} lines`);
    },
    async stop() {
      child.stdin.write('exit\n');
      await exited;
    },
  };
}

const fieldsOf = (f: { request: Record<string, string> }): { keyId: string; ephemeralPublicKey: Buffer; kemCiphertext: Buffer; transcriptHash: Buffer } => ({
  keyId: f.request.keyId!,
  ephemeralPublicKey: Buffer.from(f.request.ephemeralPublicKey!, 'base64'),
  kemCiphertext: Buffer.from(f.request.kemCiphertext!, 'base64'),
  transcriptHash: Buffer.from(f.request.transcriptHash!, 'base64'),
});

t.test("the gateway's prepare pushes the key onto that worker's own connection, once", async (t) => {
  const w = workerCgroup();
  const other = workerCgroup();
  const hw = await holder(61010, w.path);
  const ho = await holder(61011, other.path);
  t.teardown(async () => {
    await hw.stop();
    await ho.stop();
  });
  const gateway = createKeydClient({ socketPath });
  const a = sealedFields();
  await gateway.prepare(w.id, fieldsOf(a));
  const [pushed] = await hw.lines(1);
  t.same(pushed, { push: 'request-key', transcriptHash: a.request.transcriptHash, ok: true, ...a.expected }, 'the worker got the keys for that envelope, unasked');
  // The once-per-worker rule holds across prepare and decapsulate, whichever comes first.
  const again = await gateway.prepare(w.id, fieldsOf(sealedFields())).catch((e: unknown) => e);
  t.ok(isPhantomaError(again) && again.code === 'keyd_refused', `a second prepare for that worker: keyd_refused (${String(again)})`);
  hw.send(JSON.stringify(sealedFields().request));
  const after = await hw.lines(2);
  t.same(after.slice(1), [{ ok: false, code: 'keyd_refused', message: 'this worker has already had its one decapsulation' }], 'its own decapsulation after the prepare: refused, and nothing else was pushed');
  t.same(await ho.lines(0), [], 'another worker connected at the same time got nothing');
  t.ok(audits.some((e) => e.type === 'keyd_refusal' && e.op === 'prepare' && e.reason === 'second_decapsulation' && e.workerId === w.id), 'the refused prepare is audited');
  t.ok(audits.some((e) => e.type === 'keyd_decapsulated' && e.workerId === w.id), 'the prepared decapsulation is audited as the worker\'s');
  // A worker that decapsulated itself first: the gateway's late prepare is refused, nothing is pushed.
  const b = sealedFields();
  ho.send(JSON.stringify(b.request));
  t.same(keysOf((await ho.lines(1))[0]), b.expected);
  const late = await gateway.prepare(other.id, fieldsOf(sealedFields())).catch((e: unknown) => e);
  t.ok(isPhantomaError(late) && late.code === 'keyd_refused', 'prepare after the worker asked: keyd_refused');
  t.equal((await ho.lines(1)).length, 1, 'no second key pushed');
});

t.test('a prepare for a worker without a connection counts nothing; only the gateway may prepare', async (t) => {
  const gateway = createKeydClient({ socketPath });
  const w = workerCgroup();
  const none = await gateway.prepare(w.id, fieldsOf(sealedFields())).catch((e: unknown) => e);
  t.ok(isPhantomaError(none) && none.code === 'keyd_worker_not_connected', `not connected: keyd_worker_not_connected (${String(none)})`);
  const c = sealedFields();
  const [own] = await runCaller({ uid: 61012, cgroup: w.path, requests: [c.request] });
  t.same(keysOf(own), c.expected, 'the worker still has its one decapsulation');
  const w2 = workerCgroup();
  const [byWorker] = await runCaller({ uid: 61013, cgroup: w2.path, requests: [{ ...sealedFields().request, op: 'prepare', workerId: w2.id }] });
  t.equal(byWorker?.code, 'keyd_refused', 'a worker cannot prepare');
  const bad = await gateway.prepare('not-an-id', fieldsOf(sealedFields())).catch((e: unknown) => e);
  t.ok(isPhantomaError(bad) && bad.code === 'invalid_request', 'a malformed worker id: invalid_request');
});
