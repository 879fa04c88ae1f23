// The control plane's online timestamp role on a real Postgres server: only the instance holding the
// advisory lock re-signs; two control-plane instances on one database serve one monotonic timestamp, pick
// up a newly published snapshot, and a node refreshing through either sees the same repository.
import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { publicPart } from '../../src/updates/keys.ts';
import { addTarget, initRepo, publish, signTargets } from '../../src/release/repo.ts';
import { listReleases, type UpdateTrust } from '../../src/updates/verify.ts';
import { openDb, migrate } from '../../control-plane/src/db.ts';
import { createTimestampResigner, TIMESTAMP_LOCK } from '../../control-plane/src/updates.ts';
import { startPostgres } from '../control-plane/postgres.ts';
import { makeDataDir, startCpRig } from '../control-plane/rig.ts';
import { makeKeys, makeRelease } from './fixture.ts';

const work = mkdtempSync(join(tmpdir(), 'phantoma-ts-'));
const server = await startPostgres();
t.teardown(async () => {
  await server.stop();
  rmSync(work, { recursive: true, force: true });
});

const keys = makeKeys();
const [alice, bob] = keys.m;
const repo = join(work, 'repo');
initRepo({ dir: repo, rootKeys: [keys.root], rootThreshold: 1, maintainers: keys.m.slice(0, 3).map(publicPart), threshold: 2, snapshotKey: publicPart(keys.snapshot), timestampKey: publicPart(keys.timestamp) });
const tsKeyFile = join(work, 'timestamp.key.json');
writeFileSync(tsKeyFile, JSON.stringify(keys.timestamp), { mode: 0o600 });

async function release(version: string): Promise<void> {
  await addTarget({ dir: repo, file: await makeRelease(work, version), version });
  await signTargets({ dir: repo, key: alice! });
  await signTargets({ dir: repo, key: bob! });
  // The maintainers do not hold the online timestamp key: the control plane signs the timestamp.
  publish({ dir: repo, snapshotKey: keys.snapshot });
}

t.test('only the advisory-lock holder re-signs, and versions only grow', async (t) => {
  await release('0.2.0');
  const a = await openDb(server.url, work);
  const b = await openDb(server.url, work);
  t.teardown(async () => {
    await a.close();
    await b.close();
  });
  await migrate(a);
  const opts = { repoDir: repo, key: keys.timestamp, everyMs: 60_000, expiresInMs: 86_400_000, renewBeforeMs: 43_200_000 };
  const ra = createTimestampResigner({ ...opts, db: a });
  const rb = createTimestampResigner({ ...opts, db: b });
  const holder = new pg.Client({ connectionString: server.url });
  await holder.connect();
  t.teardown(() => holder.end());
  await holder.query('SELECT pg_advisory_lock($1)', [TIMESTAMP_LOCK]);
  t.same(await Promise.all([ra.tick(), rb.tick()]), [undefined, undefined], 'neither signs while another session holds the lock');
  await holder.query('SELECT pg_advisory_unlock($1)', [TIMESTAMP_LOCK]);
  const first = await ra.tick();
  t.equal(first, 1, 'the lock holder signs version 1');
  t.equal(await rb.tick(), undefined, 'the other finds it fresh and does nothing');
  // Force both to want a new one (renew window larger than the validity) and race them.
  const eager = { ...opts, renewBeforeMs: 10 * 86_400_000 };
  const results = await Promise.all([createTimestampResigner({ ...eager, db: a }).tick(), createTimestampResigner({ ...eager, db: b }).tick()]);
  const signed = results.filter((r): r is number => r !== undefined).sort();
  t.ok(signed.length >= 1 && new Set(signed).size === signed.length, `each version signed once (${JSON.stringify(results)})`);
  const [row] = await a.query<{ version: number }>('SELECT version FROM update_timestamp WHERE id = 1');
  t.equal(row!.version, Math.max(...signed), 'the stored timestamp is the newest');
});

t.test('two control-plane instances on one Postgres serve one repository; a new snapshot is picked up', async (t) => {
  const dataDir = makeDataDir();
  const overrides = { updates: { repoDir: repo, timestampKeyFile: tsKeyFile, resignEverySeconds: 1 } };
  const cp1 = await startCpRig({ database: server.url, dataDir, overrides });
  const cp2 = await startCpRig({ database: server.url, dataDir, overrides });
  t.teardown(async () => {
    await cp1.close();
    await cp2.close();
    rmSync(dataDir, { recursive: true, force: true });
  });
  const metadataDir = mkdtempSync(join(work, 'tuf-'));
  writeFileSync(join(metadataDir, 'root.json'), (await import('node:fs')).readFileSync(join(repo, 'metadata', '1.root.json')));
  const via = (rig: typeof cp1): UpdateTrust => ({ metadataDir, repository: { url: `${rig.cp.url}/v1/updates/`, fetcher: { pin: rig.cp.fingerprint } } });
  t.same((await listReleases(via(cp1))).map((r) => r.version), ['0.2.0'], 'through instance 1');
  await release('0.3.0');
  const end = Date.now() + 15_000;
  let seen: string[] = [];
  while (Date.now() < end) {
    seen = (await listReleases(via(cp2))).map((r) => r.version);
    if (seen.includes('0.3.0')) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  t.same(seen, ['0.3.0', '0.2.0'], 'through instance 2, after a re-signed timestamp names the new snapshot');
  t.same((await listReleases(via(cp1))).map((r) => r.version), ['0.3.0', '0.2.0'], 'and back through instance 1: no version went backwards');
});
