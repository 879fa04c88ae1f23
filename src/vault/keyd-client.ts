// The client side of keyd's socket: the gateway (key document, signatures, TLS) and a worker (its one
// decapsulation) use it. One connection per call, or calls over one held connection (a warm worker opens
// it before its request exists, so connecting and keyd's peer identification are off the request's path);
// every reply is checked for `ok`, and a refusal comes back as a PhantomaError with keyd's code.
import { connect, type Socket } from 'node:net';
import { ERRORS, PhantomaError, definitionOf } from '../errors.ts';
import { KEYD_IDLE_MS, KEYD_MAX_LINE } from './keyd.ts';
import type { KeyDocument } from './signing.ts';
import type { SessionKeys } from '../sealed/seal.ts';

export interface DecapsulateRequest {
  keyId: string;
  ephemeralPublicKey: Uint8Array;
  kemCiphertext: Uint8Array;
  transcriptHash: Uint8Array;
}

export interface KeydRegistry {
  clients: Array<{ name: string; publicKey: string; revoked: boolean }>;
  requestKeys: Array<{ id: string; notBefore: string; notAfter: string }>;
}

export interface KeydClient {
  call(request: Record<string, unknown>): Promise<Record<string, unknown>>;
  ping(): Promise<{ pid: number }>;
  tls(): Promise<{ key: string; cert: string }>;
  keyDocument(p: { egressPolicyHash: string; tlsCertificateSha256?: string }): Promise<{ document: KeyDocument; signature: string }>;
  sign(purpose: 'receipt' | 'heartbeat', payload: Uint8Array): Promise<Buffer>;
  /** The public registry the gateway checks sealed envelopes against (clients, request key windows). */
  registry(): Promise<KeydRegistry>;
  /** This worker's one decapsulation: the envelope's two one-way keys (the per-request key stays in keyd). */
  decapsulate(r: DecapsulateRequest): Promise<SessionKeys>;
  /**
   * The gateway, handing a sealed job to worker `workerId`: keyd does that worker's one decapsulation now
   * and pushes the key onto the worker's own connection (the gateway gets only ok or keyd's code). Over a
   * connection this client holds, so no connect or caller identification is on the request's path.
   */
  prepare(workerId: string, r: DecapsulateRequest): Promise<void>;
  /** Opens prepare's connection now (the gateway at start), so the first sealed request does not. */
  holdPrepareConnection(): Promise<void>;
  /** Closes prepare's connection (and its pings); a later prepare opens a new one. */
  close(): void;
}

/**
 * A held connection to keyd: calls are answered in order (keyd answers each line before it reads the
 * next, so several may be in flight); lines keyd pushes unasked (a worker's prepared key) are kept apart
 * for `pushed()`. It is dead once keyd closed it (idle).
 */
export interface KeydConnection {
  alive(): boolean;
  call(request: Record<string, unknown>): Promise<Record<string, unknown>>;
  /** The first line keyd pushed (already here, or when it comes); fails when the connection ends first. */
  pushed(): Promise<Record<string, unknown>>;
  close(): void;
}

function checkedReply(line: string, request: Record<string, unknown>): Record<string, unknown> {
  const reply = JSON.parse(line) as Record<string, unknown>;
  if (reply.ok !== true) {
    const def = definitionOf(reply.code, ERRORS.KEYD_REFUSED);
    throw new PhantomaError(def, `keyd refused ${String(request.op)}: ${String(reply.message ?? reply.code)}`);
  }
  return reply;
}

/** Opens a connection and waits until it is established (keyd has identified the caller by then). */
export function openKeydConnection(opts: { socketPath: string; timeoutMs?: number }): Promise<KeydConnection> {
  const timeoutMs = opts.timeoutMs ?? 5000;
  return new Promise((resolve, reject) => {
    const socket: Socket = connect(opts.socketPath);
    let open = false;
    let ended: PhantomaError | undefined;
    let buf = '';
    interface Pending {
      resolve(r: Record<string, unknown>): void;
      reject(e: Error): void;
      request: Record<string, unknown>;
      timer?: NodeJS.Timeout;
    }
    const pending: Pending[] = [];
    let push: { line?: string; waiter?: Pending } = {};
    const fail = (why: string): void => {
      open = false;
      socket.destroy();
      ended ??= new PhantomaError(ERRORS.KEYD_UNAVAILABLE, `keyd at ${opts.socketPath}: ${why}`);
      for (const p of pending.splice(0)) {
        clearTimeout(p.timer);
        p.reject(ended);
      }
      if (push.waiter) {
        clearTimeout(push.waiter.timer);
        push.waiter.reject(ended);
        push.waiter = undefined;
      }
    };
    const settle = (p: Pending, line: string): void => {
      clearTimeout(p.timer);
      try {
        p.resolve(checkedReply(line, p.request));
      } catch (err) {
        p.reject(err instanceof SyntaxError ? new PhantomaError(ERRORS.KEYD_UNAVAILABLE, 'keyd: the reply is not JSON') : (err as Error));
      }
    };
    const connectTimer = setTimeout(() => {
      fail('no connection in time');
      reject(new PhantomaError(ERRORS.KEYD_UNAVAILABLE, `keyd at ${opts.socketPath}: no connection in time`));
    }, timeoutMs);
    socket.setEncoding('utf8');
    socket.on('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(connectTimer);
      const why = err.code ?? err.message;
      if (!open) reject(new PhantomaError(ERRORS.KEYD_UNAVAILABLE, `keyd at ${opts.socketPath}: ${why}`, { cause: err }));
      fail(why);
    });
    socket.on('close', () => fail('closed'));
    socket.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length > KEYD_MAX_LINE * 2) return fail('reply too long');
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        // A pushed line names itself; keyd pushes at most one (a worker's one decapsulation).
        if (line.startsWith('{"push":')) {
          if (push.waiter) settle(push.waiter, line);
          else if (push.line === undefined) push.line = line;
          push.waiter = undefined;
          continue;
        }
        const p = pending.shift();
        if (p) settle(p, line);
      }
    });
    socket.once('connect', () => {
      clearTimeout(connectTimer);
      open = true;
      resolve({
        alive: () => open && !socket.destroyed,
        close: () => {
          open = false;
          socket.end();
        },
        call(request) {
          if (!open || socket.destroyed) return Promise.reject(new PhantomaError(ERRORS.KEYD_UNAVAILABLE, `keyd at ${opts.socketPath}: the connection is closed`));
          return new Promise((res, rej) => {
            pending.push({ resolve: res, reject: rej, request, timer: setTimeout(() => fail('no answer in time'), timeoutMs) });
            socket.write(JSON.stringify(request) + '\n');
          });
        },
        pushed() {
          const request = { op: 'prepare' };
          if (push.line !== undefined) {
            const line = push.line;
            push.line = undefined;
            return new Promise((res, rej) => settle({ resolve: res, reject: rej, request }, line));
          }
          if (ended) return Promise.reject(ended);
          if (push.waiter) return Promise.reject(new PhantomaError(ERRORS.INTERNAL, 'keyd connection: one wait for the pushed line at a time'));
          return new Promise((res, rej) => {
            push.waiter = { resolve: res, reject: rej, request, timer: setTimeout(() => fail('no pushed key in time'), timeoutMs) };
          });
        },
      });
    });
  });
}

/**
 * Pings a held connection every `everyMs` (half of keyd's idle limit by default), so keyd does not close it
 * as idle; stops once the connection is dead or `stop` (returned) is called. The timer does not keep the
 * process alive.
 */
export function keepAlive(c: KeydConnection, everyMs = KEYD_IDLE_MS / 2, on: { pinged?(): void; failed?(): void } = {}): () => void {
  const timer = setInterval(() => {
    if (!c.alive()) return clearInterval(timer);
    c.call({ op: 'ping' }).then(
      () => on.pinged?.(),
      () => on.failed?.(),
    );
  }, everyMs);
  timer.unref();
  return () => clearInterval(timer);
}

export function createKeydClient(opts: { socketPath: string; timeoutMs?: number; connection?: KeydConnection; keepAliveMs?: number }): KeydClient {
  const timeoutMs = opts.timeoutMs ?? 5000;
  // prepare's connection: opened on first use (or by holdPrepareConnection), opened again if it ended.
  // While open it is pinged every half of keyd's idle limit: without that keyd closes it after 5 s without
  // a sealed request, and the next one would connect (and be identified by keyd) on its own path.
  let held: Promise<KeydConnection> | undefined;
  let openHeld: KeydConnection | undefined;
  const keepAliveMs = opts.keepAliveMs ?? KEYD_IDLE_MS / 2;
  const heldConnection = (): Promise<KeydConnection> => {
    if (openHeld?.alive()) return Promise.resolve(openHeld);
    // One opening at a time: callers meanwhile share it; a failed or dead one is replaced by the next call.
    if (!held || openHeld) {
      openHeld = undefined;
      const opening = openKeydConnection({ socketPath: opts.socketPath, timeoutMs }).then((c) => {
        openHeld = c;
        const stop = keepAlive(c, keepAliveMs, { failed: () => stop() });
        return c;
      });
      opening.catch(() => {
        if (held === opening) held = undefined;
      });
      held = opening;
    }
    return held;
  };
  function call(request: Record<string, unknown>): Promise<Record<string, unknown>> {
    if (opts.connection?.alive()) return opts.connection.call(request);
    return new Promise((resolve, reject) => {
      const socket = connect(opts.socketPath);
      let buf = '';
      const fail = (why: string, cause?: unknown): void => {
        socket.destroy();
        reject(new PhantomaError(ERRORS.KEYD_UNAVAILABLE, `keyd at ${opts.socketPath}: ${why}`, cause === undefined ? undefined : { cause }));
      };
      const timer = setTimeout(() => fail('no answer in time'), timeoutMs);
      socket.setEncoding('utf8');
      socket.on('error', (err) => {
        clearTimeout(timer);
        fail((err as NodeJS.ErrnoException).code ?? err.message, err);
      });
      socket.on('data', (chunk: string) => {
        buf += chunk;
        if (buf.length > KEYD_MAX_LINE * 2) return fail('reply too long');
        const nl = buf.indexOf('\n');
        if (nl < 0) return;
        clearTimeout(timer);
        socket.end();
        let reply: Record<string, unknown>;
        try {
          reply = checkedReply(buf.slice(0, nl), request);
        } catch (err) {
          return err instanceof SyntaxError ? fail('the reply is not JSON', err) : reject(err);
        }
        resolve(reply);
      });
      socket.on('end', () => {
        clearTimeout(timer);
        if (!buf.includes('\n')) fail('closed without an answer');
      });
      socket.write(JSON.stringify(request) + '\n');
    });
  }
  const b64 = (b: Uint8Array): string => Buffer.from(b).toString('base64');
  const kemFields = (r: DecapsulateRequest): Record<string, string> => ({ keyId: r.keyId, ephemeralPublicKey: b64(r.ephemeralPublicKey), kemCiphertext: b64(r.kemCiphertext), transcriptHash: b64(r.transcriptHash) });
  return {
    call,
    ping: async () => ({ pid: Number((await call({ op: 'ping' })).pid) }),
    tls: async () => {
      const r = await call({ op: 'tls' });
      return { key: String(r.key), cert: String(r.cert) };
    },
    keyDocument: async (p) => {
      const r = await call({ op: 'key-document', ...p });
      return { document: r.document as KeyDocument, signature: String(r.signature) };
    },
    registry: async () => {
      const r = await call({ op: 'registry' });
      return { clients: r.clients as KeydRegistry['clients'], requestKeys: r.requestKeys as KeydRegistry['requestKeys'] };
    },
    sign: async (purpose, payload) => Buffer.from(String((await call({ op: 'sign', purpose, payload: b64(payload) })).signature), 'base64'),
    decapsulate: async (r) => {
      return sessionKeysOf(await call({ op: 'decapsulate', ...kemFields(r) }));
    },
    prepare: async (workerId, r) => {
      const request = { op: 'prepare', workerId, ...kemFields(r) };
      // Written before this returns when the connection is open, so it reaches keyd ahead of the job.
      await (openHeld?.alive() ? openHeld : await heldConnection()).call(request);
    },
    holdPrepareConnection: async () => void (await heldConnection()),
    close: () => {
      const c = openHeld;
      openHeld = undefined;
      held = undefined;
      c?.close();
    },
  };
}

/** The two one-way keys of a decapsulation reply or push (`bodyKey`, `responseKey`, base64 of 32 bytes). */
export function sessionKeysOf(reply: Record<string, unknown>): SessionKeys {
  const key = (v: unknown): Buffer => {
    const b = typeof v === 'string' ? Buffer.from(v, 'base64') : Buffer.alloc(0);
    if (b.length !== 32) throw new PhantomaError(ERRORS.KEYD_UNAVAILABLE, 'keyd: a reply without its two 32-byte keys');
    return b;
  };
  return { bodyKey: key(reply.bodyKey), responseKey: key(reply.responseKey) };
}
