// The gateway's side of the warden socket (native/warden/README.md has the protocol). One request per
// connection: a list of non-empty NUL-terminated fields closed by an empty one, answered by one line,
// "OK ..." or "ERR <code> <text>". For SPAWN the connection then IS the worker's stdin and stdout, and a
// connection announced first with STDERR <id> is its stderr: the worker's stdio reaches this unprivileged
// process as file descriptors (sockets) without SCM_RIGHTS, which Node cannot receive on unix sockets.
import { connect, type Socket } from 'node:net';

export const MAX_REQUEST_BYTES = 64 * 1024;
const MAX_REPLY_BYTES = 4096;

/** A refusal or failure reported by the warden (code is its stable error code) or reaching it. */
export class WardenError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(message);
    this.name = 'WardenError';
    this.code = code;
  }
}

export interface SpawnRequest {
  /** 16 lowercase hex digits; it names the worker's cgroup `workers/<id>`. */
  id: string;
  uid: number;
  gid: number;
  /** 0-19; refills run at a lower priority than the active request. */
  nice?: number;
  /** Must equal the warden's --worker-exec. */
  exec: string;
  /** args[0] must equal the warden's --worker-script; the rest are passed through. */
  args: string[];
}

export interface SpawnedWorker {
  pid: number;
  /** The worker's stdin and stdout: one socket, half-closable (end() = EOF on the worker's stdin). */
  stdio: Socket;
  /** Bytes of worker output that arrived with the reply header. */
  head: Buffer;
  /** The worker's stderr (read-only for us). */
  stderr: Socket;
}

export interface EndResult {
  verified: boolean;
  ms: number;
  exit: { code: number | null; signal: number | null };
  /** Times the OOM killer fired in the worker's memory cgroup. */
  oomKills: number;
}

export interface WardenStatus {
  pid: number;
  workers: number;
  memory: string;
  pids: string;
  noswap: boolean;
  cgroup: string;
}

export interface WardenClient {
  readonly socketPath: string;
  ping(): Promise<WardenStatus>;
  spawn(req: SpawnRequest): Promise<SpawnedWorker>;
  end(id: string): Promise<EndResult>;
  /** Sends raw fields and returns the reply line (tests and diagnostics). */
  raw(fields: string[], opts?: { timeoutMs?: number }): Promise<string>;
}

export function encodeRequest(fields: string[]): Buffer {
  for (const f of fields) if (f.length === 0 || f.includes('\0')) throw new WardenError('bad_request', 'a request field is empty or contains NUL');
  return Buffer.from(fields.map((f) => f + '\0').join('') + '\0', 'utf8');
}

interface Exchange {
  line: string;
  rest: Buffer;
  socket: Socket;
}

/** Connects, sends one request, reads one reply line; the socket stays open for the caller. */
function exchange(socketPath: string, payload: Buffer, timeoutMs: number): Promise<Exchange> {
  return new Promise((resolve, reject) => {
    // allowHalfOpen: a worker's stdin can be closed while its stdout is still being read.
    const socket = connect({ path: socketPath, allowHalfOpen: true });
    let buf: Buffer = Buffer.alloc(0);
    let done = false;
    const fail = (err: WardenError): void => {
      if (done) return;
      done = true;
      cleanup();
      socket.destroy();
      reject(err);
    };
    const timer = setTimeout(() => fail(new WardenError('warden_timeout', `no reply from the warden within ${timeoutMs} ms`)), timeoutMs);
    const onData = (c: Buffer): void => {
      buf = buf.length ? Buffer.concat([buf, c]) : c;
      const nl = buf.indexOf(10);
      if (nl === -1) {
        if (buf.length > MAX_REPLY_BYTES) fail(new WardenError('warden_protocol', 'the warden reply line is too long'));
        return;
      }
      done = true;
      cleanup();
      // Later errors (a reset when the worker dies) are seen by the owner as 'close'; never unhandled.
      socket.on('error', () => undefined);
      // Stop the flow before anyone else listens: what follows the header is the worker's output.
      socket.pause();
      resolve({ line: buf.subarray(0, nl).toString('utf8'), rest: buf.subarray(nl + 1), socket });
    };
    const onError = (err: NodeJS.ErrnoException): void => {
      // A refusal may arrive before a reset (the warden closes with our unread bytes): prefer the line.
      if (buf.indexOf(10) !== -1) return onData(Buffer.alloc(0));
      fail(new WardenError('warden_unavailable', `cannot reach the warden at ${socketPath}: ${err.code ?? err.message}`));
    };
    const onEnd = (): void => fail(new WardenError('warden_closed', 'the warden closed the connection without a reply'));
    function cleanup(): void {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('end', onEnd);
    }
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('end', onEnd);
    socket.write(payload);
  });
}

function parseReply(line: string): string {
  if (line.startsWith('OK')) return line.slice(3);
  const m = /^ERR ([a-z_]+) ?(.*)$/.exec(line);
  if (m) throw new WardenError(m[1]!, m[2] ?? '');
  throw new WardenError('warden_protocol', 'unexpected reply from the warden');
}

function kv(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const part of text.split(' ')) {
    const eq = part.indexOf('=');
    if (eq > 0) out.set(part.slice(0, eq), part.slice(eq + 1));
  }
  return out;
}

export function createWardenClient(opts: { socketPath: string; timeoutMs?: number }): WardenClient {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const once = async (fields: string[], t = timeoutMs): Promise<string> => {
    const ex = await exchange(opts.socketPath, encodeRequest(fields), t);
    ex.socket.destroy();
    return ex.line;
  };
  return {
    socketPath: opts.socketPath,
    raw: (fields, o) => once(fields, o?.timeoutMs),
    async ping() {
      const m = kv(parseReply(await once(['PING'])));
      return {
        pid: Number(m.get('pid')),
        workers: Number(m.get('workers')),
        memory: m.get('memory') ?? 'none',
        pids: m.get('pids') ?? 'none',
        noswap: m.get('noswap') === '1',
        cgroup: m.get('cgroup') ?? '',
      };
    },
    async spawn(req) {
      if (!/^[0-9a-f]{16}$/.test(req.id)) throw new WardenError('cgroup_not_allowed', 'the worker id must be 16 lowercase hex digits');
      const payload = encodeRequest(['SPAWN', req.id, String(req.uid), String(req.gid), String(req.nice ?? 0), req.exec, ...req.args]);
      if (payload.length > MAX_REQUEST_BYTES) throw new WardenError('too_large', 'the spawn request exceeds 64 KiB');
      // stderr first: the warden holds it for the SPAWN with the same id (and drops it after 10 s).
      const err = await exchange(opts.socketPath, encodeRequest(['STDERR', req.id]), timeoutMs);
      try {
        parseReply(err.line);
      } catch (e) {
        err.socket.destroy();
        throw e;
      }
      let main: Exchange;
      try {
        main = await exchange(opts.socketPath, payload, timeoutMs);
      } catch (e) {
        err.socket.destroy();
        throw e;
      }
      try {
        const pid = Number(parseReply(main.line));
        if (!Number.isSafeInteger(pid) || pid <= 1) throw new WardenError('warden_protocol', 'the warden sent no worker pid');
        // Our stderr connection never carries data towards the worker.
        err.socket.end();
        return { pid, stdio: main.socket, head: main.rest, stderr: err.socket };
      } catch (e) {
        main.socket.destroy();
        err.socket.destroy();
        throw e;
      }
    },
    async end(id) {
      const line = await once(['END', id]);
      const m = kv(parseReply(line));
      const code = m.get('code');
      const signal = m.get('signal');
      return {
        verified: m.get('verified') === '1',
        ms: Number(m.get('ms')),
        exit: { code: code === undefined ? null : Number(code), signal: signal === undefined ? null : Number(signal) },
        oomKills: Number(m.get('oom_kills') ?? 0),
      };
    },
  };
}
