// The node's side against a real control plane on loopback (PGlite): the pin, lease verification, the
// ledger and its CLI, and licensing in a real gateway — expiry past grace refuses new inference with
// license_expired and /readyz says why; a renewal resumes it. The node opens no listener for any of it.
import t from 'tap';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { validateConfig } from '../../src/config/load.ts';
import { createLogger } from '../../src/logger.ts';
import { startNode } from '../../src/main.ts';
import { runCli } from '../../src/cli/main.ts';
import { readControlState } from '../../src/control/state.ts';
import { heartbeatOnce, enrolNode, signerFromPrivateKey } from '../../src/control/node.ts';
import { ledgerDirOf } from '../../src/control/ledger.ts';
import { evaluateLicense } from '../../src/control/license.ts';
import { DOMAIN, signWith, type SignedLease } from '../../src/control/protocol.ts';
import { ROOT } from '../helpers.ts';
import { startCpRig, simNode, snapshotDb, SNAPSHOT, type CpRig } from '../control-plane/rig.ts';

let rig: CpRig;
t.before(async () => {
  rig = await startCpRig();
});
t.teardown(async () => {
  await rig?.close();
});

const token = async (node: string): Promise<string> => (await rig.cp.service.createToken(node, 600)).token;

async function phantoma(stateDir: string, ...args: string[]): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const code = await runCli([...args, `--stateDir=${stateDir}`], { out: (s) => out.push(s), err: (s) => err.push(s) });
  return { code, out: out.join('\n'), err: err.join('\n') };
}

t.test('a wrong pin: refused before anything is sent', async (t) => {
  const node = simNode(rig);
  t.teardown(node.close);
  const tok = await token('pin-test');
  const before = await snapshotDb(rig.cp.db);
  const wrong = `sha256:${'ab'.repeat(32)}`;
  await t.rejects(node.enrol(tok, undefined, wrong), { code: 'control_plane_pin_mismatch' });
  t.equal(await snapshotDb(rig.cp.db), before, 'the control plane recorded nothing (the token is unused)');
  t.notOk(readControlState(node.stateDir), 'the node stored nothing');
  t.equal((await node.enrol(tok)).node, 'pin-test', 'the token still works with the right pin');
});

t.test('a lease signed by another key is refused and not stored', async (t) => {
  const node = simNode(rig);
  t.teardown(node.close);
  await node.enrol(await token('forged-lease'));
  await node.beat();
  const before = readFileSync(join(node.stateDir, 'control', 'state.json'), 'utf8');
  const other = generateKeyPairSync('ed25519').privateKey;
  const state = readControlState(node.stateDir)!;
  // A control plane that holds the pinned TLS key but signs leases with another key (or a relay in between).
  const forge = (counter: number): SignedLease => {
    const lease = { ...state.lease.lease, counter, expiresAt: new Date(Date.now() + 365 * 86_400_000).toISOString() };
    return { lease, signature: signWith(other, DOMAIN.lease, lease) };
  };
  const client = { post: async () => ({ status: 200, body: JSON.stringify({ lease: forge(state.counter + 1) }), publicKey: state.controlPlaneKey }) };
  await t.rejects(heartbeatOnce({ stateDir: node.stateDir, signer: node.signer, version: '0.1.0', snapshot: () => SNAPSHOT, client }), { code: 'lease_invalid', message: /not signed by the pinned control plane key/ });
  const after = readControlState(node.stateDir)!;
  t.same(after.lease, state.lease, 'the stored lease is unchanged');
  t.equal(after.counter, state.counter + 1, 'only the counter moved (it is never reused)');
  t.not(readFileSync(join(node.stateDir, 'control', 'state.json'), 'utf8'), before);

  // The same at enrolment: the answer must be signed by the key the TLS pin matched.
  const fresh = simNode(rig);
  t.teardown(fresh.close);
  const lease = { ...state.lease.lease, counter: 0 };
  const enrolClient = { post: async () => ({ status: 200, body: JSON.stringify({ lease: { lease, signature: signWith(other, DOMAIN.lease, lease) } }), publicKey: state.controlPlaneKey }) };
  await t.rejects(
    enrolNode({ url: rig.cp.url, pin: rig.cp.fingerprint, token: `phcp_${'B'.repeat(43)}`, signer: fresh.signer, stateDir: fresh.stateDir, version: '0.1.0', client: enrolClient }),
    { code: 'lease_invalid' },
  );
  t.notOk(readControlState(fresh.stateDir), 'no lease stored');
});

t.test('the ledger holds every exchange exactly as sent and received; log and verify', async (t) => {
  const node = simNode(rig);
  t.teardown(node.close);
  const tok = await token('ledger-node');
  await node.enrol(tok);
  await node.beat();
  await node.beat();
  const log = await phantoma(node.stateDir, 'heartbeat', 'log', '--json');
  t.equal(log.code, 0, log.err);
  const entries = JSON.parse(log.out) as Array<{ type: string; body?: string; status?: number }>;
  t.same(entries.map((e) => e.type), ['enrol_sent', 'enrol_received', 'heartbeat_sent', 'heartbeat_received', 'heartbeat_sent', 'heartbeat_received']);
  const ledgerText = readdirSync(ledgerDirOf(node.stateDir)).map((f) => readFileSync(join(ledgerDirOf(node.stateDir), f), 'utf8')).join('');
  t.notOk(ledgerText.includes(tok), 'the token is never written down');
  // What the control plane stored is exactly what the ledger says was sent.
  const rows = await rig.cp.db.query<{ body: unknown }>("SELECT body FROM heartbeats WHERE node_name = 'ledger-node' ORDER BY counter");
  t.same(rows.map((r) => r.body), entries.filter((e) => e.type === 'heartbeat_sent').map((e) => JSON.parse(e.body!)));
  const received = JSON.parse(entries[5]!.body!) as { lease: SignedLease };
  t.same(received.lease, readControlState(node.stateDir)!.lease, 'the lease in use is the one received');
  for (const e of entries.filter((e) => e.type === 'heartbeat_sent')) {
    t.notMatch(e.body!, /prompt|messages|content|"ip"|client/i, 'a heartbeat carries no content or client identity');
  }

  const ok = await phantoma(node.stateDir, 'heartbeat', 'verify');
  t.equal(ok.code, 0);
  t.match(ok.out, /heartbeat ledger verified: 6 entries/);
  const file = join(ledgerDirOf(node.stateDir), 'audit.log');
  const lines = readFileSync(file, 'utf8').split('\n');
  t.ok(lines[2]!.includes('\\"requests\\":3'), 'line 3 holds the first heartbeat as sent');
  lines[2] = lines[2]!.replace('\\"requests\\":3', '\\"requests\\":4');
  writeFileSync(file, lines.join('\n'));
  const bad = await phantoma(node.stateDir, 'heartbeat', 'verify');
  t.equal(bad.code, 7);
  t.match(bad.err, /line 3: hash does not match the entry \(the line was edited\) \[audit_chain_broken\]/);

  const status = JSON.parse((await phantoma(node.stateDir, 'heartbeat', 'status', '--json')).out) as { license: string; node: string; counter: number };
  t.same([status.license, status.node, status.counter], ['valid', 'ledger-node', 2]);
});

t.test('license decisions (pure)', async (t) => {
  const lease = { ...readControlStateOrLease(), expiresAt: '2030-01-10T00:00:00.000Z', graceSeconds: 86400, maxClockSkewSeconds: 300 };
  const at = (iso: string): number => Date.parse(iso);
  t.equal(evaluateLicense(lease, at('2030-01-01T00:00:00Z'), at('2030-01-09T23:59:59Z'), false).state, 'valid');
  t.equal(evaluateLicense(lease, at('2030-01-01T00:00:00Z'), at('2030-01-10T12:00:00Z'), false).state, 'grace');
  const expired = evaluateLicense(lease, at('2030-01-01T00:00:00Z'), at('2030-01-11T00:00:00Z'), false);
  t.equal(expired.state, 'expired');
  t.equal(expired.refusal?.code, 'license_expired');
  t.equal(evaluateLicense(lease, at('2030-01-05T00:00:00Z'), at('2030-01-04T00:00:00Z'), false).refusal?.code, 'license_expired', 'a clock wound back past the skew bound');
  t.equal(evaluateLicense(lease, at('2030-01-05T00:00:00Z'), at('2030-01-04T23:56:00Z'), false).state, 'valid', 'within the skew bound');
  t.equal(evaluateLicense({ ...lease, status: 'revoked' }, undefined, at('2030-01-02T00:00:00Z'), false).refusal?.code, 'license_revoked');
  t.equal(evaluateLicense(undefined, undefined, 0, false).refusal, undefined, 'not enrolled and not required: no licensing');
  t.equal(evaluateLicense(undefined, undefined, 0, true).refusal?.code, 'not_enrolled');
});

function readControlStateOrLease(): SignedLease['lease'] {
  return {
    v: 1,
    node: 'x',
    enrolment: 'A'.repeat(22),
    status: 'active',
    counter: 0,
    issuedAt: '2030-01-01T00:00:00.000Z',
    notBefore: '2030-01-01T00:00:00.000Z',
    expiresAt: '2030-01-10T00:00:00.000Z',
    graceSeconds: 0,
    maxClockSkewSeconds: 300,
    heartbeatIntervalSeconds: 600,
    plan: { name: 'standard', maxModels: 16, maxWorkers: 64 },
    newestRelease: '0.1.0',
  };
}

/** Inodes of this process's listening TCP sockets. */
function listeningSockets(): Set<string> {
  const inodes = new Set<string>();
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/self/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {
      /* closed meanwhile */
    }
  }
  const listening = new Set<string>();
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    for (const line of readFileSync(table, 'utf8').split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols[3] === '0A' && inodes.has(cols[9]!)) listening.add(cols[9]!);
    }
  }
  return listening;
}

t.test('expiry past grace stops new inference with license_expired; renewal resumes it', async (t) => {
  const stateDir = mkdtempSync(join(tmpdir(), 'phantoma-licensed-'));
  t.teardown(() => rmSync(stateDir, { recursive: true, force: true }));
  const signer = signerFromPrivateKey(generateKeyPairSync('ed25519').privateKey);
  await enrolNode({ url: rig.cp.url, pin: rig.cp.fingerprint, token: await token('licensed'), signer, stateDir, version: '0.1.0', clock: () => rig.clock.now });

  const r = validateConfig({
    stateDir,
    cacheDir: join(ROOT, '.cache'),
    gateway: { host: '127.0.0.1', port: 0, metricsPort: 0, tls: 'off', auth: 'none', shutdownGraceMs: 2000 },
    pool: { size: 1, maxActive: 1, allowUnencryptedSwap: true },
    workers: { backend: 'process' },
    egress: { mode: 'off' },
    inference: { threads: 1, contextSize: 512, persistentThreadpool: false },
    control: { required: true, heartbeats: false },
  });
  if (!r.ok) throw new Error(JSON.stringify(r.issues));
  const logs: string[] = [];
  const logger = createLogger({ level: 'warn', destination: new Writable({ write: (c: Buffer, _e, cb) => (logs.push(c.toString()), cb()) }) });
  const listenersBefore = listeningSockets();
  const node = await startNode(r.config, { logger, heartbeatSigner: signer, controlClock: () => rig.clock.now });
  t.teardown(() => node.close());
  const newListeners = [...listeningSockets()].filter((i) => !listenersBefore.has(i));
  t.equal(newListeners.length, 2, 'the node listens on its API and metrics ports only: nothing for the control plane');

  const ask = async (): Promise<{ status: number; body: { error?: { code: string } } }> => {
    const res = await fetch(`${node.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'tiny', prompt: 'hi', max_tokens: 2 }) });
    return { status: res.status, body: (await res.json()) as { error?: { code: string } } };
  };
  const ready = async (): Promise<{ status: number; body: { reasons?: string[] } }> => {
    const res = await fetch(`${node.url}/readyz`);
    return { status: res.status, body: (await res.json()) as { reasons?: string[] } };
  };
  for (let i = 0; i < 200 && (await ready()).status !== 200; i++) await new Promise((res) => setTimeout(res, 100));
  t.equal((await ready()).status, 200, 'ready with a valid lease');
  t.equal((await ask()).status, 200, 'inference is served');

  const lease = readControlState(stateDir)!.lease.lease;
  rig.clock.now = Date.parse(lease.expiresAt) + 1000;
  t.equal((await ask()).status, 200, 'past expiry but within grace: still served');
  rig.clock.now = Date.parse(lease.expiresAt) + lease.graceSeconds * 1000 + 1000;
  const refused = await ask();
  t.equal(refused.status, 503);
  t.equal(refused.body.error?.code, 'license_expired', 'past expiry plus grace: refused with license_expired');
  const notReady = await ready();
  t.equal(notReady.status, 503);
  t.match(notReady.body.reasons?.join(' '), /license_expired: the lease expired at/, '/readyz says why');

  // The control plane is reachable again: one heartbeat renews the lease (its clock is the same test clock).
  const renewed = await heartbeatOnce({ stateDir, signer, version: '0.1.0', snapshot: () => SNAPSHOT, clock: () => rig.clock.now });
  t.ok(Date.parse(renewed.lease.lease.expiresAt) > rig.clock.now);
  rig.clock.now += 1500; // the gate re-reads the state file at most once a second
  let again = await ready();
  t.notMatch(again.body.reasons?.join(' '), /license/, 'no license reason once renewed');
  // The pool refills after the refused period; on a loaded 2-core machine a worker start can take seconds.
  for (let i = 0; i < 600 && again.status !== 200; i++) {
    await new Promise((res) => setTimeout(res, 100));
    again = await ready();
  }
  t.equal(again.status, 200, 'ready again');
  t.equal((await ask()).status, 200, 'renewal resumes inference');
});

t.test("keyd's heartbeat signatures are what the control plane verifies", async (t) => {
  const { signPayload } = await import('../../src/vault/signing.ts');
  const { canonicalBytes, verifySignature, rawPublicKeyOf } = await import('../../src/control/protocol.ts');
  const { keydSigner } = await import('../../src/control/node.ts');
  const { createPublicKey } = await import('node:crypto');
  const identity = generateKeyPairSync('ed25519').privateKey;
  // keyd's sign op for the gateway: signPayload(identity, 'heartbeat', payload) (src/vault/keyd.ts).
  const keyd = { sign: async (purpose: 'heartbeat', payload: Uint8Array) => signPayload(identity, purpose, payload) };
  const signer = keydSigner(keyd);
  const hb = { v: 1, node: 'n', counter: 1, counters: SNAPSHOT.counters };
  const sig = (await signer.sign(canonicalBytes(hb))).toString('base64url');
  t.ok(verifySignature(rawPublicKeyOf(createPublicKey(identity)), DOMAIN.heartbeat, hb, sig));
  t.notOk(verifySignature(rawPublicKeyOf(createPublicKey(identity)), DOMAIN.lease, hb, sig), 'never valid as a lease');
});

t.test('the ledger vocabulary is closed', async (t) => {
  const { checkLedgerEvent } = await import('../../src/control/ledger.ts');
  const ok = (e: unknown): string | undefined => checkLedgerEvent(e, []);
  t.equal(ok({ type: 'heartbeat_sent', url: 'https://127.0.0.1:8444', body: '{}' }), undefined);
  t.match(ok({ type: 'heartbeat_sent', url: 'https://127.0.0.1:8444', body: '{}', prompt: 'x' }), /has no field prompt/);
  t.match(ok({ type: 'request_served', url: 'https://x', body: '' }), /unknown ledger event type/);
  t.match(ok({ type: 'heartbeat_sent', url: 'http://plain', body: '' }), /must be an https URL/);
  t.match(ok({ type: 'exchange_failed', url: 'https://x', code: 'Not A Code' }), /must be an error code/);
  t.match(ok({ type: 'heartbeat_received', url: 'https://x', status: 1000, body: '' }), /HTTP status/);
});
