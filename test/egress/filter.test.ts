// The egress filter on the real kernel (issue 9), BPF wall alone: each attempt process moves itself into a
// child of the warden's workers/ (or download/) BEFORE it creates any socket and stays in the host's
// network namespace; its target is a listener inside a network namespace this test creates (veth pair).
// Every "blocked" is preceded by the same attempt reaching the listener from outside the cgroup, is
// decided on the listener's side, asserts the exact errno, and must produce exactly one deny event.
import t from 'tap';
import { readFileSync, rmSync } from 'node:fs';
import { spawn } from 'node:child_process';
import {
  attemptCgroup,
  buildAll,
  cleanupWardenLeftovers,
  createNetns,
  expectedTags,
  runAttempt,
  startWarden,
  subscribe,
  tempDir,
  type Netns,
  type Warden,
} from './rig.ts';
import { HOOKS, SETS, type WatchEvent } from '../../src/egress/warden-egress.ts';

t.equal(process.getuid?.(), 0, 'the egress tests run as root (the warden loads BPF programs)');
const dir = tempDir('phantoma-egress-');
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const ATTEMPT = buildAll(dir);
const NAME = `phantoma-egress-test-${process.pid}`;
let seq = 0;
const token = (what: string): string => `${what}-${process.pid}-${++seq}`;

let ns: Netns;
let w: Warden;
t.before(async () => {
  ns = await createNetns('fil');
  w = await startWarden({ name: NAME, sockDir: dir });
});
t.teardown(async () => {
  await ns?.listener.stop();
  ns?.destroy();
  await w?.stop();
  cleanupWardenLeftovers(NAME);
});

interface Case {
  name: string;
  mode: string;
  addr: () => string;
  port: () => number;
  /** How the listener reports this attempt (the host it saw it on). */
  ev: 'tcp' | 'udp' | 'dns';
  host: () => string;
  hook: string;
  /** The destination a deny event names (IPv4-mapped IPv6 is judged and reported as IPv4). */
  dst: () => string;
  proto: string;
}

const CASES: Case[] = [
  { name: 'TCP connect over IPv4', mode: 'tcp', addr: () => ns.v4, port: () => ns.tcpPort, ev: 'tcp', host: () => ns.v4, hook: 'connect4', dst: () => ns.v4, proto: 'tcp' },
  { name: 'TCP connect over IPv6', mode: 'tcp', addr: () => ns.v6, port: () => ns.tcpPort, ev: 'tcp', host: () => ns.v6, hook: 'connect6', dst: () => ns.v6, proto: 'tcp' },
  { name: 'TCP connect to an IPv4-mapped IPv6 address', mode: 'tcp', addr: () => `::ffff:${ns.v4}`, port: () => ns.tcpPort, ev: 'tcp', host: () => ns.v4, hook: 'connect6', dst: () => ns.v4, proto: 'tcp' },
  { name: 'UDP sendto over IPv4', mode: 'udp-sendto', addr: () => ns.v4, port: () => ns.udpPort, ev: 'udp', host: () => ns.v4, hook: 'sendmsg4', dst: () => ns.v4, proto: 'udp' },
  { name: 'UDP sendto over IPv6', mode: 'udp-sendto', addr: () => ns.v6, port: () => ns.udpPort, ev: 'udp', host: () => ns.v6, hook: 'sendmsg6', dst: () => ns.v6, proto: 'udp' },
  { name: 'connected UDP over IPv4', mode: 'udp-connect', addr: () => ns.v4, port: () => ns.udpPort, ev: 'udp', host: () => ns.v4, hook: 'connect4', dst: () => ns.v4, proto: 'udp' },
  { name: 'connected UDP over IPv6', mode: 'udp-connect', addr: () => ns.v6, port: () => ns.udpPort, ev: 'udp', host: () => ns.v6, hook: 'connect6', dst: () => ns.v6, proto: 'udp' },
  { name: 'sendmmsg (two datagrams, IPv4)', mode: 'sendmmsg', addr: () => ns.v4, port: () => ns.udpPort, ev: 'udp', host: () => ns.v4, hook: 'sendmsg4', dst: () => ns.v4, proto: 'udp' },
  { name: 'TCP Fast Open (sendto MSG_FASTOPEN)', mode: 'tfo', addr: () => ns.v4, port: () => ns.tcpPort, ev: 'tcp', host: () => ns.v4, hook: 'connect4', dst: () => ns.v4, proto: 'tcp' },
  { name: 'a DNS query to a resolver in the test namespace', mode: 'dns', addr: () => ns.v4, port: () => 53, ev: 'dns', host: () => ns.v4, hook: 'connect4', dst: () => ns.v4, proto: 'udp' },
  { name: 'a connect from a second thread', mode: 'thread', addr: () => ns.v4, port: () => ns.tcpPort, ev: 'tcp', host: () => ns.v4, hook: 'connect4', dst: () => ns.v4, proto: 'tcp' },
  { name: 'a connect from a double-forked daemon', mode: 'daemon', addr: () => ns.v6, port: () => ns.tcpPort, ev: 'tcp', host: () => ns.v6, hook: 'connect6', dst: () => ns.v6, proto: 'tcp' },
];

t.test('status: every hook of workers/ and download/ carries exactly the program we built (by the kernel word)', async (t) => {
  const tags = expectedTags();
  const st = await w.egress.status();
  t.equal(st.mode, 'enforce');
  for (const s of SETS) {
    for (const h of HOOKS) {
      const progs = st.sets![s].programs[h];
      t.ok(Array.isArray(progs) && progs.length === 1, `${s}/${h}: one program attached`);
      t.equal(Array.isArray(progs) ? progs[0]!.tag : progs, tags.get(h), `${s}/${h}: tag ${tags.get(h)}`);
    }
  }
  t.equal(st.workersAllowCount, 0, 'workers/ allowlist is empty');
  t.same(st.downloadAllow, [], 'download/ allowlist is empty outside a maintenance window');
});

t.test('the live probe: a child in workers/probe, host namespace, is refused on every attempt', async (t) => {
  const p = await w.egress.probe();
  t.equal(p.refused, true, p.detail);
  t.same(p.attempts, { tcp4: 'EPERM', mapped: 'EPERM', tcp6: 'EPERM', udp4: 'EPERM' });
  t.equal(p.reached, 0, "nothing reached the warden's loopback listeners");
});

t.test('blocked in workers/, each next to its positive control, one deny event each', async (t) => {
  const log = await subscribe(w.egress);
  t.teardown(() => log.stream.close());
  for (const c of CASES) {
    // Positive control: the same attempt from outside the cgroup reaches the listener.
    const ok = token('ok');
    const pos = await runAttempt(ATTEMPT, c.mode, c.addr(), c.port(), ok);
    t.equal(pos.result, 'ok', `${c.name}: outside the cgroup the attempt succeeds`);
    t.ok(await ns.listener.waitFor((e) => e.ev === c.ev && e.data === ok && e.host === c.host(), 3000), `${c.name}: positive control reached the listener`);
    if (c.mode === 'dns') t.equal(pos.answer, '10.9.8.7', 'the resolver answered the positive control');

    const cg = attemptCgroup(w.workersDir);
    try {
      const bad = token('in');
      const r = await runAttempt(ATTEMPT, c.mode, c.addr(), c.port(), bad, cg.procs);
      t.equal(r.result, 'EPERM', `${c.name}: refused with EPERM inside workers/`);
      t.notOk(await ns.listener.waitFor((e) => e.data === bad, 400), `${c.name}: nothing reached the listener`);
      const evs = await log.forCgroup(cg.id, 1);
      t.equal(evs.length, 1, `${c.name}: exactly one deny event`);
      const e = evs[0];
      t.match(e, { set: 'workers', hook: c.hook, dst: c.dst(), port: c.port(), proto: c.proto, probe: false }, `${c.name}: the event names hook, destination and protocol`);
      if (c.mode === 'daemon') t.equal(e?.pid, r.daemonPid, 'the event names the daemon (the grandchild), not its parent');
      else t.equal(e?.pid, r.pid, 'the event names the attempt process');
      t.equal(e?.comm, 'attempt');
    } finally {
      cg.remove();
    }
  }
});

t.test('a raw ICMP socket: the packet is dropped by cgroup_skb/egress', async (t) => {
  const log = await subscribe(w.egress);
  t.teardown(() => log.stream.close());
  const before = await ns.listener.inEchos();
  const pos = await runAttempt(ATTEMPT, 'icmp', ns.v4, 0, token('ok'));
  t.equal(pos.result, 'ok');
  const deadline = Date.now() + 3000;
  let after = before;
  while (after === before && Date.now() < deadline) after = await ns.listener.inEchos();
  t.equal(after, before + 1, 'positive control: the echo request reached the namespace');

  const cg = attemptCgroup(w.workersDir);
  try {
    const r = await runAttempt(ATTEMPT, 'icmp', ns.v4, 0, token('in'), cg.procs);
    t.equal(r.result, 'EPERM', 'sendto on the raw socket fails with EPERM');
    await new Promise((res) => setTimeout(res, 400));
    t.equal(await ns.listener.inEchos(), after, 'no echo request reached the namespace');
    const evs = await log.forCgroup(cg.id, 1);
    t.equal(evs.length, 1, 'exactly one deny event');
    t.match(evs[0], { set: 'workers', hook: 'egress', proto: 'icmp', dst: ns.v4, port: 0, pid: 0 }, 'reported by the skb hook (no task context there)');
  } finally {
    cg.remove();
  }
});

t.test('download/: blocked until ALLOW, allowed only for the entry, blocked again after DENY; workers/ unaffected', async (t) => {
  const log = await subscribe(w.egress);
  t.teardown(() => log.stream.close());
  const pos = token('ok');
  t.equal((await runAttempt(ATTEMPT, 'tcp', ns.v4, ns.tcpPort, pos)).result, 'ok');
  t.ok(await ns.listener.waitFor((e) => e.ev === 'tcp' && e.data === pos, 3000), 'positive control reached the listener');
  const dl = attemptCgroup(w.downloadDir);
  const wk = attemptCgroup(w.workersDir);
  t.teardown(async () => {
    await w.egress.deny('tcp', `${ns.v4}/32`, ns.tcpPort).catch(() => undefined);
    dl.remove();
    wk.remove();
  });
  const a1 = token('dl');
  t.equal((await runAttempt(ATTEMPT, 'tcp', ns.v4, ns.tcpPort, a1, dl.procs)).result, 'EPERM', 'download/ with an empty allowlist: EPERM');
  t.notOk(await ns.listener.waitFor((e) => e.data === a1, 300), 'not reached');
  t.equal((await log.forCgroup(dl.id, 1)).length, 1, 'one deny event (set download)');
  t.equal(log.events.find((e) => e.cgroupId === dl.id)?.set, 'download');

  await w.egress.allow('tcp', `${ns.v4}/32`, ns.tcpPort);
  t.same((await w.egress.status()).downloadAllow, [`tcp:${ns.v4}/32:${ns.tcpPort}`], 'status lists the entry');
  const a2 = token('dl');
  t.equal((await runAttempt(ATTEMPT, 'tcp', ns.v4, ns.tcpPort, a2, dl.procs)).result, 'ok', 'allowlisted flow connects');
  t.ok(await ns.listener.waitFor((e) => e.ev === 'tcp' && e.data === a2, 3000), 'and reaches the listener (packets pass the skb hook too)');
  const a3 = token('dl');
  t.equal((await runAttempt(ATTEMPT, 'udp-sendto', ns.v4, ns.udpPort, a3, dl.procs)).result, 'EPERM', 'another port/protocol stays blocked');
  const a4 = token('wk');
  t.equal((await runAttempt(ATTEMPT, 'tcp', ns.v4, ns.tcpPort, a4, wk.procs)).result, 'EPERM', 'workers/ is unaffected by the download allowlist');
  t.equal((await w.egress.status()).workersAllowCount, 0);

  await w.egress.deny('tcp', `${ns.v4}/32`, ns.tcpPort);
  const a5 = token('dl');
  t.equal((await runAttempt(ATTEMPT, 'tcp', ns.v4, ns.tcpPort, a5, dl.procs)).result, 'EPERM', 'after DENY: EPERM again');
  t.notOk(await ns.listener.waitFor((e) => e.data === a3 || e.data === a4 || e.data === a5, 300), 'none of the blocked ones reached');
});

t.test('ALLOW/DENY refusals', async (t) => {
  const bad: Array<[string[], string]> = [
    [['ALLOW', 'icmp', '10.0.0.0/8', '0'], 'bad_request'],
    [['ALLOW', 'tcp', '10.0.0.0/33', '80'], 'bad_request'],
    [['ALLOW', 'tcp', '10.0.0.0', '80'], 'bad_request'],
    [['ALLOW', 'tcp', '::ffff:10.0.0.1/128', '80'], 'bad_request'],
    [['ALLOW', 'tcp', '10.0.0.0/8', '65536'], 'bad_request'],
    [['ALLOW', 'tcp', '10.0.0.0/8'], 'bad_request'],
    [['ALLOW', 'workers', 'tcp', '10.0.0.0/8', '80'], 'bad_request'],
    [['DENY', 'tcp', '10.1.2.3/32', '80'], 'unknown_entry'],
  ];
  for (const [fields, code] of bad) t.match(await w.client.raw(fields), new RegExp(`^ERR ${code} `), `${fields.join(' ')} -> ${code}`);
});

t.test('ptrace and process_vm_readv aimed at a worker are reported (tracepoints, detection only); at an unwatched process not', async (t) => {
  const st = await w.egress.status();
  t.equal(st.watch, true, 'the tracepoint programs are attached (tracefs mounted by the warden)');
  const seen: WatchEvent[] = [];
  const stream = await w.egress.events(() => undefined, (e) => seen.push(e));
  const cg = attemptCgroup(w.workersDir);
  // The target: a sleeper that joined a workers/ child first thing. The control: a sleeper of another uid,
  // outside workers/ (this test warden's client uid is 0, so a root process would count as "gateway").
  const target = spawn('sh', ['-c', `echo $$ > ${cg.procs} && exec sleep 30`], { stdio: 'ignore' });
  const other = spawn('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'sleep', '30'], { stdio: 'ignore' });
  t.teardown(() => {
    stream.close();
    target.kill('SIGKILL');
    other.kill('SIGKILL');
    cg.remove();
  });
  const deadline = Date.now() + 3000;
  while (!readFileSync(cg.procs, 'utf8').includes(String(target.pid)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  await new Promise((r) => setTimeout(r, 100)); // both sleepers exec'd
  for (const pid of [target.pid!, other.pid!]) {
    t.equal((await runAttempt(ATTEMPT, 'ptrace', '-', pid, 'x')).result, 'ok', `root may ptrace ${pid} (the filter detects, it does not prevent)`);
    t.equal((await runAttempt(ATTEMPT, 'vmread', '-', pid, 'x')).result, 'EFAULT', 'process_vm_readv entered (unmapped address)');
  }
  const until = Date.now() + 3000;
  while (seen.filter((e) => e.target === target.pid).length < 3 && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
  await new Promise((r) => setTimeout(r, 200));
  const mine = seen.filter((e) => e.target === target.pid);
  t.ok(mine.some((e) => e.kind === 'ptrace' && e.request === 16 && e.targetIs === 'worker' && e.comm === 'attempt'), 'PTRACE_ATTACH on the worker reported');
  t.ok(mine.some((e) => e.kind === 'process_vm_readv' && e.targetIs === 'worker'), 'process_vm_readv on the worker reported');
  t.equal(seen.filter((e) => e.target === other.pid).length, 0, 'nothing reported for a process that is neither a worker nor the gateway');
});
