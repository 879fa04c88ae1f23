// The control plane on a real PostgreSQL server, and two control-plane instances on that one server:
// enrolment, heartbeats and renewal end to end; a node's heartbeats alternating between the instances keep
// its counter monotonic; racing and replayed heartbeats across instances are refused, never double-counted.
import t from 'tap';
import { copyFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createControlPlaneClient } from '../../src/control/client.ts';
import { heartbeatOnce } from '../../src/control/node.ts';
import { readControlState } from '../../src/control/state.ts';
import { canonicalBytes, type HeartbeatBody } from '../../src/control/protocol.ts';
import { KEY_FILE, PUBLIC_FILE } from '../../control-plane/src/lease-key.ts';
import { startPostgres, type PgServer } from './postgres.ts';
import { makeDataDir, startCpRig, simNode, postRaw, SNAPSHOT, type CpRig } from './rig.ts';

let pg: PgServer;
let a: CpRig;
let b: CpRig;
const clock = { now: Date.now() };
t.before(async () => {
  pg = await startPostgres();
  // Two instances, as on two hosts: each its own data dir (admin socket) holding a copy of the one lease key.
  const dirA = makeDataDir();
  const dirB = mkdtempSync(join(tmpdir(), 'phantoma-cp-b-'));
  for (const f of [KEY_FILE, PUBLIC_FILE]) copyFileSync(join(dirA, f), join(dirB, f));
  // Started together on an empty database: the migrations' advisory lock makes exactly one apply them.
  [a, b] = await Promise.all([startCpRig({ database: pg.url, dataDir: dirA, clock }), startCpRig({ database: pg.url, dataDir: dirB, clock })]);
  t.teardown(() => {
    rmSync(dirA, { recursive: true, force: true });
    rmSync(dirB, { recursive: true, force: true });
  });
});
t.teardown(async () => {
  await a?.close();
  await b?.close();
  await pg?.stop();
});

t.test('both instances run on the real server, migrated once', async (t) => {
  t.equal(a.cp.db.kind, 'postgres');
  t.equal(b.cp.db.kind, 'postgres');
  const rows = await a.cp.db.query<{ name: string }>('SELECT name FROM schema_migrations');
  t.same(rows.map((r) => r.name).sort(), ['001_init.sql', '010_update_timestamp.sql']);
  t.equal(a.cp.fingerprint, b.cp.fingerprint, 'one lease key, one pin for the fleet');
});

t.test('enrolment, heartbeats and renewal end to end on Postgres', async (t) => {
  const node = simNode(a);
  t.teardown(node.close);
  const { token } = await a.cp.service.createToken('pg-node', 600);
  const enrolled = await node.enrol(token);
  t.equal(enrolled.lease.lease.status, 'active');
  let expires = Date.parse(enrolled.lease.lease.expiresAt);
  for (let i = 1; i <= 3; i++) {
    clock.now += 60_000;
    const s = await node.beat();
    t.equal(s.counter, i);
    t.ok(Date.parse(s.lease.lease.expiresAt) > expires, 'renewed');
    expires = Date.parse(s.lease.lease.expiresAt);
  }
  const shown = await b.cp.service.showNode('pg-node');
  t.equal(shown.lastCounter, 3, 'the other instance sees the same state');
  t.equal(shown.leaseState, 'valid');
  // A token used at one instance is used at the other.
  const other = simNode(b);
  t.teardown(other.close);
  await t.rejects(other.enrol(token, b.cp.url), { code: 'control_plane_refused', details: { cpCode: 'cp_token_used' } });
});

t.test('heartbeats alternating between two instances keep the counter monotonic', async (t) => {
  const node = simNode(a);
  t.teardown(node.close);
  await node.enrol((await b.cp.service.createToken('alternating', 600)).token);
  const clients = [a, b].map((r) => createControlPlaneClient({ url: r.cp.url, pin: r.cp.fingerprint }));
  for (let i = 1; i <= 10; i++) {
    const s = await heartbeatOnce({ stateDir: node.stateDir, signer: node.signer, version: '0.1.0', snapshot: () => SNAPSHOT, clock: () => clock.now, client: clients[i % 2]! });
    t.equal(s.lease.lease.counter, i);
  }
  const counters = await a.cp.db.query<{ c: string }>("SELECT counter::text AS c FROM heartbeats WHERE node_name = 'alternating' ORDER BY received_at, counter");
  t.same(counters.map((r) => Number(r.c)), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);

  // A heartbeat accepted by one instance is a replay at the other.
  const state = readControlState(node.stateDir)!;
  const sign = async (counter: number): Promise<string> => {
    const hb: HeartbeatBody = { v: 1, node: state.node, enrolment: state.enrolment, counter, time: new Date(clock.now).toISOString(), version: '0.1.0', counters: SNAPSHOT.counters, pool: SNAPSHOT.pool };
    return JSON.stringify({ heartbeat: hb, signature: (await node.signer.sign(canonicalBytes(hb))).toString('base64url') });
  };
  const eleven = await sign(11);
  t.equal((await postRaw(a.cp, '/v1/heartbeat', eleven)).status, 200);
  const replay = await postRaw(b.cp, '/v1/heartbeat', eleven);
  t.equal(replay.json.error?.code, 'cp_counter_stale', 'replayed at the other instance: refused');

  // The same new counter sent to both at once: exactly one is accepted.
  const twelve = await sign(12);
  const raced = await Promise.all([postRaw(a.cp, '/v1/heartbeat', twelve), postRaw(b.cp, '/v1/heartbeat', twelve)]);
  t.same(raced.map((r) => r.status).sort(), [200, 409], 'one accepted, one refused');
  t.equal(raced.find((r) => r.status === 409)!.json.error?.code, 'cp_counter_stale');

  // Many increasing counters racing across both instances: whatever order they land in, the stored
  // counter never goes back and the history holds each accepted counter once.
  const bodies = await Promise.all(Array.from({ length: 20 }, (_, i) => sign(13 + i)));
  const results = await Promise.all(bodies.map((body, i) => postRaw([a, b][i % 2]!.cp, '/v1/heartbeat', body)));
  const accepted = results.flatMap((r, i) => (r.status === 200 ? [13 + i] : []));
  t.ok(accepted.length >= 1);
  for (const r of results) if (r.status !== 200) t.equal(r.json.error?.code, 'cp_counter_stale');
  const [row] = await b.cp.db.query<{ c: string }>("SELECT last_counter::text AS c FROM nodes WHERE name = 'alternating'");
  t.equal(Number(row!.c), Math.max(...accepted), 'the stored counter is the highest accepted');
  const history = await b.cp.db.query<{ c: string }>("SELECT counter::text AS c FROM heartbeats WHERE node_name = 'alternating' AND counter >= 13 ORDER BY counter");
  const seen = history.map((h) => Number(h.c));
  t.same([...seen].sort((x, y) => x - y), [...accepted].sort((x, y) => x - y), 'history holds exactly the accepted counters');
});
