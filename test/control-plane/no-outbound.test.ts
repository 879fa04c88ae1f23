// The control plane never connects to a node. It runs here as its own process (`phantoma-cp serve`) on a
// real Postgres server while nodes enrol, heartbeat, renew and one is revoked; a sampler reads the
// process's sockets from /proc every few milliseconds and classifies each: listening, accepted on its own
// API or metrics port (inbound), or connected to the Postgres port. Anything else — an outbound TCP
// connection anywhere, or any UDP socket (a DNS lookup) — is a violation. (The stronger form, running it
// under the kernel egress filter with only Postgres allowlisted, waits for a socket-level-only egress
// cgroup: see docs/licensing.md.)
import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import http from 'node:http';
import { ROOT } from '../helpers.ts';
import { createLeaseKey } from '../../control-plane/src/lease-key.ts';
import { simNode, WEAK } from './rig.ts';
import { startPostgres } from './postgres.ts';

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

t.test('the control plane opens no connection except to its database', async (t) => {
  const pg = await startPostgres();
  t.teardown(() => pg.stop());
  const dataDir = mkdtempSync(join(tmpdir(), 'phantoma-cp-proc-'));
  t.teardown(() => rmSync(dataDir, { recursive: true, force: true }));
  const pass = 'no outbound test';
  createLeaseKey(dataDir, { kind: 'passphrase', secret: Buffer.from(pass) }, WEAK);
  const config = join(dataDir, 'cp.json');
  writeFileSync(config, JSON.stringify({ dataDir, database: pg.url, host: '127.0.0.1', port: 0, metricsPort: 0, logLevel: 'warn', key: { kdfLog2N: 10, allowWeakKdf: true } }));
  const cp = spawn(join(ROOT, '.runtime', 'bin', 'node'), ['--disable-warning=ExperimentalWarning', join(ROOT, 'control-plane', 'src', 'main.ts'), 'serve', '--config', config, '--json'], {
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

  t.ok(samples > 20, `sampled the process's sockets ${samples} times`);
  t.ok(sawInbound, 'saw the nodes connect in');
  t.ok(sawDb, 'saw the database connections (the sampler sees outbound sockets)');
  t.same(violations, [], 'no other socket: no outbound connection, no UDP (no DNS)');
});
