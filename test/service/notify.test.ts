// Issue 13: the sd_notify datagrams (native addon) and the READY/WATCHDOG decisions (src/service/), on the
// host. The real systemd side is test/deploy/systemd.test.ts.
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createNotifier, type Notifier } from '../../src/service/notify.ts';
import { startServiceReadiness } from '../../src/service/readiness.ts';
import { createLogger } from '../../src/logger.ts';

/** A unix datagram receiver (Node cannot bind one): python3 prints each datagram as a JSON string line. */
function receiver(path: string): Promise<{ messages: () => string[]; stop: () => void }> {
  const py = `
import socket, json, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(${JSON.stringify(path.startsWith('@') ? '\0' + path.slice(1) : path)})
print('bound', flush=True)
while True:
    d = s.recv(65536)
    print(json.dumps(d.decode()), flush=True)
`;
  const child = spawn('python3', ['-c', py], { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines: string[] = [];
  let buf = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('receiver did not bind')), 10_000);
    child.stdout.on('data', (c: Buffer) => {
      buf += c.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const l = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (l === 'bound') {
          clearTimeout(timer);
          resolve({ messages: () => lines.slice(), stop: () => child.kill('SIGKILL') });
        } else lines.push(JSON.parse(l) as string);
      }
    });
  });
}

async function until<T>(what: string, f: () => T | undefined, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

t.test('datagrams reach $NOTIFY_SOCKET (path and abstract), the variables leave the environment', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'phantoma-notify-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  for (const path of [join(dir, 'notify.sock'), `@phantoma-notify-test-${process.pid}`]) {
    const r = await receiver(path);
    t.teardown(r.stop);
    const env: NodeJS.ProcessEnv = { NOTIFY_SOCKET: path, WATCHDOG_USEC: '3000000', WATCHDOG_PID: String(process.pid), OTHER: 'x' };
    const n = createNotifier(env);
    t.same(env, { OTHER: 'x' }, 'NOTIFY_SOCKET/WATCHDOG_* removed: no child inherits them');
    t.equal(n.active, true);
    t.equal(n.watchdogMs, 3000);
    n.status('starting: keyd\nsecond line');
    n.ready('serving tiny');
    n.watchdog();
    n.stopping('stopping: draining');
    const got = await until('4 datagrams', () => (r.messages().length >= 4 ? r.messages() : undefined));
    t.same(got, ['STATUS=starting: keyd second line', `READY=1\nSTATUS=serving tiny\nMAINPID=${process.pid}`, 'WATCHDOG=1', 'STOPPING=1\nSTATUS=stopping: draining'], `exact datagrams via ${path.startsWith('@') ? 'an abstract' : 'a path'} socket`);
  }
});

t.test('no $NOTIFY_SOCKET: inactive, nothing sent; a watchdog for another pid is not ours', async (t) => {
  const n = createNotifier({});
  t.equal(n.active, false);
  t.equal(n.watchdogMs, undefined);
  n.ready('x'); // no socket: a no-op, no throw
  const other = createNotifier({ NOTIFY_SOCKET: '/nonexistent/notify.sock', WATCHDOG_USEC: '1000000', WATCHDOG_PID: '1' });
  t.equal(other.watchdogMs, undefined, 'WATCHDOG_PID names another process');
  const errors: string[] = [];
  const failing = createNotifier({ NOTIFY_SOCKET: '/nonexistent/notify.sock' }, (e) => errors.push((e as NodeJS.ErrnoException).code ?? e.message));
  failing.status('x');
  t.same(errors, ['ENOENT'], 'a send that fails is reported with its errno, not thrown');
});

interface Recorded extends Notifier {
  sent: string[];
}
function recorder(watchdogMs: number | undefined): Recorded {
  const sent: string[] = [];
  return {
    sent,
    active: true,
    watchdogMs,
    ready: (s) => sent.push(`READY ${s}`),
    status: (s) => sent.push(`STATUS ${s}`),
    watchdog: () => sent.push('WATCHDOG'),
    stopping: (s) => sent.push(`STOPPING ${s}`),
  };
}

t.test('READY=1 only when the filter is verified, every pool warm and keyd answering; WATCHDOG=1 only while healthy', async (t) => {
  let egressOk = false;
  let poolReason: string | undefined = 'model tiny: no warm worker yet (1 starting)';
  let poolState = 'starting';
  let keydUp = false;
  const n = recorder(400);
  const r = startServiceReadiness({
    notifier: n,
    logger: createLogger({ level: 'silent' }),
    pollMs: 20,
    sources: {
      pools: () => [{ model: 'tiny', notReadyReason: () => poolReason, state: () => poolState }],
      egress: { mode: 'enforce', ok: () => egressOk, reason: () => (egressOk ? undefined : 'probe pending') },
      keydPing: async () => {
        if (!keydUp) throw new Error('ECONNREFUSED');
        return { pid: 1 };
      },
    },
  });
  t.teardown(() => r.stop());
  await until('a STATUS naming all three', () => n.sent.find((s) => s.includes('egress filter not verified (probe pending)') && s.includes('no warm worker') && s.includes('keyd not answering')));
  poolReason = undefined;
  poolState = 'ready';
  keydUp = true;
  await new Promise((res) => setTimeout(res, 200));
  t.notOk(n.sent.some((s) => s.startsWith('READY')), 'no READY while the filter is unverified');
  t.match(n.sent.at(-1), /^STATUS starting: waiting for egress filter not verified/, 'STATUS says why');
  egressOk = true;
  await until('READY', () => n.sent.find((s) => s.startsWith('READY')));
  t.equal(n.sent.find((s) => s.startsWith('READY')), 'READY serving tiny');
  await until('two watchdog pings', () => (n.sent.filter((s) => s === 'WATCHDOG').length >= 2 ? true : undefined));
  // The filter is lost: pings stop, STATUS says degraded.
  egressOk = false;
  await until('degraded STATUS', () => n.sent.find((s) => s.startsWith('STATUS degraded: egress filter not verified')));
  const pings = n.sent.filter((s) => s === 'WATCHDOG').length;
  await new Promise((res) => setTimeout(res, 700));
  t.equal(n.sent.filter((s) => s === 'WATCHDOG').length, pings, 'no WATCHDOG=1 while degraded');
  // A pool that cannot start workers at all is unhealthy too; recovery resumes pings.
  egressOk = true;
  poolState = 'unavailable';
  poolReason = 'model tiny: no worker could start (warden_spawn_failed)';
  await until('degraded by the pool', () => n.sent.find((s) => s === 'STATUS degraded: model tiny: no worker could start (warden_spawn_failed)'));
  poolState = 'ready';
  poolReason = undefined;
  await until('recovered', () => (n.sent.at(-1) === 'WATCHDOG' && n.sent.includes('STATUS serving tiny') ? true : undefined));
  t.pass('pings resumed after recovery');
});
