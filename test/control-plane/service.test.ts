// The control plane end to end on embedded PGlite: enrolment, heartbeats, renewal, administration and every
// refusal — each refusal with its exact code and a check that the database did not change.
import t, { type Test } from 'tap';
import { generateKeyPairSync } from 'node:crypto';
import { readControlState } from '../../src/control/state.ts';
import { canonicalBytes, sha256Hex, type HeartbeatBody } from '../../src/control/protocol.ts';
import { signerFromPrivateKey } from '../../src/control/node.ts';
import { runCpCli } from '../../control-plane/src/main.ts';
import { startCpRig, simNode, postRaw, snapshotDb, SNAPSHOT, type CpRig } from './rig.ts';

let rig: CpRig;
t.before(async () => {
  rig = await startCpRig();
});
t.teardown(async () => {
  await rig?.close();
});

async function cli(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  const out: string[] = [];
  const err: string[] = [];
  const code = await runCpCli([...args, '--data-dir', rig.dataDir], { out: (s) => out.push(s), err: (s) => err.push(s), env: {} });
  return { code, out: out.join('\n'), err: err.join('\n') };
}

async function token(node: string, ttl = '10m'): Promise<string> {
  const r = await cli('tokens', 'create', '--node', node, '--ttl', ttl);
  if (r.code !== 0) throw new Error(r.err);
  return r.out.trim();
}

/** A heartbeat body for the node's current state, signed by `signWith` (default: the node's own key). */
async function craft(node: ReturnType<typeof simNode>, change: (hb: HeartbeatBody) => Record<string, unknown> = (hb) => hb, signer = node.signer): Promise<string> {
  const state = readControlState(node.stateDir)!;
  const hb: HeartbeatBody = {
    v: 1,
    node: state.node,
    enrolment: state.enrolment,
    counter: state.counter + 1,
    time: new Date(rig.clock.now).toISOString(),
    version: '0.1.0',
    counters: SNAPSHOT.counters,
    pool: SNAPSHOT.pool,
  };
  const body = change(hb);
  const signature = (await signer.sign(canonicalBytes(body))).toString('base64url');
  return JSON.stringify({ heartbeat: body, signature });
}

async function refusedWith(t: Test, path: string, body: string, code: string, status: number): Promise<void> {
  const before = await snapshotDb(rig.cp.db);
  const r = await postRaw(rig.cp, path, body);
  t.equal(r.json.error?.code, code, `refused with ${code}`);
  t.equal(r.status, status);
  t.equal(await snapshotDb(rig.cp.db), before, 'nothing was recorded');
}

t.test('enrolment, heartbeats and renewal end to end', async (t) => {
  const node = simNode(rig);
  t.teardown(node.close);
  const tok = await token('alpha');
  t.match(tok, /^phcp_[A-Za-z0-9_-]{43}$/);
  const rows = await rig.cp.db.query<{ token_sha256: string }>('SELECT token_sha256 FROM enrol_tokens');
  t.ok(rows.some((r) => r.token_sha256 === sha256Hex(tok)), 'the token is stored as its hash');
  t.notOk(JSON.stringify(rows).includes(tok), 'and never in clear');

  const enrolled = await node.enrol(tok);
  t.equal(enrolled.node, 'alpha');
  t.equal(enrolled.lease.lease.status, 'active');
  t.equal(enrolled.lease.lease.counter, 0);

  let last = enrolled;
  for (let i = 1; i <= 3; i++) {
    rig.clock.now += 3_600_000;
    const s = await node.beat();
    t.equal(s.counter, i);
    t.equal(s.lease.lease.counter, i, 'the lease answers this heartbeat');
    t.ok(Date.parse(s.lease.lease.expiresAt) > Date.parse(last.lease.lease.expiresAt), 'each heartbeat renews the lease');
    last = s;
  }
  const list = JSON.parse((await cli('nodes', 'list', '--json')).out) as { nodes: Array<Record<string, unknown>> };
  const alpha = list.nodes.find((n) => n.name === 'alpha')!;
  t.equal(alpha.lastCounter, 3);
  t.equal(alpha.leaseState, 'valid');
  t.equal(alpha.lastVersion, '0.1.0');
  const show = JSON.parse((await cli('nodes', 'show', 'alpha', '--json')).out) as { history: Array<{ counter: number }>; lastState: { counters: unknown }; publicKeyFingerprint: string };
  t.same(show.history.map((h) => h.counter), [3, 2, 1]);
  t.same(show.lastState.counters, SNAPSHOT.counters);
  t.equal(show.publicKeyFingerprint, `sha256:${sha256Hex(node.signer.publicKey)}`);

  const metrics = await (await fetch(rig.cp.metricsUrl)).text();
  t.match(metrics, /phantoma_cp_heartbeats_total\{outcome="ok"\} 3/);
  t.match(metrics, /phantoma_cp_enrolments_total\{outcome="ok"\} 1/);
  t.match(metrics, /phantoma_cp_nodes\{state="valid"\} 1/);
});

t.test('enrolment refusals: reused, expired and unknown tokens, a forged claim', async (t) => {
  const node = simNode(rig);
  t.teardown(node.close);
  const tok = await token('bravo');
  await node.enrol(tok);

  const other = simNode(rig);
  t.teardown(other.close);
  let before = await snapshotDb(rig.cp.db);
  await t.rejects(other.enrol(tok), { code: 'control_plane_refused', details: { cpCode: 'cp_token_used' } }, 'a reused token');
  t.equal(await snapshotDb(rig.cp.db), before, 'nothing was recorded');
  t.notOk(readControlState(other.stateDir), 'the node stored no lease');

  const short = await token('charlie', '1s');
  rig.clock.now += 2000;
  before = await snapshotDb(rig.cp.db);
  await t.rejects(other.enrol(short), { code: 'control_plane_refused', details: { cpCode: 'cp_token_expired' } }, 'an expired token');
  t.equal(await snapshotDb(rig.cp.db), before, 'nothing was recorded');

  before = await snapshotDb(rig.cp.db);
  await t.rejects(other.enrol(`phcp_${'A'.repeat(43)}`), { code: 'control_plane_refused', details: { cpCode: 'cp_token_unknown' } }, 'an unknown token');
  t.equal(await snapshotDb(rig.cp.db), before, 'nothing was recorded');

  // A claim signed by one key but carrying another public key: no proof of possession.
  const fresh = await token('delta');
  const mallory = signerFromPrivateKey(generateKeyPairSync('ed25519').privateKey);
  const claim = { v: 1, tokenSha256: sha256Hex(fresh), publicKey: other.signer.publicKey.toString('base64url'), time: new Date(rig.clock.now).toISOString(), version: '0.1.0' };
  const signature = (await mallory.sign(canonicalBytes(claim))).toString('base64url');
  await refusedWith(t, '/v1/enrol', JSON.stringify({ token: fresh, claim, signature }), 'cp_bad_signature', 401);
  t.equal((await other.enrol(fresh)).node, 'delta', 'the token was not consumed by the refused attempt');
});

t.test('heartbeat refusals, each with its own code and nothing recorded', async (t) => {
  const node = simNode(rig);
  t.teardown(node.close);
  await node.enrol(await token('echo'));
  await node.beat();
  const accepted = await craft(node);
  t.equal((await postRaw(rig.cp, '/v1/heartbeat', accepted)).status, 200, 'a well-formed heartbeat is accepted');

  await t.test('a replayed heartbeat', (t) => refusedWith(t, '/v1/heartbeat', accepted, 'cp_counter_stale', 409));
  await t.test('a stale counter', async (t) => refusedWith(t, '/v1/heartbeat', await craft(node, (hb) => ({ ...hb, counter: 1 })), 'cp_counter_stale', 409));
  await t.test('a body that is not JSON', (t) => refusedWith(t, '/v1/heartbeat', '{"heartbeat":', 'cp_invalid_json', 400));
  await t.test('a bad signature', async (t) => {
    const mallory = signerFromPrivateKey(generateKeyPairSync('ed25519').privateKey);
    await refusedWith(t, '/v1/heartbeat', await craft(node, (hb) => hb, mallory), 'cp_bad_signature', 401);
    // A valid signature over different content: one byte of a counter changed after signing.
    const good = JSON.parse(await craft(node)) as { heartbeat: HeartbeatBody; signature: string };
    good.heartbeat.counters.requests += 1;
    await refusedWith(t, '/v1/heartbeat', JSON.stringify(good), 'cp_bad_signature', 401);
  });
  await t.test('an unknown node', async (t) => refusedWith(t, '/v1/heartbeat', await craft(node, (hb) => ({ ...hb, node: 'nobody-here' })), 'cp_node_unknown', 404));
  await t.test('an extra field', async (t) => {
    await refusedWith(t, '/v1/heartbeat', await craft(node, (hb) => ({ ...hb, prompt: 'tell me a secret' })), 'cp_schema_violation', 400);
    await refusedWith(t, '/v1/heartbeat', await craft(node, (hb) => ({ ...hb, counters: { ...hb.counters, clientIp: 1 } })), 'cp_schema_violation', 400);
    const r = JSON.parse(await craft(node)) as Record<string, unknown>;
    await refusedWith(t, '/v1/heartbeat', JSON.stringify({ ...r, extra: 1 }), 'cp_schema_violation', 400);
  });
  await t.test('a value out of bounds', async (t) => refusedWith(t, '/v1/heartbeat', await craft(node, (hb) => ({ ...hb, version: 'x'.repeat(33) })), 'cp_schema_violation', 400));
  await t.test('an oversized body', async (t) => {
    const r = JSON.parse(await craft(node)) as Record<string, unknown>;
    await refusedWith(t, '/v1/heartbeat', JSON.stringify({ ...r, pad: 'x'.repeat(5000) }), 'cp_body_too_large', 413);
  });
  await t.test('a clock too far off', async (t) => refusedWith(t, '/v1/heartbeat', await craft(node, (hb) => ({ ...hb, counter: hb.counter + 5, time: new Date(rig.clock.now + 3_600_000).toISOString() })), 'cp_clock_skew', 400));

  await t.test('a revoked node learns it at its next heartbeat', async (t) => {
    const r = JSON.parse((await cli('nodes', 'revoke', 'echo', '--json')).out) as { status: string; leaseState: string };
    t.equal(r.status, 'revoked');
    t.equal(r.leaseState, 'revoked');
    const before = await snapshotDb(rig.cp.db);
    await t.rejects(node.beat(), { code: 'license_revoked' });
    t.equal(await snapshotDb(rig.cp.db), before, 'nothing was recorded');
    const state = readControlState(node.stateDir)!;
    t.equal(state.lease.lease.status, 'revoked', 'the node stored the signed revocation');
    await refusedWith(t, '/v1/heartbeat', await craft(node), 'cp_node_revoked', 403);
    const cliRefusal = await cli('tokens', 'create', '--node', 'echo');
    t.equal(cliRefusal.code, 4);
    t.match(cliRefusal.err, /\[cp_node_revoked\]/, 'no new token for a revoked node');
  });
});

t.test('re-enrolment of a restored node with a new token', async (t) => {
  const node = simNode(rig);
  t.teardown(node.close);
  await node.enrol(await token('foxtrot'));
  await node.beat();
  await node.beat();
  const oldBody = await craft(node);
  // Restored from a vault backup: the same identity key, but the control state is gone.
  const restored = simNode(rig, node.signer);
  t.teardown(restored.close);
  const again = await restored.enrol(await token('foxtrot'));
  t.equal(again.node, 'foxtrot');
  t.not(again.enrolment, readControlState(node.stateDir)!.enrolment, 'a new enrolment');
  t.equal((await restored.beat()).counter, 1, 'the counter starts again for the new enrolment');
  await refusedWith(t, '/v1/heartbeat', oldBody, 'cp_enrolment_superseded', 409);
});

t.test('history is pruned after heartbeat.historyDays; tokens after they expire', async (t) => {
  const node = simNode(rig);
  t.teardown(node.close);
  await node.enrol(await token('golf'));
  await node.beat();
  const count = async (): Promise<number> => Number((await rig.cp.db.query<{ n: number }>("SELECT count(*)::int AS n FROM heartbeats WHERE node_name = 'golf'"))[0]!.n);
  t.equal(await count(), 1);
  rig.clock.now += (rig.config.heartbeat.historyDays + 1) * 86_400_000;
  const r = await rig.cp.service.prune();
  t.ok(r.heartbeats >= 1);
  t.equal(await count(), 0);
  const nodes = await rig.cp.service.listNodes();
  t.equal(nodes.find((n) => n.name === 'golf')!.leaseState, 'expired', 'a node silent past expiry plus grace shows as expired');
});

t.test('every cp_ error code is unique and documented in control-plane/README.md', async (t) => {
  const { CP_ERRORS } = await import('../../control-plane/src/errors.ts');
  const { readFileSync } = await import('node:fs');
  const doc = readFileSync(new URL('../../control-plane/README.md', import.meta.url), 'utf8');
  const codes = Object.values(CP_ERRORS).map((e) => e.code);
  t.equal(new Set(codes).size, codes.length, 'no code is used twice');
  for (const e of Object.values(CP_ERRORS)) t.match(doc, new RegExp(`^\\| \`${e.code}\` \\| ${e.status} \\| ${e.exit} \\|`, 'm'), `${e.code} has a row`);
  const documented = [...doc.matchAll(/^\| `(cp_[a-z0-9_]+)` \|/gm)].map((m) => m[1]);
  t.same(documented.filter((c) => !codes.includes(c!)), [], 'the doc lists no code that does not exist');
});

t.test('phantoma-cp key init|show, and configuration errors that name the key', async (t) => {
  const { mkdtempSync, rmSync, statSync, readFileSync } = await import('node:fs');
  const { tmpdir } = await import('node:os');
  const { join } = await import('node:path');
  const dir = mkdtempSync(join(tmpdir(), 'phantoma-cp-key-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const config = join(dir, 'cp.json');
  const { writeFileSync } = await import('node:fs');
  writeFileSync(config, JSON.stringify({ dataDir: dir, key: { kdfLog2N: 10, allowWeakKdf: true } }));
  const run = async (env: Record<string, string>, ...args: string[]): Promise<{ code: number; out: string; err: string }> => {
    const out: string[] = [];
    const err: string[] = [];
    const code = await runCpCli([...args, '--config', config], { out: (s) => out.push(s), err: (s) => err.push(s), env });
    return { code, out: out.join('\n'), err: err.join('\n') };
  };
  const missing = await run({}, 'key', 'init');
  t.equal(missing.code, 9);
  t.match(missing.err, /no lease key credential.*\[cp_key_unreadable\]/);
  const made = await run({ PHANTOMA_CP_PASSPHRASE: 'pp' }, 'key', 'init', '--json');
  t.equal(made.code, 0, made.err);
  const fp = (JSON.parse(made.out) as { fingerprint: string }).fingerprint;
  t.match(fp, /^sha256:[0-9a-f]{64}$/);
  t.equal(statSync(join(dir, 'lease-key.phv')).mode & 0o777, 0o600, 'the sealed key is 0600');
  t.notOk(readFileSync(join(dir, 'lease-key.phv')).includes(Buffer.from('PRIVATE')), 'sealed, not PEM');
  t.equal((await run({}, 'key', 'show')).out, fp, 'show needs no secret');
  const again = await run({ PHANTOMA_CP_PASSPHRASE: 'pp' }, 'key', 'init');
  t.equal(again.code, 9);
  t.match(again.err, /\[cp_key_exists\]/);
  const { openLeaseKey } = await import('../../control-plane/src/lease-key.ts');
  t.throws(() => openLeaseKey(dir, { kind: 'passphrase', secret: Buffer.from('wrong') }), { code: 'cp_key_unreadable' });
  t.equal(openLeaseKey(dir, { kind: 'passphrase', secret: Buffer.from('pp') }).fingerprint, fp);

  writeFileSync(config, JSON.stringify({ dataDir: dir, heartbeat: { historyDays: 0 }, extra: 1 }));
  const bad = await run({}, 'key', 'show');
  t.equal(bad.code, 2);
  t.match(bad.err, /heartbeat\.historyDays/);
  t.match(bad.err, /extra: unknown key/);
  t.match(bad.err, /\[cp_config_invalid\]/);
});
