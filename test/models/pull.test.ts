// Maintenance windows and model pull on the real kernel (issue 10). A generated GGUF is served by an HTTP
// server inside a network namespace this test creates (veth pair: the ONLY non-loopback addresses used).
// Pulls run as the warden's DOWNLOAD helper in <NAME>/download/, host network namespace, so the egress
// filter's download allowlist — filled only by a window — is the wall. "Reached" is decided on the server's
// side; every "blocked" has its positive control (the same pull completing inside a window).
import t, { type Test } from 'tap';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync, readFileSync } from 'node:fs';
import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { ROOT, tinyModelPath } from '../helpers.ts';
import { attemptCgroup, buildAll, cleanupWardenLeftovers, createNetns, runAttempt, startListener, startWarden, subscribe, tempDir, TAGS_FILE, type Listener, type Netns, type Warden } from '../egress/rig.ts';
import { pullModel, type PullOptions } from '../../src/models/pull.ts';
import { listModels, modelDirOf, writeServed } from '../../src/models/store.ts';
import { closeWindow, openWindow, readWindow, startWindowKeeper } from '../../src/egress/window.ts';
import type { AuditEvent } from '../../src/audit/audit-events.ts';
import { checkAuditEvent } from '../../src/audit/audit-events.ts';
import { createEgressMonitor } from '../../src/egress/monitor.ts';
import { loadExpectedTags } from '../../src/egress/policy.ts';
import { createLogger } from '../../src/logger.ts';

t.equal(process.getuid?.(), 0, 'runs as root (the warden loads BPF programs)');
const dir = tempDir('phantoma-pull-');
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const ATTEMPT = buildAll(dir);
const NAME = `phantoma-pull-test-${process.pid}`;
const PORT = 8080;
const stateDir = join(dir, 'state');
mkdirSync(stateDir, { recursive: true });
const modelDir = modelDirOf(stateDir);

let ns: Netns;
let w: Warden;
let http: Listener;
let ggufSha: string;
let otherSha: string;
const audit: AuditEvent[] = [];

t.before(async () => {
  const gguf = await tinyModelPath();
  ggufSha = createHash('sha256').update(readFileSync(gguf)).digest('hex');
  const other = join(dir, 'other.bin');
  writeFileSync(other, randomBytes(200_000));
  otherSha = createHash('sha256').update(readFileSync(other)).digest('hex');
  ns = await createNetns('pul');
  http = await startListener(['ip', 'netns', 'exec', ns.name, process.execPath, join(ROOT, 'test', 'models', 'pull-server.ts'), ns.v4, ns.v6, String(PORT), gguf, other]);
  w = await startWarden({
    name: NAME,
    sockDir: dir,
    worker: { exec: process.execPath, script: '/nonexistent' },
    extra: ['--download-script', join(ROOT, 'src', 'models', 'download-helper.ts'), '--download-uid', '62000'],
  });
});
t.teardown(async () => {
  await http?.stop();
  await ns?.listener.stop();
  ns?.destroy();
  await w?.stop();
  cleanupWardenLeftovers(NAME);
});

const pull = (o: Partial<PullOptions> & { url: string; sha256: string }): ReturnType<typeof pullModel> =>
  pullModel({ modelDir, stateDir, wardenSocket: w.socketPath, stallMs: 1500, ...o });

const reqs = (path: string, host?: string): number => http.events.filter((e) => e.ev === 'req' && (e as { path?: string }).path === path && (!host || e.host === host)).length;

function assertClean(t: Test, what: string): void {
  t.same(listModels(modelDir), [], `${what}: no model in the directory`);
  const leftover = existsSync(modelDir) ? readdirSync(modelDir).filter((f) => !f.startsWith('.')) : [];
  t.same(leftover, [], `${what}: no file in the model directory`);
  const partial = join(modelDir, '.partial');
  t.same(existsSync(partial) ? readdirSync(partial) : [], [], `${what}: the partial file was removed`);
}

async function expectCode(t: Test, p: Promise<unknown>, code: string, what: string): Promise<void> {
  try {
    await p;
    t.fail(`${what}: expected ${code}, the pull succeeded`);
  } catch (err) {
    t.equal((err as { code?: string }).code, code, `${what}: refused with ${code} (${(err as Error).message})`);
  }
}

async function withWindow<T>(allow: string[], forMs: number, fn: () => Promise<T>): Promise<T> {
  await openWindow({ egress: w.egress, stateDir, forMs, allow, by: 'test' });
  try {
    return await fn();
  } finally {
    await closeWindow({ egress: w.egress, stateDir });
  }
}

t.test('without a window the pull is blocked in download/ (deny event); inside a window it completes, checksum verified', async (t) => {
  const events = await subscribe(w.egress);
  t.teardown(() => events.stream.close());
  // The gateway's egress monitor, which turns deny events into audit entries (as src/main.ts wires it).
  const denied: AuditEvent[] = [];
  const monitor = createEgressMonitor({ mode: 'enforce', client: w.egress, expected: loadExpectedTags(TAGS_FILE), checkIntervalMs: 60_000, probeIntervalMs: 60_000, logger: createLogger({ level: 'silent' }), audit: (e) => denied.push(e) });
  await monitor.start();
  t.teardown(() => monitor.close());
  const url = `http://${ns.v4}:${PORT}/model.gguf`;
  const before = reqs('/model.gguf');
  await expectCode(t, pull({ url, sha256: ggufSha, name: 'blocked' }), 'model_pull_blocked', 'no window');
  t.equal(reqs('/model.gguf'), before, 'the server saw no request');
  const deadline = Date.now() + 3000;
  while (!events.events.some((e) => e.set === 'download' && e.dst === ns.v4 && e.port === PORT) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  const ev = events.events.find((e) => e.set === 'download' && e.dst === ns.v4 && e.port === PORT);
  t.ok(ev, 'a deny event for download/ names the destination (the gateway audits these as egress_denied)');
  t.equal(ev?.hook, 'connect4');
  const until = Date.now() + 3000;
  while (!denied.some((e) => e.type === 'egress_denied') && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
  t.match(denied.find((e) => e.type === 'egress_denied' && (e as { set?: string }).set === 'download'), { type: 'egress_denied', set: 'download', dst: ns.v4, port: PORT, proto: 'tcp', probe: false }, 'audited as egress_denied (set download)');
  assertClean(t, 'blocked');

  // positive control: the same pull inside a window that allows exactly this address and port
  const progress: number[] = [];
  const r = await withWindow([`${ns.v4}:${PORT}`], 60_000, async () => {
    t.same((await w.egress.status()).downloadAllow, [`tcp:${ns.v4}/32:${PORT}`], 'the window filled the download allowlist with the pinned address');
    t.equal((await w.egress.status()).workersAllowCount, 0, 'workers/ allowlist stays empty');
    return pull({ url, sha256: ggufSha, name: 'tiny-pulled', onProgress: (p) => progress.push(p.bytes) });
  });
  t.equal(reqs('/model.gguf', ns.v4), before + 1, 'the server saw the request');
  t.equal(r.manifest.sha256, ggufSha, 'checksum verified');
  t.equal(r.manifest.quantisation, 'F16');
  t.equal(r.manifest.contextLength, 4096);
  t.same(r.manifest.source, { kind: 'url', url });
  t.ok(progress.at(-1) === r.manifest.bytes && progress.length > 1, 'progress reported up to the full size');
  t.same(listModels(modelDir).map((m) => m.name), ['tiny-pulled'], 'model list shows it');
  t.same((await w.egress.status()).downloadAllow, [], 'closed: the allowlist is empty again');
  rmSync(modelDir, { recursive: true, force: true });
});

t.test('a second address of the same host, not allowlisted, stays blocked while the first is allowed', async (t) => {
  await withWindow([`${ns.v4}:${PORT}`], 60_000, async () => {
    const before = reqs('/model.gguf', ns.v6);
    await expectCode(t, pull({ url: `http://[${ns.v6}]:${PORT}/model.gguf`, sha256: ggufSha, name: 'v6' }), 'model_pull_blocked', 'IPv6 address of the same server');
    t.equal(reqs('/model.gguf', ns.v6), before, 'the server saw nothing on that address');
  });
  // positive control for that address
  const before = reqs('/model.gguf', ns.v6);
  await withWindow([`[${ns.v6}]:${PORT}`], 60_000, () => pull({ url: `http://[${ns.v6}]:${PORT}/model.gguf`, sha256: ggufSha, name: 'v6' }));
  t.equal(reqs('/model.gguf', ns.v6), before + 1, 'allowed, the same pull reaches it');
  rmSync(modelDir, { recursive: true, force: true });
});

t.test('a host name is resolved by the daemon and pinned at window open', async (t) => {
  const resolved: string[] = [];
  const st = await openWindow({ egress: w.egress, stateDir, forMs: 60_000, allow: [`models.test:${PORT}`], by: 'test', resolve: async (h) => (resolved.push(h), [ns.v4]) });
  t.teardown(() => closeWindow({ egress: w.egress, stateDir }));
  t.same(resolved, ['models.test']);
  t.same(st.targets[0]!.addresses, [ns.v4], 'pinned');
  // The pull uses the pins: no resolver is consulted (one that throws proves it).
  const r = await pull({ url: `http://models.test:${PORT}/model.gguf`, sha256: ggufSha, name: 'by-name', resolve: async () => Promise.reject(new Error('must not resolve')) });
  t.equal(r.manifest.name, 'by-name');
  t.equal(http.events.filter((e) => e.ev === 'req').at(-1)?.host, ns.v4);
  rmSync(modelDir, { recursive: true, force: true });
});

t.test('refusals: wrong checksum, truncated, not a GGUF, a stalled server; nothing left behind', async (t) => {
  await withWindow([`${ns.v4}:${PORT}`], 60_000, async () => {
    const base = `http://${ns.v4}:${PORT}`;
    await expectCode(t, pull({ url: `${base}/model.gguf`, sha256: 'ab'.repeat(32), name: 'x' }), 'model_digest_mismatch', 'wrong checksum');
    assertClean(t, 'wrong checksum');
    const before = reqs('/trunc.gguf');
    await expectCode(t, pull({ url: `${base}/trunc.gguf`, sha256: ggufSha, name: 'x', maxAttempts: 2 }), 'model_pull_truncated', 'truncated');
    t.equal(reqs('/trunc.gguf'), before + 2, 'resumed once, then gave up');
    assertClean(t, 'truncated');
    await expectCode(t, pull({ url: `${base}/other.bin`, sha256: otherSha, name: 'x' }), 'model_file_invalid', 'not a GGUF (checksum right)');
    assertClean(t, 'not a GGUF');
    const t0 = Date.now();
    await expectCode(t, pull({ url: `${base}/stall.gguf`, sha256: ggufSha, name: 'x', stallMs: 800 }), 'model_pull_stalled', 'stalled server');
    t.ok(Date.now() - t0 < 5000, 'the stall was noticed within its timeout');
    assertClean(t, 'stalled');
    await expectCode(t, pull({ url: `${base}/model.gguf`, sha256: ggufSha, name: 'x', size: 1000 }), 'model_size_mismatch', '--size not the served length');
    assertClean(t, 'size');
    // a model the gateway serves is not overwritten with other contents
    await pull({ url: `${base}/model.gguf`, sha256: ggufSha, name: 'busy' });
    writeServed(modelDir, ['busy']); // as the gateway records it (this process stands in for it: alive)
    const other0 = reqs('/other.bin');
    await expectCode(t, pull({ url: `${base}/other.bin`, sha256: otherSha, name: 'busy' }), 'model_in_use', 'overwrite a served model');
    t.equal(reqs('/other.bin'), other0, 'refused before any download');
    t.equal(listModels(modelDir)[0]?.sha256, ggufSha, 'the served model is untouched');
    rmSync(modelDir, { recursive: true, force: true });
  });
});

t.test('an interrupted body is resumed with an HTTP Range', async (t) => {
  const r = await withWindow([`${ns.v4}:${PORT}`], 60_000, () => pull({ url: `http://${ns.v4}:${PORT}/trunc-once.gguf`, sha256: ggufSha, name: 'resumed' }));
  const seen = http.events.filter((e) => (e as { path?: string }).path === '/trunc-once.gguf') as unknown as Array<{ range: string | null }>;
  t.equal(seen.length, 2);
  t.equal(seen[0]!.range, null);
  t.match(seen[1]!.range, /^bytes=[1-9]\d*-$/, 'the second request asked for the rest');
  t.equal(r.resumed, true);
  t.equal(r.manifest.sha256, ggufSha, 'and the whole file verifies');
  rmSync(modelDir, { recursive: true, force: true });
});

t.test('a worker-cgroup process during an open window still cannot reach the allowlisted address', async (t) => {
  await withWindow([`${ns.v4}:${PORT}`], 60_000, async () => {
    // positive control: outside any cgroup the attempt reaches the server's port
    const conns = (): number => http.events.filter((e) => e.ev === 'conn' && e.host === ns.v4).length;
    const c0 = conns();
    const ctl = await runAttempt(ATTEMPT, 'tcp', ns.v4, PORT, 'ctl');
    t.equal(ctl.result, 'ok', 'outside the cgroup it connects');
    t.ok(await http.waitFor(() => conns() > c0, 3000), 'and the server saw the connection');
    const c1 = conns();
    const cg = attemptCgroup(w.workersDir);
    t.teardown(() => cg.remove());
    const r = await runAttempt(ATTEMPT, 'tcp', ns.v4, PORT, 'worker', cg.procs);
    t.equal(r.result, 'EPERM', 'a process in workers/ is refused: the window is for download/ only');
    await new Promise((res) => setTimeout(res, 300));
    t.equal(conns(), c1, 'the server saw nothing from it');
    t.equal((await w.egress.status()).workersAllowCount, 0);
  });
});

t.test('the window closes by its timer (keeper), audited; the allowed address is blocked again', async (t) => {
  const events: AuditEvent[] = [];
  const keeper = await startWindowKeeper({ egress: w.egress, stateDir, audit: (e) => events.push(e), intervalMs: 100 });
  t.teardown(() => keeper.close());
  const url = `http://${ns.v4}:${PORT}/model.gguf`;
  const st = await openWindow({ egress: w.egress, stateDir, forMs: 6000, allow: [`${ns.v4}:${PORT}`], by: 'operator' });
  await pull({ url, sha256: ggufSha, name: 'in-window' });
  t.ok(Date.now() < st.until, 'the pull completed inside the window (positive control)');
  const deadline = st.until + 5000;
  while (readWindow(stateDir) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  t.notOk(readWindow(stateDir), 'the window file is gone');
  t.same((await w.egress.status()).downloadAllow, [], 'the allowlist is empty');
  const opened = events.find((e) => e.type === 'egress_window_opened');
  t.match(opened, { type: 'egress_window_opened', windowId: st.id, by: 'operator', untilMs: st.until, allow: `tcp:${ns.v4}/32:${PORT}` }, 'opening audited: who, what, until');
  t.match(events.find((e) => e.type === 'egress_window_closed'), { windowId: st.id, reason: 'expired', entries: 1 }, 'closing audited');
  for (const e of events) t.equal(checkAuditEvent(e, []), undefined, `${e.type} fits the audit vocabulary`);
  rmSync(modelDir, { recursive: true, force: true });
  await expectCode(t, pull({ url, sha256: ggufSha, name: 'after' }), 'model_pull_blocked', 'after the timer closed the window');
  audit.push(...events);
});

function startDaemon(): Promise<{ proc: ChildProcess; lines: object[] }> {
  const proc = spawn(process.execPath, [join(ROOT, 'test', 'models', 'window-daemon.ts'), w.socketPath, stateDir], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines: object[] = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => (proc.kill('SIGKILL'), reject(new Error('daemon did not start'))), 15_000);
    createInterface({ input: proc.stdout! }).on('line', (l) => {
      const o = JSON.parse(l) as { ready?: boolean };
      if (o.ready) {
        clearTimeout(timer);
        resolve({ proc, lines });
      } else lines.push(o);
    });
  });
}

t.test('a window opened, the daemon SIGKILLed and restarted after the deadline: closed at start', async (t) => {
  const d1 = await startDaemon();
  t.teardown(() => void d1.proc.kill('SIGKILL'));
  const st = await openWindow({ egress: w.egress, stateDir, forMs: 3000, allow: [`${ns.v4}:${PORT}`], by: 'operator' });
  await d1.proc.stdin!.write(''); // keep it alive
  const until = Date.now() + 3000;
  while (!d1.lines.some((l) => (l as AuditEvent).type === 'egress_window_opened') && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
  d1.proc.kill('SIGKILL');
  await new Promise((r) => d1.proc.once('exit', r));
  await new Promise((r) => setTimeout(r, Math.max(0, st.until - Date.now()) + 300));
  t.same((await w.egress.status()).downloadAllow, [`tcp:${ns.v4}/32:${PORT}`], 'past the deadline with the daemon dead, the entry is still there (nothing else closes it)');
  const d2 = await startDaemon();
  t.teardown(() => void d2.proc.kill('SIGKILL'));
  // Lines before "ready" are what the keeper did in its start-up check (an opening it had not recorded yet may come first).
  t.match(d2.lines.find((l) => (l as AuditEvent).type === 'egress_window_closed'), { type: 'egress_window_closed', windowId: st.id, reason: 'expired_at_start', entries: 1 }, 'in its start-up check, before anything else, the restarted daemon closed the expired window');
  t.same((await w.egress.status()).downloadAllow, [], 'the allowlist is empty');
  t.notOk(readWindow(stateDir));
  await expectCode(t, pull({ url: `http://${ns.v4}:${PORT}/model.gguf`, sha256: ggufSha, name: 'after-restart' }), 'model_pull_blocked', 'after the restart');
  d2.proc.stdin!.end();
});

t.test('the warden refuses a DOWNLOAD without a fresh, well-formed id', async (t) => {
  const { connect } = await import('node:net');
  const { encodeRequest } = await import('../../src/ephemeral/warden-client.ts');
  const ask = (fields: string[]): Promise<string> =>
    new Promise((resolve) => {
      const s = connect({ path: w.socketPath });
      let buf = '';
      s.on('data', (c) => (buf += c.toString()));
      s.on('close', () => resolve(buf.split('\n')[0]!));
      s.on('error', () => resolve(buf));
      s.write(encodeRequest(fields));
      setTimeout(() => s.destroy(), 3000);
    });
  t.match(await ask(['DOWNLOAD', '../workers/x']), /^ERR cgroup_not_allowed /);
  t.match(await ask(['DOWNLOAD']), /^ERR bad_request /);
  t.match(await ask(['DOWNLOAD', 'aaaaaaaaaaaaaaaa', 'a\u0001b']), /^ERR bad_request /);
});

t.test('the CLI: egress window open/status/close, model pull --json (progress lines), model list, model remove', async (t) => {
  const { runPhantoma } = await import('../helpers.ts');
  const common = [`--stateDir=${stateDir}`, `--warden.socket=${w.socketPath}`];
  const open = await runPhantoma(['egress', 'window', 'open', '--for', '30s', '--allow', `${ns.v4}:${PORT}`, '--json', ...common]);
  t.equal(open.code, 0, open.stderr);
  const win = JSON.parse(open.stdout) as { id: string; until: number };
  t.ok(win.until > Date.now() + 20_000, 'deadline about 30 s out');
  t.equal(readWindow(stateDir)?.id, win.id, 'persisted');
  t.same((await w.egress.status()).downloadAllow, [`tcp:${ns.v4}/32:${PORT}`]);
  const p = await runPhantoma(['model', 'pull', `http://${ns.v4}:${PORT}/model.gguf`, '--sha256', ggufSha, '--name', 'cli-pulled', '--json', ...common]);
  t.equal(p.code, 0, p.stderr);
  const lines = p.stdout.trim().split('\n').map((l) => JSON.parse(l) as { event: string; bytes?: number; total?: number; rate?: number; eta?: number | null; model?: { sha256: string } });
  t.ok(lines.some((l) => l.event === 'progress' && typeof l.rate === 'number' && l.total !== undefined), 'progress lines with bytes, total, rate, eta');
  t.equal(lines.at(-1)?.event, 'done');
  t.equal(lines.at(-1)?.model?.sha256, ggufSha);
  const list = await runPhantoma(['model', 'list', '--json', ...common]);
  t.match(JSON.parse(list.stdout), [{ name: 'cli-pulled', sha256: ggufSha, quantisation: 'F16', contextLength: 4096, source: { kind: 'url' } }]);
  const close = await runPhantoma(['egress', 'window', 'close', ...common]);
  t.equal(close.code, 0, close.stderr);
  t.same((await w.egress.status()).downloadAllow, [], 'closed');
  const rm = await runPhantoma(['model', 'remove', 'cli-pulled', ...common]);
  t.equal(rm.code, 0, rm.stderr);
  t.same(listModels(modelDir), []);
});
