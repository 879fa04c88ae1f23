// The gateway's own outbound connections (issue 13): a warden started with --gateway-egress attaches the
// connect/sendmsg programs to the cgroup of whoever asks with CONFINE (a process of the gateway's uid),
// with the allowlist from its own command line. Checked with the real warden and real processes in a
// cgroup of the test's own, every target a loopback listener of this test:
// - positive control first: before CONFINE the cgroup reaches the "forbidden" listener;
// - after: the allowed address connects, everything else gets EPERM (TCP v4/v6, UDP sendto) with a deny
//   event of set "gateway"; a process outside the cgroup is untouched;
// - CONFINE again is a no-op; a recreated cgroup (a restarted gateway) is confined anew; a SIGKILLed
//   warden leaves the filter attached and its successor takes it over;
// - refused with their codes: the warden's own cgroup, a warden without --gateway-egress; bad options
//   stop the warden at start.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { createServer, type Server } from 'node:net';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { mkdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { ROOT } from '../helpers.ts';
import { buildAll, cleanupWardenLeftovers, expectedTags, rmdirRetry, runAttempt, startWarden, subscribe, tempDir, WARDEN, type Warden } from './rig.ts';
import { createEgressClient, SOCK_HOOKS, type ConfineResult } from '../../src/egress/warden-egress.ts';
import { validateConfig } from '../../src/config/load.ts';
import { wardenProcessOptions } from '../../src/main.ts';
import { startWardenProcess } from '../../src/ephemeral/warden-process.ts';
import { createLogger } from '../../src/logger.ts';
import { tailAuditLog } from '../../src/audit/audit-log.ts';
import { cgroup2MountOf, cgroup2PathOf } from '../../src/egress/own-cgroup.ts';

t.equal(process.getuid?.(), 0, 'runs as root');
const dir = tempDir('phantoma-confine-');
const ATTEMPT = buildAll(dir);
const NAME = `pt-confine-${randomBytes(3).toString('hex')}`;
const tags = expectedTags();

// The cgroup2 mount and this test's own cgroup; the "gateway" cgroup is a sibling of ours.
const mount = cgroup2MountOf(readFileSync('/proc/self/mountinfo', 'utf8'))!;
const ownRel = cgroup2PathOf(readFileSync('/proc/self/cgroup', 'utf8'))!;
const G = join(mount, dirname(ownRel), `${NAME}-gateway`);

const servers: Server[] = [];
const reached: string[] = [];
async function listen(host: string): Promise<number> {
  const s = createServer((c) => c.on('data', (d) => reached.push(d.toString())).on('error', () => undefined));
  servers.push(s);
  await new Promise<void>((r) => s.listen(0, host, r));
  return (s.address() as { port: number }).port;
}
const allowed4 = await listen('127.0.0.1');
const forbidden4 = await listen('127.0.0.1');
const allowed6 = await listen('::1');
const forbidden6 = await listen('::1');
const udp: UdpSocket = createSocket('udp4');
await new Promise<void>((r) => udp.bind(0, '127.0.0.1', r));
udp.on('message', (m) => reached.push(m.toString()));
const udpPort = udp.address().port;

const wardens: Warden[] = [];
t.teardown(async () => {
  for (const w of wardens) await w.stop();
  rmdirRetry(G);
  cleanupWardenLeftovers(NAME);
  cleanupWardenLeftovers(`${NAME}-off`);
  for (const s of servers) s.close();
  udp.close();
  rmSync(dir, { recursive: true, force: true });
});

const ALLOW = ['--gateway-egress', `tcp,127.0.0.1/32,${allowed4}`, '--gateway-egress', `tcp,::1/128,${allowed6}`];
async function warden(name = NAME, extra = ALLOW): Promise<Warden> {
  const w = await startWarden({ name, sockDir: dir, extra });
  wardens.push(w);
  return w;
}

/** CONFINE from a process that first puts itself into `procs` (or stays where it is: '-'). */
function confineFrom(w: Warden, procs: string): Promise<ConfineResult & { error?: string }> {
  const script = join(ROOT, 'test', 'egress', 'confine-child.ts');
  const cmd = procs === '-' ? `exec "$0" "$1" "$2"` : `echo $$ > '${procs}' && exec "$0" "$1" "$2"`;
  return new Promise((resolve, reject) => {
    const c = spawn('sh', ['-c', cmd, process.execPath, script, w.socketPath], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    c.stdout.on('data', (d: Buffer) => (out += d.toString()));
    c.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const timer = setTimeout(() => c.kill('SIGKILL'), 20_000);
    c.on('close', () => {
      clearTimeout(timer);
      try {
        resolve(JSON.parse(out.trim().split('\n').at(-1)!));
      } catch {
        reject(new Error(`confine child: ${out} ${err}`));
      }
    });
  });
}

const procs = join(G, 'cgroup.procs');
const tok = (): string => `tok-${randomBytes(6).toString('hex')}`;
/** One TCP attempt from inside G (or outside: '-'); the result and whether the listener saw it. */
async function tcp(addr: string, port: number, where = procs): Promise<{ result: string; reached: boolean; pid: number }> {
  const token = tok();
  const r = await runAttempt(ATTEMPT, 'tcp', addr, port, token, where);
  await new Promise((res) => setTimeout(res, 50));
  return { result: r.result, reached: reached.includes(token), pid: r.pid };
}

t.test('a warden with --gateway-egress confines the asking cgroup to its allowlist', async (t) => {
  mkdirSync(G);
  const w = await warden();
  const before = await w.egress.status();
  t.ok(before.gateway, 'the status has a gateway set');
  t.equal(before.gateway!.cgroupId, 0, 'no cgroup before the first CONFINE');
  t.same(before.gateway!.allow.sort(), [`tcp:127.0.0.1/32:${allowed4}`, `tcp:[::1]/128:${allowed6}`].sort(), 'the allowlist is the command line one');
  for (const h of SOCK_HOOKS) t.same(before.gateway!.programs[h], [], `${h}: nothing attached yet`);

  // Positive control: the cgroup can reach the forbidden listener until it is confined.
  const pre = await tcp('127.0.0.1', forbidden4);
  t.same([pre.result, pre.reached], ['ok', true], 'before CONFINE the forbidden listener is reachable from the cgroup');

  const events = await subscribe(w.egress);
  const c = await confineFrom(w, procs);
  t.notOk(c.error, `CONFINE accepted (${c.error ?? ''})`);
  t.equal(c.cgroupId, statSync(G).ino, 'the cgroup confined is the caller\'s');
  t.equal(c.already, false);
  t.equal(c.path, join(dirname(ownRel), `${NAME}-gateway`), 'the path as the warden read it from the caller\'s pid');

  const ok4 = await tcp('127.0.0.1', allowed4);
  t.same([ok4.result, ok4.reached], ['ok', true], 'the allowed address connects');
  const ok6 = await tcp('::1', allowed6);
  t.same([ok6.result, ok6.reached], ['ok', true], 'the allowed IPv6 address connects');
  const no4 = await tcp('127.0.0.1', forbidden4);
  t.same([no4.result, no4.reached], ['EPERM', false], 'another TCP port on the same address: EPERM, nothing reached');
  const no6 = await tcp('::1', forbidden6);
  t.same([no6.result, no6.reached], ['EPERM', false], 'IPv6: EPERM');
  const noMapped = await tcp('::ffff:127.0.0.1', forbidden4);
  t.same([noMapped.result, noMapped.reached], ['EPERM', false], 'the v4-mapped form of a forbidden address: EPERM');
  const udpToken = tok();
  const u = await runAttempt(ATTEMPT, 'udp-sendto', '127.0.0.1', udpPort, udpToken, procs);
  await new Promise((r) => setTimeout(r, 50));
  t.same([u.result, reached.includes(udpToken)], ['EPERM', false], 'UDP sendto: EPERM, nothing reached');
  const outside = await tcp('127.0.0.1', forbidden4, '-');
  t.same([outside.result, outside.reached], ['ok', true], 'a process outside the cgroup is not filtered');

  const ev = await events.forCgroup(c.cgroupId, 4);
  events.stream.close();
  t.ok(ev.length >= 4, `deny events for the gateway cgroup (${ev.length})`);
  t.ok(ev.every((e) => e.set === 'gateway' && !e.probe), 'every one of set "gateway"');
  t.ok(ev.some((e) => e.pid === no4.pid && e.hook === 'connect4' && e.port === forbidden4 && e.dst === '127.0.0.1'), 'the TCP attempt, by pid, hook and destination');
  t.ok(ev.some((e) => e.hook === 'sendmsg4' && e.port === udpPort), 'the UDP attempt');

  const after = await w.egress.status();
  t.equal(after.gateway!.cgroupId, c.cgroupId, 'the status names the confined cgroup');
  for (const h of SOCK_HOOKS) {
    const progs = after.gateway!.programs[h];
    t.ok(Array.isArray(progs) && progs.length === 1 && progs[0]!.tag === tags.get(h), `${h}: exactly one program, the built one`);
  }
  t.ok(after.gateway!.denied >= 4 && after.gateway!.allowed >= 2, `counters (denied ${after.gateway!.denied}, allowed ${after.gateway!.allowed})`);

  const again = await confineFrom(w, procs);
  t.same([again.error, again.already, again.cgroupId], [undefined, true, c.cgroupId], 'CONFINE again: a no-op');
  const same = await w.egress.status();
  t.same(same.gateway!.programs, after.gateway!.programs, 'nothing attached anew');
});

t.test('refused: the warden\'s own cgroup; and a warden without --gateway-egress', async (t) => {
  const w = wardens[0]!;
  const own = await confineFrom(w, '-');
  t.equal(own.error, 'cgroup_refused', 'the warden\'s own cgroup (where this test and the warden run)');
  t.ok(w.log.some((l) => l.includes('refused code=cgroup_refused')), 'logged by the warden');

  const off = await warden(`${NAME}-off`, []);
  t.equal((await off.egress.status()).gateway, undefined, 'no gateway set in the status');
  const r = await confineFrom(off, procs);
  t.equal(r.error, 'gateway_egress_off');
  await off.stop();
  wardens.pop();
});

t.test('a restarted gateway (its cgroup removed and made anew) is confined anew', async (t) => {
  const w = wardens[0]!;
  const old = statSync(G).ino;
  rmdirRetry(G);
  mkdirSync(G);
  t.not(statSync(G).ino, old, 'a new cgroup at the same path');
  const pre = await tcp('127.0.0.1', forbidden4);
  t.same([pre.result, pre.reached], ['ok', true], 'positive control: the new cgroup is not filtered before it asks');
  const c = await confineFrom(w, procs);
  t.same([c.error, c.already, c.cgroupId], [undefined, false, statSync(G).ino], 'confined anew');
  const no = await tcp('127.0.0.1', forbidden4);
  t.same([no.result, no.reached], ['EPERM', false], 'filtered again');
  const st = await w.egress.status();
  t.equal(st.gateway!.cgroupId, c.cgroupId);
});

t.test('a SIGKILLed warden leaves the gateway filtered; its successor takes the cgroup over', async (t) => {
  const w = wardens.shift()!;
  const before = await w.egress.status();
  await w.kill();
  const gone = await tcp('127.0.0.1', forbidden4);
  t.same([gone.result, gone.reached], ['EPERM', false], 'no warden: still EPERM (the pinned links hold)');
  const ok = await tcp('127.0.0.1', allowed4);
  t.same([ok.result, ok.reached], ['ok', true], 'and the allowed address still connects');

  const w2 = await warden();
  const fresh = await w2.egress.status();
  t.equal(fresh.gateway!.cgroupId, 0, 'the new warden does not know the cgroup until the gateway asks');
  const c = await confineFrom(w2, procs);
  t.same([c.error, c.already], [undefined, false], 'CONFINE to the new warden');
  const st = await w2.egress.status();
  for (const h of SOCK_HOOKS) {
    const progs = st.gateway!.programs[h] as Array<{ id: number }>;
    const old = before.gateway!.programs[h] as Array<{ id: number }>;
    t.equal(progs.length, 1, `${h}: one program (the old link was detached after the new one was attached)`);
    t.not(progs[0]!.id, old[0]!.id, `${h}: the new warden's program`);
  }
  const no = await tcp('127.0.0.1', forbidden4);
  t.same([no.result, no.reached], ['EPERM', false], 'filtered by the new programs');
  const yes = await tcp('127.0.0.1', allowed4);
  t.same([yes.result, yes.reached], ['ok', true], 'the new maps hold the allowlist');
  await w2.stop();
  wardens.pop();
  t.ok(w2.log.some((l) => l.includes(`${NAME}-gateway still exists`)), 'a stopped warden leaves a live gateway cgroup filtered');
  const still = await tcp('127.0.0.1', forbidden4);
  t.equal(still.result, 'EPERM', 'still EPERM after a clean stop');
});

t.test('bad --gateway-egress values stop the warden at start', async (t) => {
  const base = ['--socket', join(dir, 'bad.sock'), '--client-uid', '0', '--cgroup-name', `${NAME}-bad`, '--worker-exec', '/bin/true', '--worker-script', '/x', '--uid-range', '61000-61999'];
  for (const [v, why] of [
    ['tcp,999.1.1.1/32,80', 'not an IPv4 or IPv6 prefix'],
    ['icmp,127.0.0.1/32,80', 'need: tcp|udp'],
    ['tcp,127.0.0.1/33,80', 'not an IPv4 or IPv6 prefix'],
    ['tcp,127.0.0.1/32', 'want tcp|udp,ADDRESS/BITS,PORT'],
    ['tcp,::ffff:127.0.0.1/128,80', 'IPv4-mapped'],
  ] as const) {
    const r = spawnSync(WARDEN, [...base, '--egress', 'enforce', '--gateway-egress', v], { encoding: 'utf8', timeout: 10_000 });
    t.equal(r.status, 2, `${v}: exit 2`);
    t.match(r.stderr, why, `${v}: says why`);
  }
  const off = spawnSync(WARDEN, [...base, '--egress', 'off', '--gateway-egress', 'none'], { encoding: 'utf8', timeout: 10_000 });
  t.equal(off.status, 2);
  t.match(off.stderr, '--gateway-egress needs --egress enforce');
});

t.test('a real node with egress.confineGateway: confined before it serves, fail closed when it cannot be', async (t) => {
  // The warden as its own process (as its systemd unit runs it), started the way `phantoma serve` would.
  const state = join(dir, 'node');
  const settings = [`--stateDir=${state}`, '--workers.backend=warden', '--warden.start=false', `--warden.socket=${join(dir, 'node-warden.sock')}`, `--warden.cgroupName=${NAME}-node`, '--egress.confineGateway=true', '--egress.checkIntervalMs=500', '--gateway.host=127.0.0.1', '--gateway.port=0', '--gateway.metricsPort=0', '--gateway.tls=off', '--gateway.auth=none', '--inference.threads=1', '--pool.size=1'];
  const loaded = validateConfig({ stateDir: state, workers: { backend: 'warden' }, warden: { start: false, socket: join(dir, 'node-warden.sock'), cgroupName: `${NAME}-node` }, egress: { confineGateway: true } });
  if (!loaded.ok) throw new Error(JSON.stringify(loaded.issues));
  const w = await startWardenProcess({ ...wardenProcessOptions(loaded.config, createLogger({ level: 'silent' }), []), gatewayEgress: [`tcp,127.0.0.1/32,${allowed4}`] });
  t.teardown(async () => {
    await w.stop();
    cleanupWardenLeftovers(`${NAME}-node`);
  });
  const egress = createEgressClient({ socketPath: join(dir, 'node-warden.sock') });

  rmdirRetry(G);
  mkdirSync(G);
  const serve = (inG: boolean): Promise<{ url: string; stop: () => Promise<void> }> =>
    new Promise((resolve, reject) => {
      const bin = join(ROOT, 'bin', 'phantoma');
      const cmd = inG ? `echo $$ > '${procs}' && exec "$0" serve --json "$@"` : `exec "$0" serve --json "$@"`;
      const p = spawn('sh', ['-c', cmd, bin, ...settings.map((s) => (s.startsWith('--stateDir=') && !inG ? `${s}-2` : s))], { stdio: ['ignore', 'pipe', 'pipe'] });
      let err = '';
      p.stderr.on('data', (c: Buffer) => (err += c.toString()));
      let out = '';
      const timer = setTimeout(() => reject(new Error(`serve printed nothing: ${err}`)), 60_000);
      p.stdout.on('data', (c: Buffer) => {
        out += c.toString();
        if (!out.includes('\n')) return;
        clearTimeout(timer);
        const stop = async (): Promise<void> => {
          if (p.exitCode !== null) return;
          const gone = new Promise((r) => p.once('exit', r));
          p.kill('SIGTERM');
          await gone;
        };
        resolve({ url: (JSON.parse(out.split('\n')[0]!) as { url: string }).url, stop });
      });
    });
  const readyz = async (url: string): Promise<{ status: number; body: { reasons?: string[] } & Record<string, unknown> }> => {
    const r = await fetch(`${url}/readyz`);
    return { status: r.status, body: (await r.json()) as never };
  };

  const node = await serve(true);
  t.teardown(node.stop);
  let ready = await readyz(node.url);
  for (let i = 0; i < 300 && ready.status !== 200; i++) {
    await new Promise((r) => setTimeout(r, 100));
    ready = await readyz(node.url);
  }
  t.equal(ready.status, 200, `the confined node gets ready (${JSON.stringify(ready.body)})`);
  const st = await egress.status();
  t.equal(st.gateway?.cgroupId, statSync(G).ino, "the warden's gateway set sits on the node's own cgroup");
  const chat = await fetch(`${node.url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 }) });
  t.equal(chat.status, 200, 'it serves a chat (inbound connections are not filtered)');
  const no = await tcp('127.0.0.1', forbidden4);
  t.same([no.result, no.reached], ['EPERM', false], "a process in the gateway's cgroup: EPERM to anything not allowed");
  const yes = await tcp('127.0.0.1', allowed4);
  t.same([yes.result, yes.reached], ['ok', true], 'and through to the allowed address');
  let denied: Record<string, unknown> | undefined;
  for (let i = 0; i < 50 && !denied; i++) {
    denied = tailAuditLog(join(state, 'audit'), 1000).find((e) => (e as Record<string, unknown>).type === 'egress_denied' && (e as Record<string, unknown>).pid === no.pid) as never;
    if (!denied) await new Promise((r) => setTimeout(r, 100));
  }
  t.match(denied, { set: 'gateway', hook: 'connect4', dst: '127.0.0.1', port: forbidden4 }, 'the deny is in the node\'s audit log, set "gateway"');

  // Fail closed: a node the warden will not confine (it runs in the warden's own cgroup) never gets ready.
  const unconfined = await serve(false);
  t.teardown(unconfined.stop);
  let r = await readyz(unconfined.url);
  for (let i = 0; i < 30 && !JSON.stringify(r.body).includes('gateway_unconfined'); i++) {
    await new Promise((res) => setTimeout(res, 100));
    r = await readyz(unconfined.url);
  }
  t.equal(r.status, 503, 'not ready');
  t.match(JSON.stringify(r.body), /gateway_unconfined: CONFINE failed \(cgroup_refused\): .*the warden's own/, 'and /readyz says why');
  await unconfined.stop();
  await node.stop();
});
