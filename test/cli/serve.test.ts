// phantoma serve / apikeys / keys / chat as real processes: the operator's and the client's view.
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, statSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ROOT, runPhantoma } from '../helpers.ts';

const state = mkdtempSync(join(tmpdir(), 'phantoma-serve-'));
const settings = [`--stateDir=${state}`, '--warden.start=true', `--warden.socket=${join(state, 'warden.sock')}`, `--warden.cgroupName=phantoma-serve-test-${process.pid}`, '--gateway.host=127.0.0.1', '--gateway.port=0', '--gateway.metricsPort=0', '--inference.threads=1', '--pool.size=1', '--gateway.shutdownGraceMs=10000'];

const server = spawn(join(ROOT, 'bin', 'phantoma'), ['serve', '--json', ...settings], { stdio: ['ignore', 'pipe', 'pipe'] });
let serverErr = '';
server.stderr.on('data', (c: Buffer) => (serverErr += c.toString()));
const exited = new Promise<number | null>((resolve) => server.on('exit', (code) => resolve(code)));
t.teardown(async () => {
  if (server.exitCode === null) server.kill('SIGKILL');
  rmSync(state, { recursive: true, force: true });
});
const first = await new Promise<string>((resolve, reject) => {
  let out = '';
  const timer = setTimeout(() => reject(new Error(`serve printed nothing: ${serverErr}`)), 60_000);
  server.stdout.on('data', (c: Buffer) => {
    out += c.toString();
    if (out.includes('\n')) {
      clearTimeout(timer);
      resolve(out.split('\n')[0]!);
    }
  });
});
const info = JSON.parse(first) as { url: string; tlsFingerprint: string; metrics: string };

async function waitReady(): Promise<void> {
  for (let i = 0; i < 300; i++) {
    const r = await runPhantoma(['chat', '--url', info.url, '--pin', info.tlsFingerprint, '--max-tokens', '1', 'ping'], { env: { ...process.env, PHANTOMA_API_KEY: 'phk_000000000000_' + 'A'.repeat(43) } });
    if (r.code === 4) return; // the node answers (401 for this fake key): it is up
    await new Promise((res) => setTimeout(res, 200));
  }
  throw new Error('node never answered');
}

t.test('serve prints where to connect and what to pin; the TLS key is private to the node', async (t) => {
  t.match(info.url, /^https:\/\/127\.0\.0\.1:\d+$/);
  t.match(info.tlsFingerprint, /^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
  t.equal(statSync(join(state, 'tls-key.pem')).mode & 0o777, 0o600);
  const keys = await runPhantoma(['keys', 'show', '--json', ...settings]);
  t.equal(keys.code, 0, keys.stderr);
  t.equal(JSON.parse(keys.stdout).tlsFingerprint, info.tlsFingerprint, 'keys show prints the same fingerprint');
  await waitReady();
});

t.test('apikeys create/list/revoke; chat streams with the pinned certificate; a revoked key is refused', async (t) => {
  const created = await runPhantoma(['apikeys', 'create', 'alice', '--json', ...settings]);
  t.equal(created.code, 0, created.stderr);
  const { id, key } = JSON.parse(created.stdout) as { id: string; key: string };
  t.match(key, /^phk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$/);
  // The whole 43-character secret (it may itself contain '_', so it is cut by position, not split).
  t.equal(key.slice('phk_'.length + 13).length, 43);
  t.notOk(readFileSync(join(state, 'api-keys.json'), 'utf8').includes(key.slice('phk_'.length + 13)), 'the store holds no key secret');
  t.equal(statSync(join(state, 'api-keys.json')).mode & 0o777, 0o600);
  const list = await runPhantoma(['apikeys', 'list', '--json', ...settings]);
  t.same(JSON.parse(list.stdout).map((k: { id: string; name: string; revokedAt: null }) => [k.id, k.name, k.revokedAt]), [[id, 'alice', null]]);

  const env = { ...process.env, PHANTOMA_API_KEY: key };
  const chat = await runPhantoma(['chat', '--url', info.url, '--pin', info.tlsFingerprint, '--max-tokens', '8', 'hello there'], { env });
  t.equal(chat.code, 0, chat.stderr);
  t.ok(chat.stdout.trim().length > 0, 'streamed text was printed');

  const wrongPin = await runPhantoma(['chat', '--url', info.url, '--pin', 'AB'.repeat(32), 'hello'], { env });
  t.equal(wrongPin.code, 6);
  t.match(wrongPin.stderr, /presented certificate .* not the pinned .*nothing was sent.*\[tls_pin_mismatch\]/);

  const revoke = await runPhantoma(['apikeys', 'revoke', id, ...settings]);
  t.equal(revoke.code, 0);
  const refused = await runPhantoma(['chat', '--url', info.url, '--pin', info.tlsFingerprint, 'hello'], { env });
  t.equal(refused.code, 4);
  t.match(refused.stderr, /401.*\[invalid_api_key\]/);
  const unknown = await runPhantoma(['apikeys', 'revoke', '000000000000', ...settings]);
  t.equal(unknown.code, 2);
  t.match(unknown.stderr, /\[api_key_not_found\]/);
});

t.test('SIGTERM drains a request in flight, then the node exits 0 and leaves no worker', async (t) => {
  const { key } = JSON.parse((await runPhantoma(['apikeys', 'create', 'drain', '--json', ...settings])).stdout) as { key: string };
  const inFlight = runPhantoma(['chat', '--url', info.url, '--pin', info.tlsFingerprint, '--max-tokens', '1500', 'keep going'], { env: { ...process.env, PHANTOMA_API_KEY: key } });
  for (let i = 0; i < 200; i++) {
    const m = await (await fetch(info.metrics)).text();
    if (/phantoma_pool_workers\{model="tiny",state="busy"\} 1/.test(m)) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const childrenOf = (pid: number): number[] => readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  // The node's children: its warden; the warden's children: the isolated workers.
  const children = childrenOf(server.pid!).flatMap((c) => [c, ...childrenOf(c)]);
  t.ok(children.length >= 2, `the node has a warden and worker processes (${children})`);
  server.kill('SIGTERM');
  const answered = await inFlight;
  t.equal(answered.code, 0, `the request in flight finished: ${answered.stderr}`);
  t.equal(await exited, 0, serverErr.split('\n').slice(-5).join('\n'));
  for (const pid of children) t.notOk(existsProc(pid), `worker ${pid} is gone`);
});

function existsProc(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
