// The maintainers' CLI (phantoma-release: keygen, init-repo, add-target, sign one maintainer at a time,
// publish refusing below threshold, rotate-root, offline verify, build) and the node's `phantoma update`
// against a repository carried as a directory (file: URL — the air-gapped path).
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { runReleaseCli } from '../../src/release/cli.ts';
import { runCli } from '../../src/cli/main.ts';
import { initSlots, markGoodIfOnTrial } from '../../src/updates/slots.ts';
import { ROOT } from '../helpers.ts';
import { makeRelease } from './fixture.ts';
import { PENDING_NAME, drainPendingAudit } from '../../src/audit/pending.ts';
import { createAuditLog, tailAuditLog, verifyAuditLog } from '../../src/audit/audit-log.ts';

const work = mkdtempSync(join(tmpdir(), 'phantoma-relcli-'));
t.teardown(() => rmSync(work, { recursive: true, force: true }));
const repo = join(work, 'repo');
const k = (n: string): string => join(work, n);

async function rel(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const code = await runReleaseCli(args, { out: (s) => (out += s + '\n'), err: (s) => (err += s + '\n') });
  return { code, out, err };
}

function relProcess(args: string[]): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(join(ROOT, 'bin', 'phantoma-release'), args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stderr });
    });
  });
}

t.test('keygen, init-repo, add-target, sign one at a time, publish only at threshold, rotate-root', async (t) => {
  for (const n of ['root', 'alice', 'bob', 'carol', 'dave', 'snapshot', 'timestamp']) t.equal((await rel('keygen', '--out', k(n), '--name', n)).code, 0, `keygen ${n}`);
  t.equal((readFileSync(k('alice.key.json')).length > 0 && (await import('node:fs')).statSync(k('alice.key.json')).mode & 0o777), 0o600, 'private key file is 0600');
  const init = await rel('init-repo', '--repo', repo, '--root-key', k('root.key.json'), '--maintainer', k('alice.pub.json'), '--maintainer', k('bob.pub.json'), '--maintainer', k('carol.pub.json'), '--threshold', '2', '--snapshot-key', k('snapshot.pub.json'), '--timestamp-key', k('timestamp.pub.json'));
  t.equal(init.code, 0, init.err);
  const tarball = await makeRelease(work, '0.2.0');
  t.equal((await rel('add-target', '--repo', repo, '--file', tarball, '--version', '0.2.0')).code, 0);
  const one = await rel('sign', '--repo', repo, '--key', k('alice.key.json'));
  t.match(one.out, /1 of 2 needed signatures; 1 Sigstore bundle/);
  // publish as a real process: refused, exit 11, nothing published
  const refused = await relProcess(['publish', '--repo', repo, '--snapshot-key', k('snapshot.key.json'), '--timestamp-key', k('timestamp.key.json')]);
  t.equal(refused.code, 11, 'exit 11');
  t.match(refused.stderr, /1 valid maintainer signature\(s\); 2 are needed; nothing was published \[release_threshold_not_met\]/);
  t.notOk(readdirSync(join(repo, 'metadata')).includes('targets.json'), 'no targets.json was written');
  t.match((await rel('sign', '--repo', repo, '--key', k('dave.key.json'))).err, /not a maintainer key.*\[release_key_invalid\]/, 'a key outside the root is refused');
  t.equal((await rel('sign', '--repo', repo, '--key', k('bob.key.json'))).code, 0);
  const pub = await rel('publish', '--repo', repo, '--snapshot-key', k('snapshot.key.json'), '--timestamp-key', k('timestamp.key.json'), '--json');
  t.equal(pub.code, 0, pub.err);
  t.same(JSON.parse(pub.out), { targetsVersion: 1, snapshotVersion: 1 }, 'the first published targets');
  // offline verification of the tarball alone: the pinned root and two bundles
  const bundles = readdirSync(join(repo, 'targets', 'phantoma-0.2.0.tar.gz.bundles')).map((f) => join(repo, 'targets', 'phantoma-0.2.0.tar.gz.bundles', f));
  t.equal(bundles.length, 2);
  const v = await rel('verify', '--file', tarball, '--root', join(repo, 'metadata', '1.root.json'), ...bundles.flatMap((b) => ['--bundle', b]));
  t.match(v.out, /verified: 2 distinct maintainer bundle/);
  const v1 = await rel('verify', '--file', tarball, '--root', join(repo, 'metadata', '1.root.json'), '--bundle', bundles[0]!, '--bundle', bundles[0]!);
  t.match(v1.err, /1 valid Sigstore bundle\(s\) from distinct maintainers; 2 are needed.*\[update_bundles_insufficient\]/, 'the same bundle twice counts once');
  t.equal(v1.code, 11);
  // rotate-root: carol out, dave in
  const rot = await rel('rotate-root', '--repo', repo, '--signing-key', k('root.key.json'), '--maintainer', k('alice.pub.json'), '--maintainer', k('bob.pub.json'), '--maintainer', k('dave.pub.json'), '--threshold', '2');
  t.equal(rot.code, 0, rot.err);
  t.match(rot.out, /root version 2/);
  const status = JSON.parse((await rel('status', '--repo', repo, '--json')).out) as { root: number; maintainers: string[] };
  t.equal(status.root, 2);
  t.equal(status.maintainers.length, 3);
});

t.test('phantoma update status|check|apply|rollback against a repository directory', async (t) => {
  const nodeRoot = join(work, 'node');
  await initSlots(nodeRoot, await makeRelease(work, '0.1.0'));
  const flags = [`--updates.root=${nodeRoot}`, `--updates.trustedRoot=${join(repo, 'metadata', '1.root.json')}`, `--updates.repositoryUrl=${pathToFileURL(repo).href}/`, `--stateDir=${join(work, 'state')}`];
  const run = async (...args: string[]): Promise<{ code: number; out: string; err: string }> => {
    let out = '';
    let err = '';
    const code = await runCli(['update', ...args, ...flags], { out: (s) => (out += s), err: (s) => (err += s) });
    return { code, out, err };
  };
  t.match((await run('status')).out, /running 0\.1\.0 from slot a/);
  const check = await run('check', '--json');
  t.equal(check.code, 0, check.err);
  t.same(JSON.parse(check.out), { running: '0.1.0', available: '0.2.0', name: 'phantoma-0.2.0.tar.gz' }, 'the root rotated to version 2 is followed; the 0.2.0 signed under root 1 stays valid');
  const apply = await run('apply', '--json');
  t.equal(apply.code, 0, apply.err);
  t.match(JSON.parse(apply.out), { version: '0.2.0', slot: 'b' });
  t.match((await run('status')).out, /running 0\.2\.0 from slot b; slot b \(0\.2\.0\) is on trial/);
  t.equal(markGoodIfOnTrial(nodeRoot, '/somewhere/else/main.ts'), undefined, 'only the release in the trial slot vouches for itself');
  t.equal(markGoodIfOnTrial(nodeRoot, join(nodeRoot, 'current', 'src', 'cli', 'main.ts')), '0.2.0', 'the node marks its trial good once it serves');
  t.ok(readFileSync(join(nodeRoot, 'trial-ok'), 'utf8').includes('0.2.0'));
  const rb = await run('rollback');
  t.equal(rb.code, 0, rb.err);
  t.match((await run('status')).out, /running 0\.1\.0 from slot a/);
  const bad = await run('bogus');
  t.equal(bad.code, 2);
  // The outcomes wait beside the node's audit log (serve may be its writer), and go into the chain at its next start.
  const auditDir = join(work, 'state', 'audit');
  const pending = readFileSync(join(auditDir, PENDING_NAME), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { type: string });
  t.same(pending.map((e) => e.type), ['update_installed', 'update_rolled_back'], 'apply and rollback were recorded as pending audit events');
  const log = createAuditLog({ dir: auditDir, maxFileBytes: 1 << 20 });
  t.same(drainPendingAudit(auditDir, (e) => log.append(e)), { recorded: 2, skipped: 0 });
  log.close();
  t.equal(verifyAuditLog(auditDir).ok, true, 'the chain verifies with them in it');
  t.same(tailAuditLog(auditDir, 2).map((e) => [e.type, (e as { version?: string; manual?: boolean }).version ?? (e as { manual?: boolean }).manual]), [['update_installed', '0.2.0'], ['update_rolled_back', true]]);
});
