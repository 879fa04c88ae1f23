// The native addon on real processes and sockets. Dumpable and no_new_privs are one-way-ish process state,
// so they are changed only in child processes (the runner stays as it was). Each observation through the
// addon is checked against an independent kernel view: /proc/self ownership for dumpable, the NoNewPrivs
// line of /proc/self/status, and a child process as the peer so "peer" cannot silently mean "self".
import t from 'tap';
import { spawn, execFileSync } from 'node:child_process';
import { chmodSync, closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { ROOT } from '../helpers.ts';
import {
  ADDON_PATH,
  getNoNewPrivs,
  isDumpable,
  peerCredentials,
  peerPidfd,
  socketFd,
  socketPeerCredentials,
  type NativeSystemError,
} from '../../src/native/addon.ts';

const ADDON_MODULE = pathToFileURL(join(ROOT, 'src', 'native', 'addon.ts')).href;
const NOBODY = 65534;
const isRoot = process.getuid!() === 0;
// Children run unprivileged: as root, as nobody; otherwise as ourselves. Either way not uid 0, so a
// non-dumpable child's /proc/self turns root-owned — a kernel-side witness independent of PR_GET_DUMPABLE.
const childIds = isRoot ? { uid: NOBODY, gid: NOBODY } : {};

const tmp = mkdtempSync(join(tmpdir(), 'phantoma-addon-'));
chmodSync(tmp, 0o711);
t.teardown(() => rmSync(tmp, { recursive: true, force: true }));

interface ChildResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function runChild(source: string, opts: { onSpawn?: (pid: number) => void; timeoutMs?: number } = {}): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--input-type=module', '-e', source], { ...childIds, cwd: tmp, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 30_000);
    child.on('spawn', () => opts.onSpawn?.(child.pid!));
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

function listen(path: string): Promise<{ server: Server; accepted: Promise<Socket> }> {
  return new Promise((resolve, reject) => {
    let onConn: (s: Socket) => void = () => {};
    const accepted = new Promise<Socket>((r) => (onConn = r));
    const server = createServer((s) => onConn(s));
    server.once('error', reject);
    server.listen(path, () => {
      chmodSync(path, 0o777);
      resolve({ server, accepted });
    });
  });
}

function connectTo(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect(path, () => resolve(s));
    s.once('error', reject);
  });
}

/** Runs fn and returns what it threw (undefined if nothing), so the caller asserts on it. */
function thrown(fn: () => unknown): NativeSystemError | undefined {
  try {
    fn();
    return undefined;
  } catch (err) {
    return err as NativeSystemError;
  }
}

t.test('the addon is built and exports every function', async (t) => {
  t.ok(readFileSync(ADDON_PATH).length > 0, `${ADDON_PATH} exists`);
  t.type(isDumpable(), 'boolean');
  t.type(getNoNewPrivs(), 'boolean');
  t.equal(getNoNewPrivs(), false, 'the test runner has no_new_privs unset (so the child test below shows a change)');
});

t.test('setDumpable(false) makes a child non-dumpable, seen by prctl and by /proc ownership; true restores it', async (t) => {
  const src = `
    import { statSync } from 'node:fs';
    import { isDumpable, setDumpable } from ${JSON.stringify(ADDON_MODULE)};
    const owner = () => statSync('/proc/self/status').uid;
    const out = { uid: process.getuid(), before: isDumpable(), ownerBefore: owner() };
    setDumpable(false);
    Object.assign(out, { after: isDumpable(), ownerAfter: owner() });
    setDumpable(true);
    Object.assign(out, { restored: isDumpable(), ownerRestored: owner() });
    console.log(JSON.stringify(out));`;
  const r = await runChild(src);
  t.equal(r.code, 0, r.stderr);
  const out = JSON.parse(r.stdout) as Record<string, number | boolean>;
  t.not(out.uid, 0, 'the child is unprivileged, so /proc ownership is a meaningful witness');
  t.equal(out.before, true, 'dumpable at start (positive control)');
  t.equal(out.ownerBefore, out.uid, '/proc/self is owned by the child while dumpable (positive control)');
  t.equal(out.after, false, 'PR_GET_DUMPABLE reports 0 after setDumpable(false)');
  t.equal(out.ownerAfter, 0, 'the kernel hands /proc/self to root once non-dumpable');
  t.equal(out.restored, true);
  t.equal(out.ownerRestored, out.uid);
  t.equal(isDumpable(), true, 'the test runner itself was not touched');
});

t.test('setNoNewPrivs sets the flag, and /proc/self/status agrees', async (t) => {
  const src = `
    import { readFileSync } from 'node:fs';
    import { getNoNewPrivs, setNoNewPrivs } from ${JSON.stringify(ADDON_MODULE)};
    const status = () => /^NoNewPrivs:\\s*(\\d)/m.exec(readFileSync('/proc/self/status', 'utf8'))[1];
    const out = { before: getNoNewPrivs(), statusBefore: status() };
    setNoNewPrivs();
    Object.assign(out, { after: getNoNewPrivs(), statusAfter: status() });
    console.log(JSON.stringify(out));`;
  const r = await runChild(src);
  t.equal(r.code, 0, r.stderr);
  t.same(JSON.parse(r.stdout), { before: false, statusBefore: '0', after: true, statusAfter: '1' });
  t.equal(getNoNewPrivs(), false, 'the test runner itself was not touched');
});

t.test('peerCredentials on a unix socket within one process names this process', async (t) => {
  const path = join(tmp, 'self.sock');
  const { server, accepted } = await listen(path);
  const client = await connectTo(path);
  const serverSide = await accepted;
  t.teardown(() => {
    client.destroy();
    serverSide.destroy();
    server.close();
  });
  const expected = { pid: process.pid, uid: process.getuid!(), gid: process.getgid!() };
  t.ok(socketFd(serverSide) > 2, 'net.Socket on a unix path exposes its fd through _handle.fd');
  t.same(peerCredentials(socketFd(serverSide)), expected, 'server side sees the connecting process');
  t.same(socketPeerCredentials(client), expected, 'client side sees the listening process');
});

t.test('peerCredentials names a child that connects, not this process (and peerPidfd refers to it)', async (t) => {
  const path = join(tmp, 'child.sock');
  const { server, accepted } = await listen(path);
  t.teardown(() => server.close());
  // The child connects, then waits for the server to hang up.
  const src = `
    import { connect } from 'node:net';
    const s = connect(${JSON.stringify(path)}, () => console.log('connected'));
    s.on('data', () => {}); s.on('close', () => process.exit(0));`;
  let childPid = 0;
  const done = runChild(src, { onSpawn: (pid) => (childPid = pid) });
  const serverSide = await accepted;
  try {
    t.ok(childPid > 0);
    const cred = socketPeerCredentials(serverSide);
    t.equal(cred.pid, childPid, 'the peer pid is the child');
    t.not(cred.pid, process.pid, 'and not this process');
    t.equal(cred.uid, isRoot ? NOBODY : process.getuid!(), 'the peer uid is the child\'s');
    t.equal(cred.gid, isRoot ? NOBODY : process.getgid!(), 'the peer gid is the child\'s');
    if (isRoot) t.not(cred.uid, process.getuid!(), 'uid differs from ours, so it is really read from the peer');

    const pidfd = peerPidfd(socketFd(serverSide));
    try {
      const fdinfo = readFileSync(`/proc/self/fdinfo/${pidfd}`, 'utf8');
      t.equal(Number(/^Pid:\s*(-?\d+)/m.exec(fdinfo)?.[1]), childPid, 'the pidfd refers to the child');
    } finally {
      closeSync(pidfd);
    }
  } finally {
    serverSide.end();
  }
  const r = await done;
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stdout.trim(), 'connected');
});

t.test('failures throw errors with errno codes', async (t) => {
  const file = join(tmp, 'plain-file');
  execFileSync('touch', [file]);
  const fd = openSync(file, 'r');
  t.teardown(() => closeSync(fd));
  t.match(thrown(() => peerCredentials(fd)), { code: 'ENOTSOCK', errno: Number, syscall: /getsockopt/ }, 'a regular file');
  t.match(thrown(() => peerCredentials(1 << 30)), { code: 'EBADF', errno: Number, syscall: /getsockopt/ }, 'a closed descriptor');
  t.match(thrown(() => peerPidfd(fd)), { code: 'ENOTSOCK', errno: Number, syscall: /getsockopt/ }, 'peerPidfd on a regular file');
  t.throws(() => peerCredentials(-1), { code: 'ERR_INVALID_ARG_TYPE' }, 'a negative fd is a type error');
  t.throws(() => peerCredentials(1.5), { code: 'ERR_INVALID_ARG_TYPE' }, 'a fractional fd is a type error');

  // A TCP socket has no peer credentials: ENOTCONN, not a made-up pid 0.
  const tcp = createServer((s) => s.destroy());
  await new Promise<void>((r) => tcp.listen(0, '127.0.0.1', r));
  t.teardown(() => tcp.close());
  const port = (tcp.address() as { port: number }).port;
  const s = await new Promise<Socket>((resolve, reject) => {
    const c = connect(port, '127.0.0.1', () => resolve(c));
    c.once('error', reject);
  });
  t.teardown(() => s.destroy());
  t.match(thrown(() => socketPeerCredentials(s)), { code: 'ENOTCONN', errno: Number, syscall: /getsockopt/ }, 'a TCP socket');
});
