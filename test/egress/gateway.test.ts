// The egress filter in a real node (gateway + warden + real pool workers on the tiny model): verified at
// start by the kernel word and the live probe; a real pool worker sits in its workers/<id> cgroup under
// the filter and is blocked (its deny event lands in the audit log); a SIGKILLed warden closes the gate
// (no new worker, /readyz says why, nothing reaches meanwhile) until a restarted warden re-verifies; a
// program detached behind the daemon's back stops the node taking work within the check interval.
import t from 'tap';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { startTestNode, until, type TestNode } from '../gateway/fixture.ts';
import { ROOT } from '../helpers.ts';
import { attemptCgroup, buildAll, runAttempt, startListener, tempDir } from './rig.ts';
import { egressPolicyHash, loadExpectedTags } from '../../src/egress/policy.ts';
import { tailAuditLog } from '../../src/audit/audit-log.ts';

t.equal(process.getuid?.(), 0, 'runs as root');
const dir = tempDir('phantoma-egress-gw-');
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const ATTEMPT = buildAll(dir);
const CHECK_MS = 300;
const chat = { model: 'tiny', messages: [{ role: 'user', content: 'hello' }], max_tokens: 4, seed: 1 };

let n: TestNode;
let restarted: ChildProcess | undefined;
t.before(async () => {
  n = await startTestNode({ pool: { size: 1 }, egress: { checkIntervalMs: CHECK_MS } });
});
t.teardown(async () => {
  await n?.close();
  if (restarted && restarted.exitCode === null && restarted.signalCode === null) {
    const gone = new Promise((r) => restarted!.once('exit', r));
    restarted.kill('SIGTERM');
    await gone;
  }
});

const audit = (): Array<Record<string, unknown>> => tailAuditLog(join(n.stateDir, 'audit'), 10_000) as unknown as Array<Record<string, unknown>>;
const readyz = async (): Promise<{ status: number; body: any }> => {
  const r = await fetch(`${n.url}/readyz`);
  return { status: r.status, body: await r.json() };
};
function v2CgroupOf(pid: number): string {
  const line = readFileSync(`/proc/${pid}/cgroup`, 'utf8').split('\n').find((l) => l.startsWith('0::'))!;
  return join('/sys/fs/cgroup/unified', line.slice(3));
}
function effective(cg: string): string[] {
  const r = spawnSync('bpftool', ['-j', 'cgroup', 'show', cg, 'effective'], { encoding: 'utf8' });
  return (JSON.parse(r.stdout || '[]') as Array<{ name: string }>).map((p) => p.name).sort();
}
/** The warden this node started: found by its (unique) socket path on its command line. */
function wardenProcess(): { pid: number; argv: string[] } {
  const sock = join(n.stateDir, 'warden.sock');
  for (const p of readdirSync('/proc').filter((x) => /^\d+$/.test(x))) {
    try {
      const argv = readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').filter(Boolean);
      if (argv[0]?.endsWith('phantoma-warden') && argv.includes(sock)) return { pid: Number(p), argv };
    } catch {
      // exited meanwhile
    }
  }
  throw new Error('the node has no warden');
}

t.test('verified at start; the policy hash names the built programs and empty allowlists', async (t) => {
  t.equal(n.node.egress?.ok(), true, n.node.egress?.reason() ?? 'verified');
  t.equal((await readyz()).status, 200);
  t.equal(n.node.egressPolicyHash(), egressPolicyHash({ mode: 'enforce', expected: loadExpectedTags(), downloadAllow: [] }));
  t.match(audit().filter((e) => e.type === 'egress_state'), [{ verified: true, policyHash: n.node.egressPolicyHash() }], 'audit: verified, with the hash');
});

t.test('a real pool worker is inside its workers/<id> cgroup, under the filter, and blocked', async (t) => {
  const wk = n.node.models[0]!.pool.workers().find((w) => w.state === 'ready');
  t.ok(wk?.pid, 'a warm worker');
  const pid = wk!.pid!;
  const cg = v2CgroupOf(pid);
  t.match(cg, /\/workers\/[0-9a-f]{16}$/, `the worker's own cgroup: ${cg}`);
  t.same(effective(cg), ['egress_connect4', 'egress_connect6', 'egress_sendmsg4', 'egress_sendmsg6', 'egress_skb'], 'the kernel lists all five programs as effective on it');
  // A listener and attempts inside the worker's own network namespace (its loopback), so the positive
  // control is possible at all; the blocked attempt joins the worker's cgroup first.
  const inNs = ['nsenter', `--net=/proc/${pid}/ns/net`];
  const listener = await startListener([...inNs, process.execPath, '--disable-warning=ExperimentalWarning', join(ROOT, 'test', 'egress', 'listener.ts'), '127.0.0.1', '::1', '7001', '7002']);
  t.teardown(() => listener.stop());
  const ok = `gw-ok-${process.pid}`;
  t.equal((await runAttempt(ATTEMPT, 'tcp', '127.0.0.1', 7001, ok, '-', inNs)).result, 'ok', 'positive control: connect in the worker netns, outside its cgroup');
  t.ok(await listener.waitFor((e) => e.data === ok, 3000), 'reached the listener');
  const bad = `gw-in-${process.pid}`;
  const r = await runAttempt(ATTEMPT, 'tcp', '127.0.0.1', 7001, bad, join(cg, 'cgroup.procs'), inNs);
  t.equal(r.result, 'EPERM', "inside the worker's cgroup: EPERM");
  t.notOk(await listener.waitFor((e) => e.data === bad, 400), 'did not reach the listener');
  const id = statSync(cg).ino;
  await until(() => audit().some((e) => e.type === 'egress_denied' && e.cgroupId === id), 5000, 'the deny event in the audit log');
  t.match(audit().find((e) => e.type === 'egress_denied' && e.cgroupId === id), { set: 'workers', hook: 'connect4', dst: '127.0.0.1', port: 7001, proto: 'tcp', pid: r.pid, probe: false }, 'audit: egress_denied');
  const metrics = await (await fetch(n.node.metricsUrl)).text();
  t.match(metrics, /phantoma_egress_denied_total\{set="workers",hook="connect4"\} [1-9]/, 'metrics count it');
  t.match(metrics, /phantoma_egress_verified 1/);
  // Detection: process_vm_readv aimed at the real worker is reported into the audit log.
  t.equal((await runAttempt(ATTEMPT, 'vmread', '-', pid, 'x')).result, 'EFAULT');
  await until(() => audit().some((e) => e.type === 'ptrace_detected' && e.target === pid), 5000, 'ptrace_detected in the audit log');
  t.match(audit().find((e) => e.type === 'ptrace_detected' && e.target === pid), { kind: 'process_vm_readv', targetIs: 'worker' }, 'audit: ptrace_detected');
});

t.test('warden SIGKILLed: gate closed, programs stay, nothing reaches; back and re-verified: serving again', async (t) => {
  const wd = wardenProcess();
  const workersDir = join(v2CgroupOf(n.node.models[0]!.pool.workers()[0]!.pid!), '..');
  const spawnedBefore = audit().filter((e) => e.type === 'worker_spawned').length;
  const server: Server = createServer((s) => s.on('data', (d) => seen.push(d.toString())).on('error', () => undefined));
  const seen: string[] = [];
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.teardown(() => void server.close());
  const port = (server.address() as { port: number }).port;

  process.kill(wd.pid, 'SIGKILL');
  const t0 = Date.now();
  await until(() => n.node.egress?.ok() === false, CHECK_MS + 3000, 'the node to notice');
  t.ok(Date.now() - t0 <= CHECK_MS + 2500, `noticed after ${Date.now() - t0} ms`);
  const rz = await readyz();
  t.equal(rz.status, 503);
  t.match(rz.body.reasons.join(' '), /egress filter not verified: warden_unreachable/, '/readyz says why');
  const res = await n.post('/v1/chat/completions', chat);
  t.equal(res.status, 503);
  t.equal(((await res.json()) as any).error.code, 'egress_unverified');
  t.same(effective(workersDir), ['egress_connect4', 'egress_connect6', 'egress_sendmsg4', 'egress_sendmsg6', 'egress_skb'], 'the programs are still attached (pinned)');
  // Meanwhile, on loopback: positive control reaches, the same attempt from a workers/ child does not.
  t.equal((await runAttempt(ATTEMPT, 'tcp', '127.0.0.1', port, 'dead-ok')).result, 'ok');
  await until(() => seen.includes('dead-ok'), 3000, 'positive control');
  const cg = attemptCgroup(workersDir);
  try {
    t.equal((await runAttempt(ATTEMPT, 'tcp', '127.0.0.1', port, 'dead-in', cg.procs)).result, 'EPERM', 'EPERM while the warden is dead');
    t.equal((await runAttempt(ATTEMPT, 'udp-sendto', '127.0.0.1', port, 'dead-udp', cg.procs)).result, 'EPERM');
  } finally {
    cg.remove();
  }
  await new Promise((r) => setTimeout(r, 1000));
  t.notOk(seen.includes('dead-in'), 'nothing from the cgroup reached the listener');
  t.equal(audit().filter((e) => e.type === 'worker_spawned').length, spawnedBefore, 'no new worker started while the warden was gone');

  // The warden comes back (same command line); the node re-verifies, refills and serves.
  restarted = spawn(wd.argv[0]!, wd.argv.slice(1), { stdio: ['ignore', 'pipe', 'ignore'] });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('restarted warden not ready')), 15_000);
    createInterface({ input: restarted!.stdout! }).on('line', (l) => {
      if (l === 'ready') {
        clearTimeout(timer);
        resolve();
      }
    });
  });
  await until(() => n.node.egress?.ok() === true, 10_000, 're-verification');
  await n.waitReady(60_000);
  t.equal((await readyz()).status, 200, 'ready again');
  const ok = await n.post('/v1/chat/completions', chat);
  t.equal(ok.status, 200, 'serving again');
  await ok.text();
  t.ok(audit().filter((e) => e.type === 'worker_spawned').length > spawnedBefore, 'new workers only after re-verification');
});

t.test('a program detached behind the daemon\'s back: the node stops taking work within the check interval', async (t) => {
  await n.waitReady(60_000);
  const warm = n.node.models[0]!.pool.workers()[0]!;
  const root = '/sys/fs/bpf/phantoma';
  const pins = readdirSync(root).map((d) => join(root, d, 'workers')).find((d) => {
    try {
      return statSync(d).isDirectory() && readdirSync(d).length > 0 && effective(join(v2CgroupOf(warm.pid!), '..')).length > 0 && d.includes(wardenProcess().argv[wardenProcess().argv.indexOf('--cgroup-name') + 1]!);
    } catch {
      return false;
    }
  })!;
  const link = join(pins, readdirSync(pins).find((f) => f.startsWith('link_egress_'))!);
  const t0 = Date.now();
  t.equal(spawnSync('bpftool', ['link', 'detach', 'pinned', link]).status, 0, 'detached the skb program');
  await until(() => n.node.egress?.ok() === false, CHECK_MS + 3000, 'the node to notice');
  t.ok(Date.now() - t0 <= CHECK_MS + 1000, `noticed after ${Date.now() - t0} ms (interval ${CHECK_MS} ms)`);
  t.match(n.node.egress?.reason(), /workers\/egress: no program attached/);
  const res = await n.post('/v1/chat/completions', chat);
  t.equal(res.status, 503, 'no more work');
  t.equal(((await res.json()) as any).error.code, 'egress_unverified');
  await until(() => !n.node.models[0]!.pool.workers().some((w) => w.id === warm.id), 5000, 'the warm worker to be ended');
  t.pass('the warm worker was ended');
});
