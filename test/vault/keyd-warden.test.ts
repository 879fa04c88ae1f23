// keyd with a real warden: the warden (--keyd-socket) bind-mounts keyd's socket into a worker's otherwise
// hidden view at /run/phantoma/keyd.sock; the worker decapsulates once through it and is refused the
// second time over a new connection, while keyd's host path stays invisible to it.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { ROOT } from '../helpers.ts';
import { createWardenClient } from '../../src/ephemeral/warden-client.ts';
import { createLogger } from '../../src/logger.ts';
import { makeVaultContents } from '../../src/vault/contents.ts';
import { createVault } from '../../src/vault/store.ts';
import { startKeydProcess } from '../../src/vault/keyd-process.ts';
import type { KeydAuditEvent } from '../../src/vault/keyd.ts';
import { combineKem, encapsulate } from '../../src/sealed/kem.ts';
import { sessionKeysB64, keysOf } from './session-keys.ts';

const WARDEN = join(ROOT, 'native', 'warden', 'build', 'phantoma-warden');
const NODE = process.execPath;
t.equal(process.getuid?.(), 0, 'the warden tests run as root');
const mk = spawnSync('make', ['-C', join(ROOT, 'native', 'warden')], { encoding: 'utf8' });
t.equal(mk.status, 0, `make -C native/warden: ${mk.stderr}`);

const RUN = `${process.pid}-${Date.now().toString(36)}`;
const name = `phantoma-keyd-warden-${RUN}`;
// Worker-visible fixtures outside /tmp; keyd's and the warden's sockets in a directory workers do not see.
const fixDir = mkdtempSync('/var/tmp/phantoma-keyd-warden-');
chmodSync(fixDir, 0o755);
const sockDir = mkdtempSync('/run/phantoma-keyd-warden-test-');
chmodSync(sockDir, 0o755);
const keydSocket = join(sockDir, 'keyd.sock');
const wardenSocket = join(sockDir, 'warden.sock');
t.teardown(() => {
  rmSync(fixDir, { recursive: true, force: true });
  rmSync(sockDir, { recursive: true, force: true });
});

const PROBE = join(fixDir, 'keyd-probe.mjs');
writeFileSync(
  PROBE,
  `
import { connect } from 'node:net';
import { existsSync } from 'node:fs';
const req = JSON.parse(process.argv[2]);
const hostPath = process.argv[3];
const one = (path, r) => new Promise((resolve) => {
  const s = connect(path);
  let b = '';
  s.on('data', (c) => { b += c; if (b.includes('\\n')) { s.end(); resolve(JSON.parse(b)); } });
  s.on('error', (e) => resolve({ ok: false, code: 'connect_' + e.code }));
  s.write(JSON.stringify(r) + '\\n');
});
const first = await one('/run/phantoma/keyd.sock', req);
const second = await one('/run/phantoma/keyd.sock', req);
const viaHost = existsSync(hostPath);
// No process.exit: stdout is a socket, and exiting could drop the line before it is written.
process.stdout.write(JSON.stringify({ first, second, viaHost }) + '\\n');
`,
);

const contents = makeVaultContents({ now: new Date(), requestKeyValidityMs: 86_400_000 });
const vaultPath = join(fixDir, 'vault.phv');
createVault(vaultPath, { kind: 'passphrase', secret: Buffer.from('pw') }, { log2N: 10, r: 8, p: 1 }, contents);
chmodSync(vaultPath, 0o600);
const audits: KeydAuditEvent[] = [];
const keyd = await startKeydProcess({
  vaultPath,
  socketPath: keydSocket,
  gatewayUid: 0,
  cgroupName: name,
  workerUids: { from: 61000, to: 61999 },
  logLevel: 'warn',
  env: { ...process.env, PHANTOMA_VAULT_PASSPHRASE: 'pw' },
  logger: createLogger({ level: 'silent' }),
  audit: (e) => audits.push(e),
});
t.teardown(() => keyd.stop());

const warden = spawn(
  WARDEN,
  ['--exit-with-parent', '--socket', wardenSocket, '--client-uid', '0', '--cgroup-name', name, '--worker-exec', NODE, '--worker-script', PROBE, '--expose', ROOT, '--uid-range', '61000-61999', '--keyd-socket', keydSocket, '--egress', 'off'],
  { stdio: ['ignore', 'pipe', 'pipe'] },
);
const wardenLog: string[] = [];
createInterface({ input: warden.stderr! }).on('line', (l) => wardenLog.push(l));
const ready = await new Promise<boolean>((resolve) => {
  const timer = setTimeout(() => resolve(false), 15_000);
  createInterface({ input: warden.stdout! }).on('line', (l) => l === 'ready' && (clearTimeout(timer), resolve(true)));
  warden.once('exit', () => resolve(false));
});
t.ok(ready, `the warden started: ${wardenLog.join('\n')}`);
t.teardown(() => {
  if (warden.exitCode === null) warden.kill('SIGTERM');
});

t.test('a warden-spawned worker reaches keyd at its fixed path and decapsulates exactly once', async (t) => {
  const key = contents.requestKeys[0]!;
  const kem = encapsulate({ x25519: Buffer.from(key.x25519Public, 'base64'), mlkem: Buffer.from(key.mlkemPublic, 'base64') });
  const transcriptHash = randomBytes(32);
  const b64 = (b: Uint8Array): string => Buffer.from(b).toString('base64');
  const request = { op: 'decapsulate', keyId: key.id, ephemeralPublicKey: b64(kem.ephemeralPublicKey), kemCiphertext: b64(kem.kemCiphertext), transcriptHash: b64(transcriptHash) };
  const client = createWardenClient({ socketPath: wardenSocket });
  const id = randomBytes(8).toString('hex');
  const w = await client.spawn({ id, uid: 61077, gid: 61077, exec: NODE, args: [PROBE, JSON.stringify(request), keydSocket] });
  let out = w.head.toString('utf8');
  let err = '';
  w.stderr.on('data', (c: Buffer) => (err += c.toString('utf8')));
  // The worker prints one line and exits; bounded, so a broken mount fails the test instead of hanging it.
  await new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, 20_000);
    w.stdio.on('data', (c: Buffer) => {
      out += c.toString('utf8');
      if (out.includes('\n')) (clearTimeout(timer), resolve());
    });
    w.stdio.once('close', () => (clearTimeout(timer), resolve()));
    // The client hands the connection over paused.
    w.stdio.resume();
    w.stderr.resume();
  });
  t.ok(out.includes('\n'), `the worker answered (stderr: ${err.slice(0, 2000)}; warden: ${wardenLog.join(' | ').slice(-2000)})`);
  const end = await client.end(id);
  t.ok(end.verified, 'the worker ended, verified');
  const r = JSON.parse(out.trim().split('\n').pop()!) as { first: Record<string, unknown>; second: Record<string, unknown>; viaHost: boolean };
  t.equal(r.first.ok, true, `first decapsulation: ${JSON.stringify(r.first)}`);
  t.same({ bodyKey: r.first.bodyKey, responseKey: r.first.responseKey }, sessionKeysB64(combineKem(kem, transcriptHash)), "the worker's keys are the client's");
  t.equal(r.second.code, 'keyd_refused', 'the second, over a new connection, is refused');
  t.equal(r.viaHost, false, "keyd's host path is not visible to the worker; only the bind-mounted one");
  t.same(audits.map((e) => [e.type, (e as { workerId?: string }).workerId]), [['keyd_decapsulated', id], ['keyd_refusal', id]]);
});
