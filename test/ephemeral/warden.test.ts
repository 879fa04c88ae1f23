// The warden on real processes, namespaces and cgroups: a real worker answers through the warden backend;
// a probe worker shows what it can and cannot do (each "cannot" next to a positive control that can);
// double-forked daemons, the memory limit, refusals, another uid, and a SIGKILLed warden.
import t from 'tap';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { ROOT, tinyModelPath } from '../helpers.ts';
import { createWardenClient, encodeRequest, type SpawnedWorker, type WardenClient } from '../../src/ephemeral/warden-client.ts';
import { createWardenBackend } from '../../src/ephemeral/warden-backend.ts';
import { createWorkerPool } from '../../src/ephemeral/pool.ts';
import { createLogger } from '../../src/logger.ts';
import type { WorkerBackend, WorkerHandle } from '../../src/ephemeral/backend.ts';
import { Writable } from 'node:stream';

const WARDEN = join(ROOT, 'native', 'warden', 'build', 'phantoma-warden');
const NODE = process.execPath;
const UIDS = { from: 61000, to: 61999 };
const RUN = `${process.pid}-${Date.now().toString(36)}`;

t.equal(process.getuid?.(), 0, 'the warden tests run as root (the warden must be root)');
const mk = spawnSync('make', ['-C', join(ROOT, 'native', 'warden')], { encoding: 'utf8' });
t.equal(mk.status, 0, `make -C native/warden: ${mk.stdout}${mk.stderr}`);

// Worker-visible fixtures live outside /tmp (a worker's /tmp is its own fresh tmpfs) and are readable by
// the worker uids; sockets live in a directory the warden hides from workers.
const fixDir = mkdtempSync('/var/tmp/phantoma-warden-test-');
chmodSync(fixDir, 0o755);
const sockDir = mkdtempSync(join(tmpdir(), 'phantoma-warden-sock-'));
t.teardown(() => {
  rmSync(fixDir, { recursive: true, force: true });
  rmSync(sockDir, { recursive: true, force: true });
});

// The probe: one plain JS worker with modes, so each check runs inside a real isolated worker.
const PROBE = join(fixDir, 'probe.mjs');
writeFileSync(
  PROBE,
  `
import { readFileSync, writeFileSync, readdirSync, openSync } from 'node:fs';
import { connect } from 'node:net';
import { spawnSync } from 'node:child_process';
const mode = process.argv[2];
const out = (o) => process.stdout.write(JSON.stringify(o) + '\\n');
const tryDo = (f) => { try { const v = f(); return { ok: true, v }; } catch (e) { return { ok: false, code: e.code ?? String(e) }; } };
if (mode === 'echo') {
  out({ pid: process.pid, uid: process.getuid() });
  process.stdin.on('data', (c) => process.stdout.write(c.toString().toUpperCase()));
  process.stdin.on('end', () => process.exit(0));
} else if (mode === 'daemon') {
  // Double fork: sh starts a sleeper in its own session and exits; the sleeper is orphaned.
  const r = spawnSync('/bin/sh', ['-c', 'setsid sleep 1000 >/dev/null 2>&1 </dev/null & echo $!'], { encoding: 'utf8' });
  out({ daemon: Number(r.stdout.trim()) });
  setInterval(() => {}, 1000);
} else if (mode === 'alloc') {
  const keep = [];
  out({ started: true });
  const step = () => { const b = Buffer.alloc(8 << 20, 1); keep.push(b); out({ mib: keep.length * 8 }); setImmediate(step); };
  step();
} else if (mode === 'checks') {
  const a = JSON.parse(process.argv[3]);
  const r = {};
  r.uid = process.getuid(); r.gid = process.getgid();
  r.status = readFileSync('/proc/self/status', 'utf8');
  r.cgroup = readFileSync('/proc/self/cgroup', 'utf8');
  r.writeEtc = tryDo(() => writeFileSync('/etc/phantoma-probe', 'x'));
  r.writeProject = tryDo(() => writeFileSync(a.projectFile, 'x'));
  r.writeVarTmp = tryDo(() => writeFileSync('/var/tmp/phantoma-probe', 'x'));
  r.writeTmp = tryDo(() => { writeFileSync('/tmp/probe-file', 'canary'); return readFileSync('/tmp/probe-file', 'utf8'); });
  r.writeShm = tryDo(() => { writeFileSync('/dev/shm/probe-file', 'canary'); return readFileSync('/dev/shm/probe-file', 'utf8'); });
  r.tmpList = readdirSync('/tmp');
  r.net = readdirSync('/sys/class/net');
  r.run = tryDo(() => readdirSync('/run'));
  r.root = tryDo(() => readdirSync('/root'));
  r.home = tryDo(() => readdirSync('/home'));
  r.sockDir = tryDo(() => readdirSync(a.sockDir));
  const procPids = readdirSync('/proc').filter((n) => /^\\d+$/.test(n));
  r.procOwn = procPids.includes(String(process.pid));
  r.procHasTest = procPids.includes(String(a.testPid));
  r.procHasOther = procPids.includes(String(a.otherPid));
  r.ownEnviron = tryDo(() => readFileSync('/proc/self/environ', 'utf8').split('\\0').filter(Boolean));
  r.testEnviron = tryDo(() => readFileSync('/proc/' + a.testPid + '/environ', 'utf8').length);
  r.testMem = tryDo(() => openSync('/proc/' + a.testPid + '/mem', 'r'));
  r.otherEnviron = tryDo(() => readFileSync('/proc/' + a.otherPid + '/environ', 'utf8').length);
  const py = (target) => spawnSync('/usr/bin/python3', ['-c', [
    'import ctypes, os, sys, time',
    'libc = ctypes.CDLL(None, use_errno=True)',
    'libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]',
    'target = int(sys.argv[1])',
    'child = 0',
    'if target == 0:',
    '    child = os.fork()',
    '    if child == 0:',
    '        time.sleep(5); os._exit(0)',
    '    target = child',
    'r = libc.ptrace(16, target, None, None)',  // PTRACE_ATTACH
    'print(r, ctypes.get_errno())',
    'if child: os.kill(child, 9)',
  ].join('\\n'), String(target)], { encoding: 'utf8' }).stdout.trim();
  r.ptraceOwnChild = py(0);
  r.ptraceTest = py(a.testPid);
  r.ptraceOther = py(a.otherPid);
  const c = connect(a.port, '127.0.0.1');
  c.on('connect', () => { r.tcp = 'connected'; c.destroy(); out(r); process.exit(0); });
  c.on('error', (e) => { r.tcp = e.code; out(r); process.exit(0); });
}
`,
);
chmodSync(PROBE, 0o644);

interface Warden {
  proc: ChildProcess;
  client: WardenClient;
  socketPath: string;
  name: string;
  log: string[];
  stop(): Promise<number | null>;
}

async function startWarden(o: { name?: string; exec?: string; script?: string; memoryMax?: number; extra?: string[] } = {}): Promise<Warden> {
  const name = o.name ?? `phantoma-test-${RUN}-${Math.random().toString(36).slice(2, 8)}`;
  const socketPath = join(sockDir, `${name}.sock`);
  const args = ['--exit-with-parent', '--socket', socketPath, '--client-uid', '0', '--cgroup-name', name, '--worker-exec', o.exec ?? NODE, '--worker-script', o.script ?? PROBE];
  // The checkout may sit under a path workers do not see (/tmp, /root): keep it visible, read-only.
  args.push('--expose', ROOT, '--uid-range', `${UIDS.from}-${UIDS.to}`, ...(o.memoryMax ? ['--memory-max', String(o.memoryMax)] : []), ...(o.extra ?? []));
  const proc = spawn(WARDEN, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const log: string[] = [];
  createInterface({ input: proc.stderr! }).on('line', (l) => log.push(l));
  const ready = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), 15_000);
    createInterface({ input: proc.stdout! }).on('line', (l) => {
      if (l === 'ready') {
        clearTimeout(timer);
        resolve(true);
      }
    });
    proc.once('exit', () => resolve(false));
  });
  if (!ready) throw new Error(`the warden did not get ready: ${log.join('\n')}`);
  const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
  return {
    proc,
    name,
    socketPath,
    log,
    client: createWardenClient({ socketPath }),
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
      return exited;
    },
  };
}

// The warden's cgroup dirs for a worker id, in every hierarchy it uses (v2; v1 memory/pids here).
function cgroupDirs(name: string, id = ''): [v2: string, memory: string, pids: string] {
  const own = new Map<string, string>();
  for (const line of readFileSync('/proc/self/cgroup', 'utf8').trim().split('\n')) {
    const [h, ctrls, path] = line.split(':') as [string, string, string];
    own.set(h === '0' ? 'v2' : ctrls, path === '/' ? '' : path);
  }
  const dirs = new Map<string, string>();
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').trim().split('\n')) {
    const f = line.split(' ');
    const sep = f.indexOf('-');
    const fstype = f[sep + 1]!;
    const sup = (f[sep + 3] ?? '').split(',');
    const mp = f[4]!;
    const key = fstype === 'cgroup2' ? 'v2' : fstype === 'cgroup' && sup.includes('memory') ? 'memory' : fstype === 'cgroup' && sup.includes('pids') ? 'pids' : undefined;
    if (key && !dirs.has(key)) dirs.set(key, join(mp, own.get(key) ?? '', name, 'workers', id));
  }
  return [dirs.get('v2')!, dirs.get('memory')!, dirs.get('pids')!];
}

function alive(pid: number): boolean {
  // A zombie is dead (it holds no memory); only init may be slow to reap orphans of a killed warden.
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\d+ \(.*\) Z/.test(stat);
  } catch {
    return false;
  }
}

async function until(cond: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return cond();
}

let idn = 0;
const newId = () => (BigInt(process.pid) * 1_000_000n + BigInt(++idn)).toString(16).padStart(16, '0').slice(-16);

/** Reads JSON lines from a spawned worker's stdout. */
function lines(w: SpawnedWorker): { next(ms?: number): Promise<any>; all: any[] } {
  const all: any[] = [];
  const waiters: Array<(v: any) => void> = [];
  let buf = w.head.toString('utf8');
  const feed = (): void => {
    for (let nl = buf.indexOf('\n'); nl !== -1; nl = buf.indexOf('\n')) {
      const l = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      let v: unknown = l;
      try {
        v = JSON.parse(l);
      } catch {
        /* raw */
      }
      all.push(v);
      waiters.shift()?.(v);
    }
  };
  w.stdio.on('data', (c: Buffer) => {
    buf += c.toString('utf8');
    feed();
  });
  // The client hands the connection over paused, with what arrived along with the header in `head`.
  feed();
  w.stdio.resume();
  let read = 0;
  return {
    all,
    next(ms = 10_000) {
      const i = read++;
      if (i < all.length) return Promise.resolve(all[i]);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('no line from the worker in time')), ms);
        waiters.push((v) => {
          clearTimeout(timer);
          resolve(v);
        });
      });
    },
  };
}

const probeArgs = (...a: string[]) => [PROBE, ...a];

t.test('the warden isolates, ends and verifies probe workers', async (t) => {
  const w = await startWarden({ memoryMax: 160 << 20 });
  const status = await w.client.ping();
  t.equal(status.workers, 0);
  t.equal(status.pids, 'v1', 'pids limit from the v1 controller on this hybrid host');
  t.equal(status.memory, 'v1', 'memory limit from the v1 controller on this hybrid host');
  t.equal(status.cgroup, cgroupDirs(w.name)[0], 'the v2 subtree is where the test expects it');

  t.test('echo worker: stdio is the connection, END verifies, cgroups and process are gone', async (t) => {
    const id = newId();
    const sp = await w.client.spawn({ id, uid: UIDS.from + 1, gid: UIDS.from + 1, exec: NODE, args: probeArgs('echo') });
    const rd = lines(sp);
    const hello = await rd.next();
    t.equal(hello.pid, sp.pid, 'the pid in the reply is the worker');
    t.equal(hello.uid, UIDS.from + 1);
    for (const d of cgroupDirs(w.name, id)) t.ok(existsSync(d), `positive control: ${d} exists while the worker runs`);
    sp.stdio.write('abc\n');
    t.equal(await rd.next(), 'ABC', 'stdin reaches the worker, stdout comes back');
    const end = await w.client.end(id);
    t.equal(end.verified, true);
    t.ok(end.ms >= 0 && end.ms < 2000, `ended and verified in ${end.ms} ms`);
    t.equal(end.exit.signal, 9, 'killed by END');
    for (const d of cgroupDirs(w.name, id)) t.notOk(existsSync(d), `${d} removed`);
    t.notOk(alive(sp.pid), 'the worker process is gone');
    t.equal((await w.client.ping()).workers, 0);
    const again = await w.client.raw(['END', id]);
    t.match(again, /^ERR unknown_worker /, 'a second END: unknown_worker');
  });

  t.test('inside a worker: read-only host, private tmpfs, no capabilities, own netns, no access to others', async (t) => {
    // Positive controls from the host namespace: the listener answers; /proc of the test is readable by root.
    const server = createServer((s) => s.end());
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as { port: number }).port;
    const hostConnect = await new Promise<string>((r) => connect(port, '127.0.0.1').on('connect', function (this: any) { this.destroy(); r('connected'); }).on('error', (e: any) => r(e.code)));
    t.equal(hostConnect, 'connected', 'positive control: the listener accepts connections from the host namespace');
    // Another live worker as a ptrace/proc target.
    const otherId = newId();
    const other = await w.client.spawn({ id: otherId, uid: UIDS.from + 2, gid: UIDS.from + 2, exec: NODE, args: probeArgs('echo') });
    await lines(other).next();

    const id = newId();
    const uid = UIDS.from + 3;
    const projectFile = join(ROOT, 'README.md');
    const sp = await w.client.spawn({
      id,
      uid,
      gid: uid,
      exec: NODE,
      args: probeArgs('checks', JSON.stringify({ testPid: process.pid, otherPid: other.pid, port, projectFile, sockDir })),
    });
    const r = await lines(sp).next(20_000);
    server.close();
    t.equal(r.uid, uid, 'runs as the requested uid');
    t.ok(r.uid >= UIDS.from && r.uid <= UIDS.to && r.gid === uid, 'uid and gid inside the range');
    t.match(r.status, /\nCapEff:\s+0000000000000000\n/, 'no effective capabilities');
    t.match(r.status, /\nCapPrm:\s+0000000000000000\n/, 'no permitted capabilities');
    t.match(r.status, /\nCapBnd:\s+0000000000000000\n/, 'empty bounding set');
    t.match(r.status, /\nCapAmb:\s+0000000000000000\n/, 'no ambient capabilities');
    t.match(r.status, /\nNoNewPrivs:\s+1\n/, 'no_new_privs');
    t.match(r.cgroup, new RegExp(`^0::.*/${w.name}/workers/${id}$`, 'm'), 'in its own v2 cgroup');
    t.match(r.cgroup, new RegExp(`:memory:.*/${w.name}/workers/${id}$`, 'm'), 'in its own v1 memory cgroup');
    t.match(r.cgroup, new RegExp(`:pids:.*/${w.name}/workers/${id}$`, 'm'), 'in its own v1 pids cgroup');
    t.same(r.writeTmp, { ok: true, v: 'canary' }, 'positive control: it can write and read back in /tmp');
    t.same(r.writeShm, { ok: true, v: 'canary' }, 'and in /dev/shm');
    t.ok(r.tmpList.includes('probe-file'), 'positive control: the listing sees the file it wrote');
    t.same(r.writeEtc, { ok: false, code: 'EROFS' }, 'writing /etc fails: read-only');
    t.same(r.writeProject, { ok: false, code: 'EROFS' }, 'writing the project fails: read-only');
    t.same(r.writeVarTmp, { ok: false, code: 'EROFS' }, 'writing /var/tmp fails: read-only');
    t.notOk(existsSync('/tmp/probe-file'), "the worker's /tmp is not the host's");
    t.same(r.net, ['lo'], 'only lo in its network namespace');
    t.same(r.run, { ok: true, v: [] }, '/run is hidden (empty)');
    t.same(r.root, { ok: true, v: [] }, '/root is hidden (empty)');
    t.same(r.home, { ok: true, v: [] }, '/home is hidden (empty)');
    t.ok(!r.sockDir.ok || r.sockDir.v.length === 0, 'the warden socket directory is not visible');
    t.ok(r.ownEnviron.ok, 'positive control: it can read its own /proc/self/environ');
    t.same(r.ownEnviron.v.sort(), ['HOME=/tmp', 'LANG=C.UTF-8', 'NODE_LLAMA_CPP_SKIP_DOWNLOAD=true', 'PATH=/usr/bin:/bin', 'TMPDIR=/tmp'], 'a fixed, minimal environment');
    // Its /proc is mounted hidepid=invisible: other uids' processes do not exist for it at all.
    t.ok(r.procOwn, 'positive control: its own pid is listed in /proc');
    t.same([r.procHasTest, r.procHasOther], [false, false], 'the test process and the other worker are not listed');
    t.same(r.testEnviron, { ok: false, code: 'ENOENT' }, "reading the test process's environ fails");
    t.same(r.testMem, { ok: false, code: 'ENOENT' }, "opening the test process's mem fails");
    t.same(r.otherEnviron, { ok: false, code: 'ENOENT' }, "reading another worker's environ fails");
    t.equal(r.ptraceOwnChild, '0 0', 'positive control: ptrace attach works on its own child');
    t.match(r.ptraceTest, /^-1 (1|3)$/, 'ptrace attach to the test process fails (EPERM/ESRCH)');
    t.match(r.ptraceOther, /^-1 (1|3)$/, 'ptrace attach to another worker fails (EPERM/ESRCH)');
    t.equal(r.tcp, 'ECONNREFUSED', 'a TCP connect to the host listener on 127.0.0.1 fails (own netns)');
    t.equal((await w.client.end(id)).verified, true);
    t.equal((await w.client.end(otherId)).verified, true);
  });

  t.test('a double-forked daemon is gone after END', async (t) => {
    const id = newId();
    const sp = await w.client.spawn({ id, uid: UIDS.from + 4, gid: UIDS.from + 4, exec: NODE, args: probeArgs('daemon') });
    const { daemon } = await lines(sp).next();
    t.ok(daemon > 1, `daemon pid ${daemon}`);
    t.ok(alive(daemon), 'positive control: the daemon runs while the worker does');
    t.notSame(readFileSync(`/proc/${daemon}/stat`, 'utf8').split(' ')[3], String(sp.pid), 'it is not the worker child any more (double fork)');
    t.match(readFileSync(`/proc/${daemon}/cgroup`, 'utf8'), new RegExp(`/workers/${id}$`, 'm'), 'but it is still in the worker cgroup');
    const end = await w.client.end(id);
    t.equal(end.verified, true);
    t.notOk(alive(daemon), 'the daemon is gone');
    t.notOk(existsSync(`/proc/${daemon}`), 'reaped, not even a zombie (the warden is a subreaper)');
    for (const d of cgroupDirs(w.name, id)) t.notOk(existsSync(d), `${d} removed`);
  });

  t.test('exceeding the memory limit kills the worker (v1 memory cgroup OOM)', async (t) => {
    const id = newId();
    const sp = await w.client.spawn({ id, uid: UIDS.from + 5, gid: UIDS.from + 5, exec: NODE, args: probeArgs('alloc') });
    const rd = lines(sp);
    t.same(await rd.next(), { started: true });
    // EOF: the OOM killer ended the worker, the warden reaped it and killed the rest of its cgroup.
    await new Promise<void>((r) => sp.stdio.once('end', () => r()));
    const mibs = rd.all.filter((l) => typeof l?.mib === 'number').map((l) => l.mib as number);
    t.ok(mibs.length > 2, `positive control: it allocated (${Math.max(...mibs)} MiB reported)`);
    t.ok(Math.max(...mibs) < 160, 'and was stopped below the 160 MiB limit');
    const memDir = cgroupDirs(w.name, id).find((d) => d.includes('/memory/'))!;
    t.match(readFileSync(join(memDir, 'memory.oom_control'), 'utf8'), /oom_kill [1-9]/, 'the cgroup OOM killer fired');
    const end = await w.client.end(id);
    t.equal(end.verified, true);
    t.equal(end.exit.signal, 9, 'the worker died of SIGKILL');
    t.notOk(alive(sp.pid));
  });

  t.test('refusals carry stable codes and the warden keeps serving', async (t) => {
    const spawnFields = (o: Partial<Record<'id' | 'uid' | 'gid' | 'nice' | 'exec' | 'script', string>> = {}) => [
      'SPAWN',
      o.id ?? newId(),
      o.uid ?? String(UIDS.from),
      o.gid ?? String(UIDS.from),
      o.nice ?? '0',
      o.exec ?? NODE,
      o.script ?? PROBE,
      'echo',
    ];
    const cases: Array<[string, string[] | Buffer, string]> = [
      ['wrong exec path', spawnFields({ exec: '/bin/sh' }), 'exec_not_allowed'],
      ['exec path with a suffix', spawnFields({ exec: NODE + '/../node' }), 'exec_not_allowed'],
      ['argv[1] not the worker script', spawnFields({ script: '/bin/true' }), 'script_not_allowed'],
      ['uid below the range', spawnFields({ uid: String(UIDS.from - 1) }), 'uid_out_of_range'],
      ['uid 0', spawnFields({ uid: '0' }), 'uid_out_of_range'],
      ['gid outside the range', spawnFields({ gid: '0' }), 'uid_out_of_range'],
      ['uid not a number', spawnFields({ uid: '61000x' }), 'bad_request'],
      ['negative nice', spawnFields({ nice: '-5' }), 'bad_request'],
      ['path traversal id', spawnFields({ id: '../x' }), 'cgroup_not_allowed'],
      ['id escaping workers/', spawnFields({ id: '../../../../etc' }), 'cgroup_not_allowed'],
      ['uppercase id', spawnFields({ id: 'ABCDEF0123456789' }), 'cgroup_not_allowed'],
      ['END with a traversal id', ['END', '../../x'], 'cgroup_not_allowed'],
      ['END of an unknown worker', ['END', 'ffffffffffffffff'], 'unknown_worker'],
      ['unknown request', ['EXEC', '/bin/sh'], 'bad_request'],
      ['too few fields', ['SPAWN', newId()], 'bad_request'],
      ['bytes after the end', Buffer.from('PING\0\0garbage'), 'bad_request'],
      ['empty first field', Buffer.from('\0\0'), 'bad_request'],
      ['oversize message', Buffer.concat([Buffer.from('SPAWN\0'), Buffer.alloc(70 * 1024, 'a'), Buffer.from('\0\0')]), 'too_large'],
    ];
    for (const [what, req, code] of cases) {
      const payload = Buffer.isBuffer(req) ? req : encodeRequest(req);
      const line = await rawExchange(w.socketPath, payload);
      t.match(line, new RegExp(`^ERR ${code} `), `${what}: ${code}`);
      t.match(await w.client.raw(['PING']), /^OK pong /, `  and the warden still answers PING`);
    }
    t.equal((await w.client.ping()).workers, 0, 'nothing was spawned by any refused request');
    t.same(cgroupDirs(w.name).map((d) => spawnSync('ls', [d]).stdout.toString().split('\n').filter((f) => /^[0-9a-f]{16}$/.test(f))), [[], [], []], 'no worker cgroup was created');
  });

  t.test('a client with another uid is refused', async (t) => {
    // The warden answers a peer it refuses at once, without reading; an accepted peer gets PING'd after
    // 300 ms of silence (so the refusal is never turned into EPIPE by our own write).
    const script = `const s=require('net').connect(process.argv[1]);s.on('error',e=>console.log('ERROR '+e.code));s.on('data',d=>process.stdout.write(d));s.on('connect',()=>setTimeout(()=>{if(!s.destroyed&&s.bytesRead===0)s.end(Buffer.from('PING\\0\\0'))},300));`;
    const run = (asUser: boolean) =>
      spawnSync(asUser ? 'setpriv' : NODE, [...(asUser ? ['--reuid=65534', '--regid=65534', '--clear-groups', NODE] : []), '-e', script, w.socketPath], { encoding: 'utf8', timeout: 10_000 }).stdout.trim();
    t.match(run(false), /^OK pong /, 'positive control: the same client as the configured uid (0) is served');
    chmodSync(sockDir, 0o755);
    t.equal(run(true), 'ERROR EACCES', 'uid 65534 cannot even connect: the socket is 0600 and owned by the client uid');
    // Open the file permissions to show the warden's own SO_PEERCRED check.
    chmodSync(w.socketPath, 0o666);
    t.match(run(true), /^ERR not_authorized /, 'with the socket opened up, SO_PEERCRED refuses uid 65534');
    chmodSync(w.socketPath, 0o600);
    chmodSync(sockDir, 0o700);
    t.match(await w.client.raw(['PING']), /^OK pong /, 'and the warden keeps serving');
  });

  t.test('spawn and end latency (measured, reported; bounded generously on a shared 2-core host)', async (t) => {
    const spawnMs: number[] = [];
    const endMs: number[] = [];
    for (let i = 0; i < 10; i++) {
      const id = newId();
      const t0 = performance.now();
      const sp = await w.client.spawn({ id, uid: UIDS.from + 10 + i, gid: UIDS.from + 10 + i, exec: NODE, args: probeArgs('echo') });
      spawnMs.push(performance.now() - t0);
      await lines(sp).next();
      const end = await w.client.end(id);
      t.equal(end.verified, true);
      endMs.push(end.ms);
    }
    const pct = (a: number[], p: number) => [...a].sort((x, y) => x - y)[Math.min(a.length - 1, Math.floor((p / 100) * a.length))]!.toFixed(2);
    t.comment(`SPAWN (until OK <pid>): p50 ${pct(spawnMs, 50)} ms, p95 ${pct(spawnMs, 95)} ms`);
    t.comment(`END + verify (warden-measured): p50 ${pct(endMs, 50)} ms, p95 ${pct(endMs, 95)} ms`);
    t.ok(Math.max(...endMs) < 2000, 'every END verified within its 2 s bound');
  });

  t.test('a worker that exits by itself takes its daemon with it, before any END', async (t) => {
    const id = newId();
    const sp = await w.client.spawn({ id, uid: UIDS.from + 8, gid: UIDS.from + 8, exec: NODE, args: probeArgs('daemon') });
    const { daemon } = await lines(sp).next();
    t.ok(alive(daemon), 'positive control: the daemon runs');
    process.kill(sp.pid, 'SIGTERM');
    t.ok(await until(() => !alive(daemon), 2000), 'the daemon died when the worker exited');
    const end = await w.client.end(id);
    t.same([end.verified, end.exit.signal], [true, 15], 'END verifies and reports the exit signal');
  });

  t.test('SIGTERM ends every live worker and removes the subtree', async (t) => {
    const id = newId();
    const sp = await w.client.spawn({ id, uid: UIDS.from + 6, gid: UIDS.from + 6, exec: NODE, args: probeArgs('daemon') });
    const { daemon } = await lines(sp).next();
    t.ok(alive(sp.pid) && alive(daemon), 'positive control: worker and daemon run');
    t.equal(await w.stop(), 0, 'the warden exits 0');
    t.notOk(alive(sp.pid), 'the worker is gone');
    t.notOk(alive(daemon), 'its daemon is gone');
    for (const d of cgroupDirs(w.name)) t.notOk(existsSync(d), `${d} removed`);
    t.notOk(existsSync(w.socketPath), 'the socket is removed');
  });
});

function rawExchange(path: string, payload: Buffer): Promise<string> {
  return new Promise((resolve) => {
    const s = connect(path);
    let buf = '';
    s.on('data', (d) => (buf += d.toString()));
    s.on('error', () => undefined);
    s.on('close', () => resolve(buf.split('\n')[0] ?? ''));
    s.write(payload);
  });
}

t.test('a SIGKILLed warden: the next start kills and removes leftover workers before ready', async (t) => {
  const first = await startWarden();
  const id = newId();
  const sp = await first.client.spawn({ id, uid: UIDS.from + 7, gid: UIDS.from + 7, exec: NODE, args: probeArgs('daemon') });
  const { daemon } = await lines(sp).next();
  first.proc.kill('SIGKILL');
  await first.stop();
  t.ok(alive(sp.pid) && alive(daemon), 'positive control: the worker and its daemon survive the warden');
  for (const d of cgroupDirs(first.name, id)) t.ok(existsSync(d), `positive control: leftover ${d}`);
  const second = await startWarden({ name: first.name });
  // 'ready' was printed only after the clean-up: check right away.
  t.notOk(alive(sp.pid), 'the leftover worker was killed before ready');
  t.notOk(alive(daemon), 'and its daemon');
  for (const d of cgroupDirs(first.name, id)) t.notOk(existsSync(d), `${d} removed before ready`);
  t.match(second.log.join('\n'), /removing leftover worker cgroup/);
  t.equal(await second.stop(), 0);
  for (const d of cgroupDirs(first.name)) t.notOk(existsSync(d), `${d} removed at stop`);
});

t.test('a real Phantoma worker answers a job through the warden backend and pool', async (t) => {
  const modelPath = await tinyModelPath();
  const script = join(ROOT, 'src', 'ephemeral', 'worker-main.ts');
  const w = await startWarden({ script, memoryMax: 1 << 30 });
  t.teardown(() => w.stop());
  const logs: string[] = [];
  const logger = createLogger({ level: 'debug', destination: new Writable({ write: (c, _e, cb) => (logs.push(c.toString()), cb()) }) });
  const backend = createWardenBackend({ client: w.client, workerExec: NODE, workerScript: script, uidRange: UIDS, logger });
  const handles: WorkerHandle[] = [];
  const recording: WorkerBackend = {
    name: backend.name,
    spawn(spec, opts) {
      const h = backend.spawn(spec, opts);
      handles.push(h);
      return h;
    },
  };
  const spec = { modelName: 'tiny', modelPath, contextSize: 512, threads: 1, batchSize: 128, logLevel: 'warn' };
  const pool = createWorkerPool({ backend: recording, spec, size: 1, maxActive: 1, maxQueue: 2, logger });
  pool.start();
  const lease = await pool.acquire();
  const first = handles[0]!;
  t.equal(lease.workerId, first.id);
  t.ok(lease.pid && alive(lease.pid), `the worker runs (pid ${lease.pid})`);
  t.match(readFileSync(`/proc/${lease.pid}/status`, 'utf8'), new RegExp(`\\nUid:\\s+(6\\d{4})\\s`), 'as a worker uid');
  for (const d of cgroupDirs(w.name, first.id)) t.ok(existsSync(d), `positive control: ${d} exists while it runs`);
  let text = '';
  const result = await lease.run(
    { type: 'job', kind: 'chat', requestId: 'r1', messages: [{ role: 'user', content: 'hello' }], params: { maxTokens: 8, seed: 1, temperature: 0 } },
    { onChunk: (c) => (text += c), timeoutMs: 60_000 },
  );
  t.ok(result.usage.completionTokens > 0, `answered ${result.usage.completionTokens} tokens`);
  t.ok(text.length > 0, 'streamed text');
  const end = await first.endResult!;
  t.equal(end.verified, true, `END verified in ${end.ms} ms`);
  t.ok(end.ms !== null && end.ms < 2000);
  for (const d of cgroupDirs(w.name, first.id)) t.notOk(existsSync(d), `${d} removed`);
  t.notOk(alive(lease.pid!), 'the worker process is gone');
  const exit = await first.exited;
  t.ok(exit.code !== null || exit.signal !== null, `exit reported (${JSON.stringify(exit)})`);
  // The pool refills through the warden, and close() ends the warm worker with a verified end.
  const second = await pool.acquire();
  await second.release();
  t.equal((await handles[1]!.endResult!).verified, true, 'release(): verified end');
  await pool.close();
  for (const h of handles) t.equal((await h.endResult!).verified, true, `worker ${h.id}: verified end`);
  t.equal(backend.uidsInUse(), 0, 'every worker uid was returned');
  t.equal((await w.client.ping()).workers, 0, 'the warden holds no worker');
  t.same(cgroupDirs(w.name).map((d) => spawnSync('ls', [d]).stdout.toString().split('\n').filter((f) => /^[0-9a-f]{16}$/.test(f))), [[], [], []], 'no worker cgroup left');
});
