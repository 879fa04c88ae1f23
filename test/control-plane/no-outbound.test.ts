// The control plane never connects to a node. It runs here as its own process (`phantoma-cp serve`) on a
// real Postgres server while nodes enrol, heartbeat, renew and one is revoked, watched two ways:
//  - the kernel: the process runs in a cgroup of the test's own to which the warden's socket-level egress
//    programs (connect4/6, sendmsg4/6 — not the skb program, which would drop its replies to the nodes)
//    are attached, sharing the download/ set's allowlist, which holds only the Postgres address. Every
//    other connect or datagram, loopback included, fails with EPERM and is reported as a deny event naming
//    the cgroup. Positive control: a connection and a datagram from that cgroup to a loopback listener of
//    the test's are refused and reported. Then zero further deny events for the cgroup.
//  - /proc: a sampler reads the process's sockets every few milliseconds and classifies each: listening,
//    accepted on its own API or metrics port (inbound), or connected to the Postgres port. Anything else —
//    an outbound TCP connection anywhere, or any UDP socket (a DNS lookup) — is a violation.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:net';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import http from 'node:http';
import { ROOT } from '../helpers.ts';
import { createLeaseKey } from '../../control-plane/src/lease-key.ts';
import { simNode, WEAK } from './rig.ts';
import { startPostgres } from './postgres.ts';
import { buildAll, cleanupWardenLeftovers, rmdirRetry, startWarden, subscribe } from '../egress/rig.ts';

interface Sock {
  proto: string;
  local: number;
  remote: number;
  state: string;
}

function socketsOf(pid: number): Sock[] {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]!);
    } catch {
      /* closed meanwhile */
    }
  }
  const out: Sock[] = [];
  for (const proto of ['tcp', 'tcp6', 'udp', 'udp6']) {
    for (const line of readFileSync(`/proc/${pid}/net/${proto}`, 'utf8').split('\n').slice(1)) {
      const c = line.trim().split(/\s+/);
      if (c.length < 10 || !inodes.has(c[9]!)) continue;
      out.push({ proto, local: parseInt(c[1]!.split(':')[1]!, 16), remote: parseInt(c[2]!.split(':')[1]!, 16), state: c[3]! });
    }
  }
  return out;
}

/** Runs `argv` as a process of `cgroupDir` from its first instruction (a shell joins it, then execs). */
function inCgroup(cgroupDir: string, argv: string[]): string[] {
  return ['/bin/sh', '-c', `echo $$ > "${join(cgroupDir, 'cgroup.procs')}" && exec "$0" "$@"`, ...argv];
}

const SOCKET_HOOKS = ['connect4', 'connect6', 'sendmsg4', 'sendmsg6'] as const;

t.test('the control plane opens no connection except to its database: under the kernel egress filter, and in /proc', async (t) => {
  const pg = await startPostgres();
  t.teardown(() => pg.stop());
  const dataDir = mkdtempSync(join(tmpdir(), 'phantoma-cp-proc-'));
  t.teardown(() => rmSync(dataDir, { recursive: true, force: true }));

  // The warden loads and pins the egress programs; download/'s allowlist gets the Postgres address only.
  buildAll(dataDir);
  const name = `phantoma-cp-egress-${process.pid}`;
  const w = await startWarden({ name, sockDir: dataDir });
  t.teardown(async () => {
    await w.stop();
    cleanupWardenLeftovers(name);
  });
  await w.egress.allow('tcp', '127.0.0.1/32', pg.port);
  const status = await w.egress.status();
  t.same(status.downloadAllow, [`tcp:127.0.0.1/32:${pg.port}`], 'the allowlist holds the Postgres address and nothing else');
  const events = await subscribe(w.egress);
  t.teardown(() => events.stream.close());
  // The control plane's own cgroup (v2), with the download set's pinned socket programs attached.
  const cg = join('/sys/fs/cgroup/unified', `phantoma-cp-${process.pid}`);
  mkdirSync(cg);
  t.teardown(() => rmdirRetry(cg));
  const cgId = statSync(cg).ino;
  for (const hook of SOCKET_HOOKS) {
    const r = spawnSync('bpftool', ['cgroup', 'attach', cg, hook, 'pinned', join(status.pins ?? '', 'download', `prog_${hook}`)], { encoding: 'utf8' });
    t.equal(r.status, 0, `${hook} attached to the control plane's cgroup ${r.stderr}`);
  }
  const attached = spawnSync('bpftool', ['cgroup', 'show', cg], { encoding: 'utf8' }).stdout;
  t.same(SOCKET_HOOKS.filter((h) => new RegExp(`\\begress_${h}\\b`).test(attached)), [...SOCKET_HOOKS], `bpftool shows the four socket programs on the cgroup, and no skb program:\n${attached}`);
  t.notMatch(attached, /egress_skb/);

  // Positive control: from that cgroup, a loopback listener of ours is unreachable and each attempt is reported.
  const bait = createServer((s) => s.destroy());
  let baitReached = 0;
  bait.on('connection', () => baitReached++);
  await new Promise<void>((r) => bait.listen(0, '127.0.0.1', () => r()));
  t.teardown(() => bait.close());
  const baitPort = (bait.address() as { port: number }).port;
  const probe = `const net=require('node:net'),dgram=require('node:dgram');const out={};const s=dgram.createSocket('udp4');s.send(Buffer.from('x'),${baitPort},'127.0.0.1',(e)=>{out.udp=e?e.code:'sent';s.close();net.connect(${baitPort},'127.0.0.1').on('connect',()=>{out.tcp='connected';console.log(JSON.stringify(out));process.exit(0)}).on('error',(e)=>{out.tcp=e.code;console.log(JSON.stringify(out))})})`;
  const [pSh, ...pArgs] = inCgroup(cg, [join(ROOT, '.runtime', 'bin', 'node'), '-e', probe]);
  const control = spawnSync(pSh!, pArgs, { encoding: 'utf8', timeout: 20_000 });
  t.same(JSON.parse(control.stdout.trim() || '{}'), { udp: 'EPERM', tcp: 'EPERM' }, `the control's connect and datagram fail with EPERM ${control.stderr}`);
  const controlEvents = await events.forCgroup(cgId, 2);
  t.same(controlEvents.map((e) => [e.set, e.hook, e.dst, e.port]).sort(), [['download', 'connect4', '127.0.0.1', baitPort], ['download', 'sendmsg4', '127.0.0.1', baitPort]], 'both are reported as deny events naming the cgroup');
  t.equal(baitReached, 0, 'the listener saw no connection');
  const pass = 'no outbound test';
  createLeaseKey(dataDir, { kind: 'passphrase', secret: Buffer.from(pass) }, WEAK);
  const config = join(dataDir, 'cp.json');
  writeFileSync(config, JSON.stringify({ dataDir, database: pg.url, host: '127.0.0.1', port: 0, metricsPort: 0, logLevel: 'warn', key: { kdfLog2N: 10, allowWeakKdf: true } }));
  const [cpSh, ...cpArgs] = inCgroup(cg, [join(ROOT, '.runtime', 'bin', 'node'), '--disable-warning=ExperimentalWarning', join(ROOT, 'control-plane', 'src', 'main.ts'), 'serve', '--config', config, '--json']);
  const cp = spawn(cpSh!, cpArgs, {
    env: { ...process.env, PHANTOMA_CP_PASSPHRASE: pass },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise((r) => cp.once('exit', r));
  t.teardown(async () => {
    if (cp.exitCode === null) cp.kill('SIGTERM');
    const timer = setTimeout(() => cp.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  });
  const started = await new Promise<{ url: string; fingerprint: string; metrics: string; admin: string }>((resolve, reject) => {
    let out = '';
    cp.stdout!.on('data', (c: Buffer) => {
      out += c.toString();
      const nl = out.indexOf('\n');
      if (nl >= 0) resolve(JSON.parse(out.slice(0, nl)));
    });
    cp.once('exit', (code) => reject(new Error(`phantoma-cp exited with ${code}`)));
  });
  const apiPort = Number(new URL(started.url).port);
  const metricsPort = Number(new URL(started.metrics).port);

  const violations: Sock[] = [];
  let samples = 0;
  let sawDb = false;
  let sawInbound = false;
  const sampler = setInterval(() => {
    try {
      for (const s of socketsOf(cp.pid!)) {
        if (s.proto.startsWith('udp')) violations.push(s);
        else if (s.state === '0A') continue;
        else if (s.local === apiPort || s.local === metricsPort) sawInbound = true;
        else if (s.remote === pg.port) sawDb = true;
        else violations.push(s);
      }
      samples++;
    } catch {
      /* the process is exiting */
    }
  }, 5);
  t.teardown(() => clearInterval(sampler));

  const admin = (method: string, path: string, body?: unknown): Promise<{ token?: string }> =>
    new Promise((resolve, reject) => {
      const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
      const req = http.request({ socketPath: started.admin, method, path, headers: payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {} }, (res) => {
        let text = '';
        res.on('data', (c: Buffer) => (text += c.toString()));
        res.on('end', () => resolve(JSON.parse(text)));
      });
      req.on('error', reject);
      req.end(payload);
    });

  const rig = { cp: { url: started.url, fingerprint: started.fingerprint } as never, clock: { now: Date.now() } };
  const nodes = [simNode(rig), simNode(rig), simNode(rig)];
  t.teardown(() => nodes.forEach((n) => n.close()));
  for (const [i, n] of nodes.entries()) {
    rig.clock.now = Date.now();
    await n.enrol((await admin('POST', '/tokens', { node: `quiet-${i}`, ttlSeconds: 600 })).token!);
  }
  for (let round = 0; round < 5; round++) {
    for (const n of nodes) {
      rig.clock.now = Date.now();
      await n.beat();
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  await admin('POST', '/nodes/quiet-0/revoke');
  rig.clock.now = Date.now();
  await t.rejects(nodes[0]!.beat(), { code: 'license_revoked' });
  await fetch(started.metrics);
  await new Promise((r) => setTimeout(r, 50));
  clearInterval(sampler);

  t.equal(readFileSync(join(cg, 'cgroup.procs'), 'utf8').trim(), String(cp.pid), 'the control plane ran in the filtered cgroup throughout');
  await new Promise((r) => setTimeout(r, 200)); // events still in the ring buffer
  const after = events.events.filter((e) => e.cgroupId === cgId).length - controlEvents.length;
  t.equal(after, 0, 'zero deny events from the control plane while nodes enrolled, beat, renewed and one was revoked');
  t.ok(samples > 20, `sampled the process's sockets ${samples} times`);
  t.ok(sawInbound, 'saw the nodes connect in');
  t.ok(sawDb, 'saw the database connections (the sampler sees outbound sockets)');
  t.same(violations, [], 'no other socket: no outbound connection, no UDP (no DNS)');
});
