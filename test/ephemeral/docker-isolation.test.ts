// From inside a worker container (issue 6): no connection succeeds to anything — the host's loopback, a
// host abstract unix socket, a listener in a network namespace this test creates — and no write succeeds
// outside its tmpfs. The probe runs in a container made by the backend's own workerContainerConfig (the
// exact settings of a worker), with the worker command replaced by the probe. Each refusal is shown next
// to a positive control: the same target reached from outside, the tmpfs written.
//
// Network rule: traffic only to loopback or to addresses inside the namespaces created here.
import t from 'tap';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { createServer, connect, type Server } from 'node:net';
import { PassThrough } from 'node:stream';
import { startTestDockerd, type TestDockerd } from './docker-rig.ts';
import { workerContainerConfig, type DockerBackendOptions } from '../../src/ephemeral/docker-backend.ts';
import { createLogger } from '../../src/logger.ts';
import { tinyModelPath } from '../helpers.ts';
import { rmSync, statSync } from 'node:fs';
import { buildAll, cleanupWardenLeftovers, startWarden, subscribe, tempDir } from '../egress/rig.ts';

const NS_SERVER = `phiso-${process.pid}-s`;
const NS_CLIENT = `phiso-${process.pid}-c`;
const NS_ADDR = '10.213.7.1';
const NS_PORT = 7777;
const ABSTRACT = `\0phantoma-iso-${process.pid}`;
const CGROUP_PARENT = `/phantoma-iso-${process.pid}/workers`;

let dockerd: TestDockerd;
let loopback: Server;
let abstract: Server;
let nsListener: ChildProcess | undefined;
let loopbackPort = 0;

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'], timeout: 10_000 });
}
function removeNamespaces(): void {
  for (const ns of [NS_SERVER, NS_CLIENT]) {
    try {
      ip('netns', 'delete', ns);
    } catch {
      /* not there */
    }
  }
}
process.once('exit', () => {
  nsListener?.kill('SIGKILL');
  removeNamespaces();
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Runs `node -e script` in `ns` (ip netns exec), returns its stdout; bounded. */
function inNamespace(ns: string, script: string, ms = 10_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawn('ip', ['netns', 'exec', ns, process.execPath, '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (c: Buffer) => (out += c.toString()));
    p.stderr.on('data', (c: Buffer) => (err += c.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), ms);
    p.on('close', (code) => {
      clearTimeout(timer);
      if (code === 0) resolve(out);
      else reject(new Error(`in ${ns}: exit ${code}: ${err.slice(0, 500)}`));
    });
  });
}

t.before(async () => {
  dockerd = await startTestDockerd();
  loopback = createServer((s) => s.end('host-loopback\n'));
  await new Promise<void>((r) => loopback.listen(0, '127.0.0.1', () => r()));
  loopbackPort = (loopback.address() as { port: number }).port;
  abstract = createServer((s) => s.end('host-abstract\n'));
  await new Promise<void>((r) => abstract.listen(ABSTRACT, () => r()));
  // Two namespaces of our own joined by a veth pair created inside them (never in the host namespace).
  removeNamespaces();
  ip('netns', 'add', NS_SERVER);
  ip('netns', 'add', NS_CLIENT);
  ip('-n', NS_SERVER, 'link', 'add', 'vs', 'type', 'veth', 'peer', 'name', 'vc', 'netns', NS_CLIENT);
  ip('-n', NS_SERVER, 'addr', 'add', `${NS_ADDR}/30`, 'dev', 'vs');
  ip('-n', NS_CLIENT, 'addr', 'add', '10.213.7.2/30', 'dev', 'vc');
  for (const [ns, dev] of [[NS_SERVER, 'vs'], [NS_CLIENT, 'vc']] as const) {
    ip('-n', ns, 'link', 'set', 'lo', 'up');
    ip('-n', ns, 'link', 'set', dev, 'up');
  }
  nsListener = spawn('ip', ['netns', 'exec', NS_SERVER, process.execPath, '-e', `require('net').createServer((s) => s.end('netns\\n')).listen(${NS_PORT}, '${NS_ADDR}', () => console.log('listening'))`], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the namespace listener did not start')), 10_000);
    nsListener!.stdout!.once('data', () => {
      clearTimeout(timer);
      resolve();
    });
  });
});

t.teardown(async () => {
  nsListener?.kill('SIGKILL');
  loopback?.close();
  abstract?.close();
  removeNamespaces();
  await dockerd?.stop();
});

/** Connects from this (host) process: the positive controls. */
function hostConnect(target: { port: number; host: string } | { path: string }): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(target as never);
    let got = '';
    s.setTimeout(3_000, () => s.destroy(new Error('timeout')));
    s.on('data', (c: Buffer) => (got += c.toString()));
    s.on('end', () => resolve(got.trim()));
    s.on('error', reject);
  });
}

// The probe: each attempt reports its error code (or "connected"/"wrote"); one JSON line on stdout.
const PROBE = `
const net = require('net'), fs = require('fs'), os = require('os');
const attempt = (target) => new Promise((resolve) => {
  const s = net.connect(target);
  s.setTimeout(2000, () => { s.destroy(); resolve('ETIMEDOUT'); });
  s.on('connect', () => { s.destroy(); resolve('connected'); });
  s.on('error', (e) => resolve(e.code));
});
const write = (p) => { try { fs.writeFileSync(p, 'x'); return 'wrote'; } catch (e) { return e.code; } };
(async () => {
  const out = { connect: {}, write: {}, interfaces: Object.keys(os.networkInterfaces()).sort() };
  out.connect.hostLoopback = await attempt({ host: '127.0.0.1', port: Number(process.env.P_LOOP) });
  out.connect.netnsListener = await attempt({ host: '${NS_ADDR}', port: ${NS_PORT} });
  out.connect.hostAbstract = await attempt({ path: '\\0' + process.env.P_ABSTRACT });
  out.connect.dockerSocket = await attempt({ path: '/var/run/docker.sock' });
  out.connect.testDockerSocket = await attempt({ path: process.env.P_DOCKER_SOCK });
  for (const p of ['/scratch/ok', '/opt/phantoma/x', '/x', '/tmp/x', '/etc/x', '/model/x', '/dev/x', '/dev/shm/x', '/proc/sys/kernel/hostname']) out.write[p] = write(p);
  out.status = fs.readFileSync('/proc/self/status', 'utf8').split('\\n').filter((l) => /^(Uid|CapEff|CapBnd|NoNewPrivs|Seccomp):/.test(l));
  out.core = fs.readFileSync('/proc/self/limits', 'utf8').split('\\n').find((l) => l.startsWith('Max core file size'));
  out.scratchMount = fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\\n').find((l) => l.split(' ')[4] === '/scratch');
  out.cwd = process.cwd();
  console.log(JSON.stringify(out));
})();
`;

interface ProbeResult {
  connect: Record<string, string>;
  write: Record<string, string>;
  interfaces: string[];
  status: string[];
  core: string;
  scratchMount: string;
  cwd: string;
}

async function runProbe(cgroupParent = CGROUP_PARENT): Promise<{ result: ProbeResult; containerId: string; removed: number }> {
  const opts: DockerBackendOptions = {
    docker: dockerd.docker,
    image: dockerd.image,
    cgroupParent,
    uidRange: { from: 61000, to: 61999 },
    memoryBytes: 512 << 20,
    pidsMax: 64,
    nanoCpus: 1e9,
    tmpfsBytes: 16 << 20,
    preloadThreadpool: false,
    logger: createLogger({ level: 'silent' }),
  };
  const spec = { modelName: 'tiny', modelPath: await tinyModelPath(), contextSize: 256, threads: 1, batchSize: 64, logLevel: 'silent' };
  const cfg = workerContainerConfig(opts, spec, `iso${process.pid}`, 61234);
  const worker = cfg.Cmd!;
  const c = await dockerd.docker.createContainer({
    ...cfg,
    // The worker's runtime, with the probe in place of the worker script.
    Cmd: [worker[0]!, '-e', PROBE],
    Env: [...cfg.Env!, `P_LOOP=${loopbackPort}`, `P_ABSTRACT=${ABSTRACT.slice(1)}`, `P_DOCKER_SOCK=${dockerd.socketPath}`],
    OpenStdin: false,
    AttachStdin: false,
    StdinOnce: false,
  });
  const stream = await c.attach({ stream: true, stdout: true, stderr: true });
  const out = new PassThrough();
  const err = new PassThrough();
  let text = '';
  let errText = '';
  out.on('data', (b: Buffer) => (text += b.toString()));
  err.on('data', (b: Buffer) => (errText += b.toString()));
  c.modem.demuxStream(stream, out, err);
  await c.start();
  const waited = (await Promise.race([c.wait(), sleep(30_000).then(() => ({ StatusCode: 'timeout' }))])) as { StatusCode: number | string };
  await sleep(50);
  await c.remove({ force: true });
  let removed = 0;
  try {
    await c.inspect();
    removed = 200;
  } catch (e) {
    removed = (e as { statusCode?: number }).statusCode ?? -1;
  }
  if (waited.StatusCode !== 0) throw new Error(`probe exited ${waited.StatusCode}: ${errText.slice(0, 1000)}`);
  return { result: JSON.parse(text.trim().split('\n').pop()!) as ProbeResult, containerId: c.id, removed };
}

t.test('positive controls: each target answers a connection from outside the container', async (t) => {
  t.equal(await hostConnect({ host: '127.0.0.1', port: loopbackPort }), 'host-loopback', 'host loopback listener reached from the host');
  t.equal(await hostConnect({ path: ABSTRACT }), 'host-abstract', 'host abstract unix socket reached from the host');
  const fromClientNs = await inNamespace(
    NS_CLIENT,
    `const s = require('net').connect(${NS_PORT}, '${NS_ADDR}'); let g = ''; s.on('data', (c) => g += c); s.on('end', () => console.log(g.trim())); s.setTimeout(3000, () => process.exit(3));`,
  );
  t.equal(fromClientNs.trim(), 'netns', "the namespace listener reached from the test's other namespace");
});

t.test('from inside a worker container: no connection succeeds, no write outside its tmpfs', async (t) => {
  const { result: r, removed } = await runProbe();
  t.same(r.interfaces, ['lo'], 'only the loopback interface');
  t.equal(r.connect.hostLoopback, 'ECONNREFUSED', "the host's loopback listener: refused (the container's lo is its own)");
  t.equal(r.connect.netnsListener, 'ENETUNREACH', "the test namespace's listener: no route");
  t.equal(r.connect.hostAbstract, 'ECONNREFUSED', "the host's abstract unix socket: not in the container's network namespace");
  t.equal(r.connect.dockerSocket, 'ENOENT', 'no Docker socket inside');
  t.equal(r.connect.testDockerSocket, 'ENOENT', "the test dockerd's socket is not inside either");
  t.equal(r.write['/scratch/ok'], 'wrote', 'positive control: the tmpfs is writable by the worker uid');
  t.match(r.scratchMount, / - tmpfs tmpfs rw,.*size=16384k.*uid=61234,gid=61234/, 'the scratch is a size-capped tmpfs owned by the worker uid');
  t.equal(r.cwd, '/scratch', 'the worker runs in its tmpfs');
  for (const p of ['/opt/phantoma/x', '/x', '/tmp/x', '/etc/x', '/model/x']) t.equal(r.write[p], 'EROFS', `write ${p}: EROFS (read-only root and model)`);
  t.equal(r.write['/dev/x'], 'EACCES', 'write /dev/x: EACCES (root-owned, and no capability)');
  t.equal(r.write['/dev/shm/x'], 'ENOENT', 'no /dev/shm (IpcMode none)');
  t.equal(r.write['/proc/sys/kernel/hostname'], 'EROFS', 'write /proc/sys: EROFS');
  t.ok(r.status.some((l) => /^Uid:\s+61234\s+61234\s+61234\s+61234$/.test(l)), 'runs as the worker uid (real, effective, saved, fs)');
  t.ok(r.status.includes('CapEff:\t0000000000000000'), 'no effective capability');
  t.ok(r.status.includes('CapBnd:\t0000000000000000'), 'empty bounding set');
  t.ok(r.status.includes('NoNewPrivs:\t1'), 'no_new_privs');
  t.ok(r.status.includes('Seccomp:\t2'), "Docker's default seccomp filter");
  t.match(r.core, /^Max core file size\s+0\s+0\s/, 'RLIMIT_CORE 0');
  t.equal(removed, 404, 'the container is gone after it ran (inspect: 404)');
});

t.test("under a warden's workers/ cgroup, the egress filter applies to a worker container too", async (t) => {
  // The warden (egress enforce) owns <name>/workers; a container whose CgroupParent is that directory is
  // judged by the same programs: its connect to its own loopback fails with EPERM in the connect hook,
  // before routing (ECONNREFUSED above, without the filter), and is reported as a deny event.
  const dir = tempDir('phantoma-docker-egress-');
  const name = `phantoma-dkeg-${process.pid}`;
  buildAll(dir);
  const w = await startWarden({ name, sockDir: dir });
  t.teardown(async () => {
    await w.stop();
    cleanupWardenLeftovers(name);
    rmSync(dir, { recursive: true, force: true });
  });
  const events = await subscribe(w.egress);
  t.teardown(() => events.stream.close());
  const { result: r } = await runProbe(`/${name}/workers`);
  t.equal(r.connect.hostLoopback, 'EPERM', 'the connect is refused by the egress filter (EPERM), not by an empty port');
  t.equal(r.connect.netnsListener, 'EPERM', "the test namespace's address: refused by the filter before routing");
  const deadline = Date.now() + 3000;
  while (events.events.filter((e) => e.set === 'workers' && e.port === loopbackPort).length === 0 && Date.now() < deadline) await sleep(20);
  const ev = events.events.find((e) => e.set === 'workers' && e.dst === '127.0.0.1' && e.port === loopbackPort);
  t.ok(ev, "a deny event of the workers/ set names the container's attempt");
  t.equal(ev?.hook, 'connect4');
  t.not(ev?.cgroupId, statSync(w.workersDir).ino, "its cgroup is the container's own, below workers/");
});
