// Signed updates end to end against a real control plane on loopback (issue 12): a 2-of-3 release
// installs and passes its trial boot; every attack is refused with its specific error (tuf-js's class as
// the cause) with nothing installed and the running slot byte-identical; root rotation; failed trials
// roll back by themselves; manual rollback.
import t, { type Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync, existsSync, createReadStream, realpathSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { UnsignedMetadataError, LengthOrHashMismatchError } from '@tufjs/models/dist/error.js';
import { BadVersionError, ExpiredMetadataError, DownloadLengthMismatchError } from 'tuf-js/dist/error.js';
import { Metadata, MetadataKind } from '@tufjs/models';
import { publicPart, tufSigner, type PrivateKeyFile } from '../../src/updates/keys.ts';
import { addTarget, initRepo, publish, rotateRoot, signBundle, signTargets, signTimestamp, latestRoot, bundlePath } from '../../src/release/repo.ts';
import { verifyArtifactOffline, type UpdateTrust } from '../../src/updates/verify.ts';
import { initSlots, slotDir, otherSlot, currentSlot } from '../../src/updates/slots.ts';
import { applyUpdate, checkForUpdate, manualRollback, updateStatus } from '../../src/updates/update.ts';
import { checkAuditEvent, type AuditEvent } from '../../src/audit/audit-events.ts';
import { PhantomaError } from '../../src/errors.ts';
import { ROOT } from '../helpers.ts';
import { forcePublish, makeKeys, makeRelease, nodeTrust, startRepoCp, tamperedRelease, treeDigest } from './fixture.ts';

const work = mkdtempSync(join(tmpdir(), 'phantoma-update-'));
const repo = join(work, 'repo');
const nodeRoot = join(work, 'node');
const keys = makeKeys();
const [alice, bob, carol, dave] = keys.m as [PrivateKeyFile, PrivateKeyFile, PrivateKeyFile, PrivateKeyFile];
const TRIAL_MS = 8000;
const audit: AuditEvent[] = [];

initRepo({ dir: repo, rootKeys: [keys.root], rootThreshold: 1, maintainers: [alice, bob, carol].map(publicPart), threshold: 2, snapshotKey: publicPart(keys.snapshot), timestampKey: publicPart(keys.timestamp) });

async function release(version: string, signers: PrivateKeyFile[], behaviour: 'ok' | 'crash' | 'hang' = 'ok'): Promise<{ name: string; file: string }> {
  const file = await makeRelease(work, version, behaviour);
  const { name } = await addTarget({ dir: repo, file, version });
  for (const k of signers) await signTargets({ dir: repo, key: k });
  return { name, file };
}

async function freePort(): Promise<number> {
  const s = net.createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as net.AddressInfo).port;
  s.close();
  return port;
}

async function getVersion(port: number): Promise<string | undefined> {
  try {
    const r = await fetch(`http://127.0.0.1:${port}/`);
    return ((await r.json()) as { version: string }).version;
  } catch {
    return undefined;
  }
}

// First install: the 0.1.0 tarball is verified on its own (two bundles, the pinned root), then unpacked.
const first = await makeRelease(work, '0.1.0');
const pinnedRoot = latestRoot(repo).signed;
const firstBundles = [await signBundle(first, alice), await signBundle(first, bob)];
t.same(verifyArtifactOffline(readFileSync(first), firstBundles, pinnedRoot).signers.length, 2, 'first install: the tarball verifies alone with 2 bundles');
await initSlots(nodeRoot, first);

// The empty first targets, signed and published, so the repository is complete.
await signTargets({ dir: repo, key: alice });
await signTargets({ dir: repo, key: bob });
publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp });

const rig = await startRepoCp(repo);
const trust: UpdateTrust = nodeTrust(repo, rig);
const deps = { root: nodeRoot, trust, trialMs: TRIAL_MS, audit: (e: AuditEvent) => audit.push(e) };
const port = await freePort();
const events: Array<{ type: string; version?: string; reason?: string }> = [];
const supervisor: ChildProcess = spawn(process.execPath, [join(ROOT, 'src', 'updates', 'supervisor-main.ts'), nodeRoot], {
  env: { ...process.env, TRIAL_PORT: String(port) },
  stdio: ['ignore', 'pipe', 'inherit'],
});
let buf = '';
supervisor.stdout!.on('data', (c: Buffer) => {
  buf += c.toString();
  for (let i = buf.indexOf('\n'); i !== -1; i = buf.indexOf('\n')) {
    events.push(JSON.parse(buf.slice(0, i)) as { type: string });
    buf = buf.slice(i + 1);
  }
});

t.teardown(async () => {
  supervisor.kill('SIGTERM');
  if (supervisor.exitCode === null) await Promise.race([once(supervisor, 'exit'), new Promise((r) => setTimeout(r, 8000))]);
  if (supervisor.exitCode === null) supervisor.kill('SIGKILL');
  await rig.close();
  rmSync(work, { recursive: true, force: true });
  rmSync(trust.metadataDir, { recursive: true, force: true });
});

async function waitFor<T>(what: string, fn: () => T | undefined | Promise<T | undefined>, ms = 20_000): Promise<T> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const v = await fn();
    if (v !== undefined && v !== false) return v as T;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

async function restartAndWait(kind: 'trial_passed' | 'trial_failed' | 'started'): Promise<{ type: string; version?: string; reason?: string }> {
  const from = events.length;
  supervisor.kill('SIGHUP');
  return waitFor(kind, () => events.slice(from).find((e) => e.type === kind), TRIAL_MS + 15_000);
}

function snapshotNode(): { running: string; current: string; state: string; inactive: string } {
  const cur = currentSlot(nodeRoot);
  const inactive = slotDir(nodeRoot, otherSlot(cur));
  return {
    running: treeDigest(realpathSync(join(nodeRoot, 'current'))),
    current: readlinkSync(join(nodeRoot, 'current')),
    state: readFileSync(join(nodeRoot, 'update-state.json'), 'utf8'),
    inactive: existsSync(inactive) ? treeDigest(inactive) : 'absent',
  };
}

async function refused(t: Test, code: string, cls: (new (...a: never[]) => Error) | undefined, opts: { name?: string; allowed?: string; trust?: UpdateTrust } = {}): Promise<void> {
  const before = snapshotNode();
  const auditFrom = audit.length;
  const err = await applyUpdate({ ...deps, ...(opts.trust ? { trust: opts.trust } : {}) }, { ...(opts.name ? { name: opts.name } : {}), ...(opts.allowed ? { allowed: opts.allowed } : {}) }).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(err instanceof PhantomaError, 'refused with a PhantomaError');
  t.equal((err as PhantomaError).code, code, `code ${code}: ${(err as Error).message}`);
  if (cls) t.ok((err as Error).cause instanceof cls, `tuf-js's ${cls.name} is the cause`);
  t.same(snapshotNode(), before, 'nothing installed: running slot byte-identical, inactive slot, link and state unchanged');
  t.notOk(existsSync(join(nodeRoot, 'slots', '.incoming')), 'no staging left behind');
  t.same(audit.slice(auditFrom).map((e) => e.type + ':' + (e as { code?: string }).code), [`update_refused:${code}`], 'the refusal is audited with its code');
  t.equal(await getVersion(port), updateStatus(nodeRoot).version, 'the node keeps serving its version');
}

await waitFor('the first start', () => events.find((e) => e.type === 'started'));
await waitFor('0.1.0 serving', async () => ((await getVersion(port)) === '0.1.0' ? true : undefined));

t.test('a valid 2-of-3 release installs, restarts, passes its trial boot, and the node reports it', async (t) => {
  const { name } = await release('0.2.0', [alice, bob]);
  publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp });
  const check = await checkForUpdate(deps);
  t.same(check, { running: '0.1.0', available: '0.2.0', name }, 'check names the newer release');
  const r = await applyUpdate(deps);
  t.equal(r.version, '0.2.0');
  t.equal(r.slot, 'b', 'into the inactive slot');
  t.same(r.release.signers.sort(), [alice.keyid, bob.keyid].sort(), 'two distinct maintainer bundles');
  t.equal(readlinkSync(join(nodeRoot, 'current')), 'slots/b', 'current swapped');
  const passed = await restartAndWait('trial_passed');
  t.equal(passed.version, '0.2.0');
  t.equal(await getVersion(port), '0.2.0', 'the new version serves');
  const status = updateStatus(nodeRoot);
  t.equal(status.version, '0.2.0', 'status reports the new version');
  t.equal(status.state.last?.result, 'installed');
  t.notOk(status.state.trial, 'the trial is over');
  for (const e of audit) t.equal(checkAuditEvent(e, []), undefined, `${e.type} fits the audit schema`);
  t.ok(audit.some((e) => e.type === 'update_installed' && e.version === '0.2.0' && e.signers === 2));
});

t.test('attack: one maintainer signature of the needed two', async (t) => {
  await release('0.3.0', [alice]);
  t.throws(() => publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp }), { code: 'release_threshold_not_met' }, 'publish refuses below threshold');
  forcePublish(repo, keys); // a compromised control plane publishes it anyway
  await refused(t, 'update_signatures_insufficient', UnsignedMetadataError);
});

t.test('attack: a target whose bytes do not match its metadata', async (t) => {
  const { name } = await release('0.3.1', [alice, bob]);
  publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp });
  const p = join(repo, 'targets', name);
  const bytes = readFileSync(p);
  bytes[bytes.length >> 1] = bytes[bytes.length >> 1]! ^ 0x01;
  writeFileSync(p, bytes);
  await refused(t, 'update_target_mismatch', LengthOrHashMismatchError);
});

t.test('attack: an endless-data target, larger than declared', async (t) => {
  const { name } = await release('0.3.2', [alice, bob]);
  publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp });
  // A repository on loopback that serves the real metadata and then never stops sending the target.
  let sent = 0;
  const server = http.createServer((req, res) => {
    const path = decodeURIComponent(req.url ?? '');
    if (path === `/targets/${name}`) {
      const chunk = Buffer.alloc(64 * 1024, 7);
      const pump = (): void => {
        while (sent < 1 << 30 && !res.destroyed) {
          sent += chunk.length;
          if (!res.write(chunk)) return void res.once('drain', pump);
        }
        res.end();
      };
      return pump();
    }
    const file = join(repo, path);
    if (!path.startsWith('/metadata/') && !path.startsWith('/targets/')) return res.writeHead(404).end();
    if (!existsSync(file) || !statSync(file).isFile()) return res.writeHead(404).end();
    createReadStream(file).pipe(res);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  const declared = statSync(join(repo, 'targets', name)).size;
  await refused(t, 'update_target_too_large', DownloadLengthMismatchError, { trust: { metadataDir: trust.metadataDir, repository: { url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}/` } } });
  // The server would send 1 GiB; what it got out is the declared length plus socket buffers.
  t.ok(sent < 64 * 1024 * 1024, `the download was cut off (${sent} bytes sent for ${declared} declared)`);
  server.closeAllConnections();
});

t.test('attack: a valid TUF release with only one Sigstore bundle', async (t) => {
  const { name } = await release('0.3.3', [alice, bob]);
  publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp });
  rmSync(bundlePath(repo, name, bob.keyid));
  await refused(t, 'update_bundles_insufficient', undefined);
});

t.test('attack: a signed tarball whose file does not match its manifest', async (t) => {
  const good = await makeRelease(work, '0.3.4');
  const bad = join(work, 'bad-0.3.4.tar.gz');
  await tamperedRelease(good, bad);
  await addTarget({ dir: repo, file: bad, version: '0.3.4', name: 'phantoma-0.3.4.tar.gz' });
  await signTargets({ dir: repo, key: alice });
  await signTargets({ dir: repo, key: bob });
  publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp });
  await refused(t, 'update_manifest_mismatch', undefined);
});

t.test('attack: freeze (an expired timestamp)', async (t) => {
  signTimestamp({ dir: repo, key: keys.timestamp, expiresInMs: -60_000 });
  await refused(t, 'update_metadata_expired', ExpiredMetadataError);
  signTimestamp({ dir: repo, key: keys.timestamp });
});

t.test('attack: rollback to older metadata', async (t) => {
  const old = readFileSync(join(repo, 'metadata', 'timestamp.json'));
  await checkForUpdate(deps); // the node now trusts this timestamp
  signTimestamp({ dir: repo, key: keys.timestamp });
  await checkForUpdate(deps); // ... and this newer one
  writeFileSync(join(repo, 'metadata', 'timestamp.json'), old);
  await refused(t, 'update_metadata_rollback', BadVersionError);
  signTimestamp({ dir: repo, key: keys.timestamp, version: JSON.parse(readFileSync(join(trust.metadataDir, 'timestamp.json'), 'utf8')).signed.version + 1 });
});

t.test('attack: mix-and-match metadata versions', async (t) => {
  const oldTargets = readFileSync(join(repo, 'metadata', 'targets.json'));
  await release('0.3.5', [alice, bob]);
  publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp });
  const newTargets = readFileSync(join(repo, 'metadata', 'targets.json'));
  writeFileSync(join(repo, 'metadata', 'targets.json'), oldTargets); // new snapshot, old targets
  await refused(t, 'update_metadata_rollback', BadVersionError);
  writeFileSync(join(repo, 'metadata', 'targets.json'), newTargets);
});

t.test('attack: a validly signed but older release', async (t) => {
  const { name } = await release('0.1.9', [alice, bob]);
  publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp });
  await refused(t, 'update_version_rollback', undefined, { name });
  await refused(t, 'update_not_allowed', undefined, { name: 'phantoma-0.3.5.tar.gz', allowed: '0.3.0' });
});

t.test('root rotation: the removed key no longer counts, the new key does', async (t) => {
  rotateRoot({ dir: repo, signingKeys: [keys.root], maintainers: [alice, bob, dave].map(publicPart), threshold: 2 });
  await release('0.4.0', [alice]);
  // carol's key was removed; whoever holds it still signs (signTargets itself would refuse the key)
  const stagedPath = join(repo, 'staged', 'targets.json');
  const staged = Metadata.fromJSON(MetadataKind.Targets, JSON.parse(readFileSync(stagedPath, 'utf8')));
  staged.sign(tufSigner(carol), true);
  writeFileSync(stagedPath, JSON.stringify(staged.toJSON()));
  await t.rejects(signTargets({ dir: repo, key: carol }), { code: 'release_key_invalid' }, 'the tool refuses a removed key');
  t.throws(() => publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp }), { code: 'release_threshold_not_met' }, "publish does not count the removed key's signature");
  forcePublish(repo, keys);
  await refused(t, 'update_signatures_insufficient', UnsignedMetadataError);
  const trusted = Metadata.fromJSON(MetadataKind.Root, JSON.parse(readFileSync(join(trust.metadataDir, 'root.json'), 'utf8'))).signed;
  t.equal(trusted.version, 2, 'the node followed the rotation to root version 2');

  await release('0.5.0', [alice, dave]);
  publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp });
  const r = await applyUpdate(deps);
  t.equal(r.version, '0.5.0');
  t.same(r.release.signers.sort(), [alice.keyid, dave.keyid].sort(), "the new key's bundle counts");
  await restartAndWait('trial_passed');
  t.equal(await getVersion(port), '0.5.0', 'the release signed with the new keys runs');
});

t.test('manual rollback returns to the previous slot', async (t) => {
  manualRollback(nodeRoot, (e) => audit.push(e));
  await restartAndWait('started');
  await waitFor('0.2.0 serving', async () => ((await getVersion(port)) === '0.2.0' ? true : undefined));
  t.equal(updateStatus(nodeRoot).version, '0.2.0');
  t.ok(audit.some((e) => e.type === 'update_rolled_back' && e.manual === true));
});

t.test('a release that crashes in its trial boot is rolled back by itself', async (t) => {
  await release('0.6.0', [alice, bob], 'crash');
  publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp });
  const before = treeDigest(realpathSync(join(nodeRoot, 'current')));
  await applyUpdate(deps);
  const failed = await restartAndWait('trial_failed');
  t.equal(failed.reason, 'exited');
  await waitFor('0.2.0 serving again', async () => ((await getVersion(port)) === '0.2.0' ? true : undefined));
  t.equal(treeDigest(realpathSync(join(nodeRoot, 'current'))), before, 'back on the old slot, byte-identical');
  const s = updateStatus(nodeRoot).state;
  t.equal(s.last?.result, 'rolled_back');
  t.equal(s.last?.code, 'update_trial_failed');
  const audited = events.filter((e) => e.type === 'audit').map((e) => (e as unknown as { event: AuditEvent }).event);
  t.ok(audited.some((e) => e.type === 'update_trial' && e.version === '0.6.0' && e.passed === false), 'the failed trial is audited');
  t.ok(audited.some((e) => e.type === 'update_rolled_back' && e.from === '0.6.0' && e.to === '0.2.0' && e.manual === false), 'and the rollback');
  t.ok(audited.some((e) => e.type === 'update_trial' && e.version === '0.2.0' && e.passed === true), 'the earlier good trial too');
  for (const e of audited) t.equal(checkAuditEvent(e, []), undefined, `${e.type} fits the audit schema`);
});

t.test('a release that never becomes ready is rolled back after its bound', async (t) => {
  await release('0.6.1', [alice, bob], 'hang');
  publish({ dir: repo, snapshotKey: keys.snapshot, timestampKey: keys.timestamp });
  await applyUpdate({ ...deps, trialMs: 1500 });
  const failed = await restartAndWait('trial_failed');
  t.equal(failed.reason, 'not_ready_in_time');
  await waitFor('0.2.0 serving again', async () => ((await getVersion(port)) === '0.2.0' ? true : undefined));
  t.equal(updateStatus(nodeRoot).version, '0.2.0');
  t.throws(() => manualRollback(nodeRoot), { code: 'update_no_previous_slot' }, 'a failed slot is not a rollback target');
});


