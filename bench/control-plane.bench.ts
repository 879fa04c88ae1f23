// Benchmark: signed heartbeats from many simulated nodes against a real control plane, on embedded PGlite
// and on a real PostgreSQL server. The control plane runs as its own process (`phantoma-cp serve`), so its
// CPU time is read from /proc/<pid>/stat (utime + stime) and the load generator sharing the cores does not
// distort it; for Postgres the server's own CPU (postmaster and backends) is reported beside it. Every
// heartbeat is a new TLS 1.3 connection (session resumption allowed, as a node's client does), a fresh
// counter, an Ed25519 signature by the node's key; the lease in every answer is checked.
//
// Run: . scripts/env.sh && node bench/control-plane.bench.ts [--nodes N] [--heartbeats N] [--concurrency N]
// Writes bench/results/control-plane.json. Needs root (postgres runs as nobody) for the Postgres arm.
import { parseArgs } from 'node:util';
import { spawn, type ChildProcess } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import http from 'node:http';
import { projectRoot } from '../src/paths.ts';
import { createLeaseKey } from '../control-plane/src/lease-key.ts';
import { createControlPlaneClient, type ControlPlaneClient } from '../src/control/client.ts';
import { enrolNode, signerFromPrivateKey, type NodeSigner } from '../src/control/node.ts';
import { canonicalBytes, DOMAIN, verifySignature, type HeartbeatBody, type SignedLease } from '../src/control/protocol.ts';
import { startPostgres } from '../test/control-plane/postgres.ts';

const { values } = parseArgs({
  options: {
    nodes: { type: 'string', default: '200' },
    heartbeats: { type: 'string', default: '4000' },
    concurrency: { type: 'string', default: '16' },
    arms: { type: 'string', default: 'floor,pglite,postgres,postgres-unix' },
    'cpu-prof': { type: 'string' },
  },
});
const NODES = Number(values.nodes);
const HEARTBEATS = Number(values.heartbeats);
const CONCURRENCY = Number(values.concurrency);
const root = projectRoot();
const PASS = 'bench passphrase';
const CLK_TCK = 100;

function cpuMsOf(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / CLK_TCK;
}

/** CPU of a process and all its children (the postmaster and its backends). */
function treeCpuMs(rootPid: number): number {
  let total = 0;
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(p) === rootPid || Number(fields[1]) === rootPid) total += ((Number(fields[11]) + Number(fields[12])) * 1000) / CLK_TCK;
    } catch {
      /* gone */
    }
  }
  return total;
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

async function admin(socketPath: string, path: string, body: unknown): Promise<{ token: string }> {
  const payload = Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, path, method: 'POST', headers: { 'content-type': 'application/json', 'content-length': payload.length } }, (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += c.toString()));
      res.on('end', () => resolve(JSON.parse(text)));
    });
    req.on('error', reject);
    req.end(payload);
  });
}

interface Arm {
  database: string;
  heartbeats: number;
  seconds: number;
  perSecond: number;
  p50Ms: number;
  p99Ms: number;
  cpCpuMsPerHeartbeat: number;
  dbCpuMsPerHeartbeat: number | null;
  nodesPerCoreAt10Min: number;
  refused: number;
}

/** The floor arm: a bare HTTPS server (bench/control-plane-floor.ts), same client, same connection pattern. */
async function runFloor(): Promise<Arm> {
  const server = spawn(join(root, '.runtime', 'bin', 'node'), ['--disable-warning=ExperimentalWarning', join(root, 'bench', 'control-plane-floor.ts')], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const started = await new Promise<{ url: string; fingerprint: string }>((resolve, reject) => {
      let out = '';
      server.stdout!.on('data', (c: Buffer) => {
        out += c.toString();
        const nl = out.indexOf('\n');
        if (nl >= 0) resolve(JSON.parse(out.slice(0, nl)));
      });
      server.once('exit', (code) => reject(new Error(`floor server exited with ${code}`)));
    });
    const clients = Array.from({ length: NODES }, () => createControlPlaneClient({ url: started.url, pin: started.fingerprint }));
    const body = JSON.stringify({ heartbeat: { pad: 'x'.repeat(500) }, signature: 'y'.repeat(86) });
    const drive = async (total: number): Promise<number[]> => {
      const latencies: number[] = [];
      let next = 0;
      await Promise.all(
        Array.from({ length: CONCURRENCY }, async (_, w) => {
          let k = w;
          while (next < total) {
            next++;
            const t0 = performance.now();
            await clients[k % NODES]!.post('/v1/heartbeat', body);
            k += CONCURRENCY;
            latencies.push(performance.now() - t0);
          }
        }),
      );
      return latencies;
    };
    await drive(Math.min(500, HEARTBEATS));
    const before = cpuMsOf(server.pid!);
    const t0 = performance.now();
    const latencies = await drive(HEARTBEATS);
    const seconds = (performance.now() - t0) / 1000;
    const perHb = (cpuMsOf(server.pid!) - before) / latencies.length;
    latencies.sort((x, y) => x - y);
    return {
      database: 'floor',
      heartbeats: latencies.length,
      seconds: Math.round(seconds * 100) / 100,
      perSecond: Math.round(latencies.length / seconds),
      p50Ms: Math.round(percentile(latencies, 50) * 100) / 100,
      p99Ms: Math.round(percentile(latencies, 99) * 100) / 100,
      cpCpuMsPerHeartbeat: Math.round(perHb * 1000) / 1000,
      dbCpuMsPerHeartbeat: null,
      nodesPerCoreAt10Min: Math.round(600_000 / perHb),
      refused: 0,
    };
  } finally {
    const exited = new Promise((r) => server.once('exit', r));
    server.kill('SIGKILL');
    await exited;
  }
}

async function runArm(database: 'pglite' | 'postgres' | 'postgres-unix'): Promise<Arm> {
  const dataDir = mkdtempSync(join(tmpdir(), 'phantoma-cp-bench-'));
  const pg = database !== 'pglite' ? await startPostgres() : undefined;
  let cp: ChildProcess | undefined;
  try {
    createLeaseKey(dataDir, { kind: 'passphrase', secret: Buffer.from(PASS) }, { log2N: 10, r: 8, p: 1 });
    const config = join(dataDir, 'cp.json');
    writeFileSync(config, JSON.stringify({ dataDir, database: pg ? (database === 'postgres-unix' ? pg.socketUrl : pg.url) : 'pglite', host: '127.0.0.1', port: 0, metricsPort: 0, logLevel: 'warn', key: { kdfLog2N: 10, allowWeakKdf: true } }));
    cp = spawn(join(root, '.runtime', 'bin', 'node'), ['--disable-warning=ExperimentalWarning', ...(values['cpu-prof'] ? ['--cpu-prof', `--cpu-prof-dir=${values['cpu-prof']}`] : []), join(root, 'control-plane', 'src', 'main.ts'), 'serve', '--config', config, '--json'], {
      env: { ...process.env, PHANTOMA_CP_PASSPHRASE: PASS },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const started = await new Promise<{ url: string; fingerprint: string; admin: string }>((resolve, reject) => {
      let out = '';
      cp!.stdout!.on('data', (c: Buffer) => {
        out += c.toString();
        const nl = out.indexOf('\n');
        if (nl >= 0) resolve(JSON.parse(out.slice(0, nl)));
      });
      cp!.once('exit', (code) => reject(new Error(`phantoma-cp exited with ${code}`)));
    });

    // Enrol the simulated fleet (one identity key and one TLS client per node, as on real nodes).
    const nodeDir = mkdtempSync(join(tmpdir(), 'phantoma-cp-bench-nodes-'));
    const fleet: Array<{ name: string; enrolment: string; counter: number; signer: NodeSigner; client: ControlPlaneClient }> = [];
    for (let i = 0; i < NODES; i++) {
      const name = `node-${i}`;
      const { token } = await admin(started.admin, '/tokens', { node: name, ttlSeconds: 600 });
      const signer = signerFromPrivateKey(generateKeyPairSync('ed25519').privateKey);
      const state = await enrolNode({ url: started.url, pin: started.fingerprint, token, signer, stateDir: join(nodeDir, name), version: '0.1.0' });
      fleet.push({ name, enrolment: state.enrolment, counter: 0, signer, client: createControlPlaneClient({ url: started.url, pin: started.fingerprint }) });
    }
    rmSync(nodeDir, { recursive: true, force: true });
    const cpKey = Buffer.from(readFileSync(join(dataDir, 'lease-key.pub'), 'utf8').split('\n')[1]!, 'base64url');

    // Warm-up (JIT, connection pools), then the measured run.
    const beat = async (n: (typeof fleet)[number]): Promise<{ ms: number; ok: boolean }> => {
      const hb: HeartbeatBody = {
        v: 1,
        node: n.name,
        enrolment: n.enrolment,
        counter: ++n.counter,
        time: new Date().toISOString(),
        version: '0.1.0',
        counters: { requests: n.counter * 7, refusals: 0, wipes: n.counter * 7, wipeFailures: 0, egressDenials: 0 },
        pool: { workers: 2, busy: 1, ready: true },
      };
      const body = JSON.stringify({ heartbeat: hb, signature: (await n.signer.sign(canonicalBytes(hb))).toString('base64url') });
      const t0 = performance.now();
      const r = await n.client.post('/v1/heartbeat', body);
      const ms = performance.now() - t0;
      if (r.status !== 200) return { ms, ok: false };
      const lease = (JSON.parse(r.body) as { lease: SignedLease }).lease;
      return { ms, ok: lease.lease.counter === hb.counter && verifySignature(cpKey, DOMAIN.lease, lease.lease, lease.signature) };
    };
    const drive = async (total: number): Promise<{ latencies: number[]; refused: number }> => {
      const latencies: number[] = [];
      let refused = 0;
      let next = 0;
      await Promise.all(
        Array.from({ length: CONCURRENCY }, async (_, w) => {
          // Each worker owns a disjoint slice of nodes, so one node's heartbeats stay in order.
          const mine = fleet.filter((_, i) => i % CONCURRENCY === w);
          let k = 0;
          while (next < total) {
            next++;
            const r = await beat(mine[k++ % mine.length]!);
            latencies.push(r.ms);
            if (!r.ok) refused++;
          }
        }),
      );
      return { latencies, refused };
    };
    await drive(Math.min(500, HEARTBEATS));
    const cpBefore = cpuMsOf(cp.pid!);
    const dbBefore = pg ? treeCpuMs(pgPid(pg.port)) : 0;
    const t0 = performance.now();
    const { latencies, refused } = await drive(HEARTBEATS);
    const seconds = (performance.now() - t0) / 1000;
    const cpCpu = cpuMsOf(cp.pid!) - cpBefore;
    const dbCpu = pg ? treeCpuMs(pgPid(pg.port)) - dbBefore : null;
    latencies.sort((x, y) => x - y);
    const perHb = cpCpu / latencies.length;
    return {
      database,
      heartbeats: latencies.length,
      seconds: Math.round(seconds * 100) / 100,
      perSecond: Math.round(latencies.length / seconds),
      p50Ms: Math.round(percentile(latencies, 50) * 100) / 100,
      p99Ms: Math.round(percentile(latencies, 99) * 100) / 100,
      cpCpuMsPerHeartbeat: Math.round(perHb * 1000) / 1000,
      dbCpuMsPerHeartbeat: dbCpu === null ? null : Math.round((dbCpu / latencies.length) * 1000) / 1000,
      nodesPerCoreAt10Min: Math.round(600_000 / perHb),
      refused,
    };
  } finally {
    if (cp && cp.exitCode === null) {
      const exited = new Promise((r) => cp!.once('exit', r));
      cp.kill('SIGTERM');
      const timer = setTimeout(() => cp!.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    }
    await pg?.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
}

/** The postmaster: the process listening on the port (found by its pid file's first line would need the dir). */
function pgPid(port: number): number {
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const cmd = readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0');
      if (cmd[0]?.endsWith('/postgres') && cmd.includes(String(port))) return Number(p);
    } catch {
      /* gone */
    }
  }
  throw new Error('postgres process not found');
}

const arms: Arm[] = [];
for (const arm of values.arms!.split(',') as Array<'floor' | 'pglite' | 'postgres' | 'postgres-unix'>) arms.push(arm === 'floor' ? await runFloor() : await runArm(arm));
const report = { date: new Date().toISOString(), nodes: NODES, concurrency: CONCURRENCY, cores: (await import('node:os')).availableParallelism(), arms };
console.log('database      heartbeats  hb/s  p50 ms  p99 ms  CP CPU ms/hb  DB CPU ms/hb  nodes/core @10 min  refused');
for (const a of arms) {
  console.log(
    `${a.database.padEnd(13)} ${String(a.heartbeats).padStart(10)} ${String(a.perSecond).padStart(5)} ${a.p50Ms.toFixed(2).padStart(7)} ${a.p99Ms.toFixed(2).padStart(7)} ${a.cpCpuMsPerHeartbeat.toFixed(3).padStart(13)} ${(a.dbCpuMsPerHeartbeat === null ? (a.database === 'pglite' ? '(in CP)' : '-') : a.dbCpuMsPerHeartbeat.toFixed(3)).padStart(13)} ${String(a.nodesPerCoreAt10Min).padStart(19)} ${String(a.refused).padStart(8)}`,
  );
}
mkdirSync(join(root, 'bench', 'results'), { recursive: true });
writeFileSync(join(root, 'bench', 'results', 'control-plane.json'), JSON.stringify(report, null, 2) + '\n');
