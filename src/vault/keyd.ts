// keyd: the one process that holds the vault's private keys. It answers on a unix path socket:
//   decapsulate  — a worker's single request to turn a sealed request's KEM fields into its per-request
//                  key; once per worker *cgroup* (a second attempt, on any connection, is refused and audited)
//   prepare      — the gateway, as it hands a sealed job to a warm worker, has keyd do that worker's one
//                  decapsulation at once: the key is pushed onto the worker's own held connection (a line
//                  {"push":"request-key",...}), never to the gateway, which gets only ok or a code. It
//                  takes the worker's one decapsulation like `decapsulate` does: whichever comes first wins,
//                  the other is refused. The worker then does not wait for a serial round trip to keyd.
//   key-document — the signed key document (built here from keyd's own request keys, so a compromised
//                  gateway cannot have other request keys signed), for the gateway's uid
//   sign         — a receipt or heartbeat payload, for the gateway's uid (domain-separated, signing.ts)
//   tls          — the TLS key and certificate from the vault, for the gateway's uid
// It never receives a request body. Callers are identified by the kernel: SO_PEERCRED (pid, uid) and
// SO_PEERPIDFD (the pid cannot be recycled under us), then /proc/<pid>/cgroup. A worker is a process in
// `.../<warden.cgroupName>/workers/<16 hex>` with a uid of the worker range; the warden bind-mounts this
// socket into each worker's view (an inherited socketpair would report its creator, not the worker).
import { createServer, type Server, type Socket } from 'node:net';
import { chmodSync, closeSync, mkdirSync, readFileSync, statSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';
import { peerPidfd, socketFd, peerCredentials } from '../native/addon.ts';
import { ERRORS, PhantomaError } from '../errors.ts';
import { MLKEM768_CIPHERTEXT_BYTES, TRANSCRIPT_HASH_BYTES, X25519_PUBLIC_BYTES, prepareRequestPrivateKeys, type PreparedRequestPrivateKeys } from '../sealed/kem.ts';
import { requestKeyFor } from '../sealed/request.ts';
import { deriveSessionKeys } from '../sealed/seal.ts';
import { identityPrivateKey, isKeyUsable, pruneExpiredKeys, requestPrivateKeys, type RequestKeyEntry, type VaultContents } from './contents.ts';
import { readVault, updateVault } from './store.ts';
import type { SealKeys } from './format.ts';
import { signPayload, canonicalJson, SIGN_PURPOSES, type KeyDocument, type SignPurpose } from './signing.ts';
import { certificateFingerprint } from '../gateway/tls.ts';
import type { Logger } from '../logger.ts';

/** Where a warden-spawned worker finds keyd (the warden's --keyd-socket bind mount, native/warden/README.md). */
export const KEYD_SOCKET_IN_WORKER = '/run/phantoma/keyd.sock';
export const KEYD_MAX_LINE = 16 * 1024;
export const KEYD_IDLE_MS = 5000;
export const KEYD_MAX_CONNECTIONS = 256;
/** Worker cgroups remembered as used; past this, keyd refuses every decapsulation rather than forget one. */
export const KEYD_MAX_USED = 1 << 20;

export interface Caller {
  pid: number;
  uid: number;
  /** The caller's cgroup v2 path ("0::" line of /proc/<pid>/cgroup), or undefined. */
  cgroup: string | undefined;
}

export interface KeydPolicy {
  gatewayUid: number;
  workerUids: { from: number; to: number };
  /** The warden's subtree name: a warden worker is in `.../<cgroupName>/workers/<16 hex>`. */
  cgroupName: string;
  /** Docker backend (issue 6): its workers are containers in `<dockerCgroupParent>/<64 hex container id>`. */
  dockerCgroupParent?: string;
}

/** keyd's audit events (relayed to the node's audit log by the gateway, src/vault/keyd-process.ts). */
export type KeydAuditEvent =
  | { type: 'keyd_refusal'; op: string; code: string; reason: string; uid: number; workerId?: string }
  | { type: 'keyd_decapsulated'; workerId: string; keyId: string; op: string };

export interface KeyService {
  handle(caller: Caller, request: unknown): Record<string, unknown>;
  /**
   * A connection was identified: a worker's is remembered (with a way to push a line onto it) until the
   * returned function is called at its close, so `prepare` can deliver to that worker and no other.
   */
  attach(caller: Caller, channel: PushChannel): () => void;
}

/** A connection as the service sees it: whether it can still take a line, and how to push one. */
export interface PushChannel {
  live(): boolean;
  push(message: Record<string, unknown>): void;
}

/** The line keyd pushes onto a worker's connection after a `prepare` (the request key, or why there is none). */
export const PUSH_REQUEST_KEY = 'request-key';

export function workerIdOf(caller: Caller, policy: KeydPolicy): string | undefined {
  if (caller.uid < policy.workerUids.from || caller.uid > policy.workerUids.to || !caller.cgroup) return undefined;
  const warden = /\/([^/]+)\/workers\/([0-9a-f]{16})$/.exec(caller.cgroup);
  if (warden && warden[1] === policy.cgroupName) return warden[2];
  const parent = policy.dockerCgroupParent?.replace(/\/+$/, '');
  const docker = parent ? /^(.*)\/([0-9a-f]{64})$/.exec(caller.cgroup) : null;
  if (docker && docker[1] === parent) return docker[2];
  return undefined;
}

const b64 = (v: unknown, bytes: number): Buffer | undefined => {
  if (typeof v !== 'string' || v.length > 4 * Math.ceil(bytes / 3) + 4) return undefined;
  const b = Buffer.from(v, 'base64');
  return b.length === bytes ? b : undefined;
};

/**
 * The decisions, without sockets: who may do what, once-per-worker bookkeeping, the crypto. `contents()`
 * gives the current vault (re-read after a rotation); `now()` is injectable for the rotation tests.
 */
export function createKeyService(deps: {
  contents: () => VaultContents;
  policy: KeydPolicy;
  now?: () => Date;
  audit?: (e: KeydAuditEvent) => void;
  releaseVersion?: string;
}): KeyService {
  const used = new Set<string>();
  // Imported key objects per request key id, remade when the vault's copy of that key changes.
  const prepared = new Map<string, { source: string; keys: PreparedRequestPrivateKeys }>();
  const preparedFor = (k: RequestKeyEntry): PreparedRequestPrivateKeys => {
    const hit = prepared.get(k.id);
    if (hit && hit.source === k.mlkemSecret) return hit.keys;
    const keys = prepareRequestPrivateKeys(requestPrivateKeys(k));
    // A rotated-out key leaves keyd's memory with its vault entry.
    const live = new Set(deps.contents().requestKeys.map((x) => x.id));
    for (const id of prepared.keys()) if (!live.has(id)) prepared.delete(id);
    prepared.set(k.id, { source: k.mlkemSecret, keys });
    return keys;
  };
  const now = deps.now ?? (() => new Date());
  const audit = deps.audit ?? (() => {});
  const refuse = (caller: Caller, op: string, code: typeof ERRORS.KEYD_REFUSED, reason: string, message: string, workerId?: string): Record<string, unknown> => {
    audit({ type: 'keyd_refusal', op, code: code.code, reason, uid: caller.uid, ...(workerId ? { workerId } : {}) });
    return { ok: false, code: code.code, message };
  };
  const isGateway = (c: Caller): boolean => c.uid === deps.policy.gatewayUid && workerIdOf(c, deps.policy) === undefined;

  // Workers' live connections by worker id, oldest first; each knows its cgroup (the unit of "once").
  const attached = new Map<string, Array<{ cgroup: string; channel: PushChannel }>>();

  function decap(caller: Caller, r: Record<string, unknown>): Record<string, unknown> {
    const workerId = workerIdOf(caller, deps.policy);
    if (!workerId) return refuse(caller, 'decapsulate', ERRORS.KEYD_REFUSED, 'not_worker', 'only a worker the warden started may decapsulate');
    return spent(caller, 'decapsulate', workerId, caller.cgroup!) ?? issue(caller, 'decapsulate', workerId, caller.cgroup!, r);
  }

  /** The gateway's prepare: the worker's one decapsulation, its result pushed to that worker's connection. */
  function prepare(caller: Caller, r: Record<string, unknown>): Record<string, unknown> {
    const workerId = typeof r.workerId === 'string' && /^(?:[0-9a-f]{16}|[0-9a-f]{64})$/.test(r.workerId) ? r.workerId : undefined;
    if (!workerId) return { ok: false, code: ERRORS.INVALID_REQUEST.code, message: 'prepare needs workerId (16 or 64 hex)' };
    // The worker's oldest live connection: the one it opened while warm. Without one (closed as idle, or a
    // worker that never connected) nothing is counted: the worker asks for itself, as without prepare.
    const conn = attached.get(workerId)?.find((e) => e.channel.live());
    if (!conn) return { ok: false, code: ERRORS.KEYD_WORKER_NOT_CONNECTED.code, message: `worker ${workerId} holds no connection to keyd; it will ask itself` };
    // Already used (the worker asked first, or a second prepare): refused and audited, nothing pushed —
    // that worker's one decapsulation has been answered already.
    const refused = spent(caller, 'prepare', workerId, conn.cgroup);
    if (refused) return refused;
    // The keys (or why this attempt, now counted, failed) go to the worker; the gateway learns the outcome only.
    let pushed = false;
    const push = (result: Record<string, unknown>): void => {
      pushed = true;
      conn.channel.push({ push: PUSH_REQUEST_KEY, transcriptHash: r.transcriptHash, ...result });
    };
    const result = issue(caller, 'prepare', workerId, conn.cgroup, r, push);
    if (!pushed) push(result);
    return result.ok === true ? { ok: true } : { ok: false, code: result.code, message: result.message };
  }

  /** The refusal when this worker cgroup cannot have a decapsulation (any more), else undefined. */
  function spent(caller: Caller, op: string, workerId: string, cg: string): Record<string, unknown> | undefined {
    if (used.has(cg)) return refuse(caller, op, ERRORS.KEYD_REFUSED, 'second_decapsulation', 'this worker has already had its one decapsulation', workerId);
    if (used.size >= KEYD_MAX_USED) return refuse(caller, op, ERRORS.KEYD_REFUSED, 'memory_full', 'keyd remembers too many workers; restart it', workerId);
    return undefined;
  }

  /** A worker cgroup's one decapsulation, whoever asked for it (the worker itself, or the gateway's prepare); not yet spent. */
  function issue(caller: Caller, op: string, workerId: string, cg: string, r: Record<string, unknown>, deliver?: (reply: Record<string, unknown>) => void): Record<string, unknown> {
    // Callers have checked spent() first (prepare must know before it pushes anything). Counted before anything else can fail: a worker gets one attempt, successful or not.
    used.add(cg);
    const eph = b64(r.ephemeralPublicKey, X25519_PUBLIC_BYTES);
    const ct = b64(r.kemCiphertext, MLKEM768_CIPHERTEXT_BYTES);
    const th = b64(r.transcriptHash, TRANSCRIPT_HASH_BYTES);
    if (typeof r.keyId !== 'string' || !eph || !ct || !th) return { ok: false, code: ERRORS.INVALID_REQUEST.code, message: `${op} needs keyId, ephemeralPublicKey (32 B), kemCiphertext (1088 B), transcriptHash (32 B), base64` };
    const key = deps.contents().requestKeys.find((k) => k.id === r.keyId);
    if (!key || !isKeyUsable(key, now())) {
      audit({ type: 'keyd_refusal', op, code: ERRORS.REQUEST_KEY_UNKNOWN.code, reason: key ? 'key_expired' : 'key_unknown', uid: caller.uid, workerId });
      return { ok: false, code: ERRORS.REQUEST_KEY_UNKNOWN.code, message: `request key ${String(r.keyId).slice(0, 16)} is unknown or past its window` };
    }
    let requestKey: Uint8Array;
    try {
      requestKey = requestKeyFor(preparedFor(key), { ephemeralPublicKey: eph, kemCiphertext: ct, transcriptHash: th });
    } catch {
      return { ok: false, code: ERRORS.INVALID_REQUEST.code, message: 'the KEM fields do not decapsulate' };
    }
    // The worker gets the two one-way keys, not the per-request key itself: derived here, right after the
    // decapsulation while this code is hot, instead of as the first thing a cold worker does with its key.
    const keys = deriveSessionKeys(requestKey);
    requestKey.fill(0);
    const reply = { ok: true, bodyKey: keys.bodyKey.toString('base64'), responseKey: keys.responseKey.toString('base64') };
    keys.bodyKey.fill(0);
    keys.responseKey.fill(0);
    // A prepared worker waits for these keys; the audit line (relayed to the gateway's log either way) follows.
    deliver?.(reply);
    audit({ type: 'keyd_decapsulated', workerId, keyId: key.id, op });
    return reply;
  }

  function keyDocument(r: Record<string, unknown>): Record<string, unknown> {
    const c = deps.contents();
    const t = now();
    const egress = typeof r.egressPolicyHash === 'string' && /^[0-9a-f]{64}$/.test(r.egressPolicyHash) ? r.egressPolicyHash : undefined;
    if (!egress) return { ok: false, code: ERRORS.INVALID_REQUEST.code, message: 'key-document needs egressPolicyHash (64 hex)' };
    const tls = r.tlsCertificateSha256 === undefined ? (c.tls ? certificateFingerprint(c.tls.cert) : '') : r.tlsCertificateSha256;
    if (typeof tls !== 'string' || !/^(([0-9A-F]{2}:){31}[0-9A-F]{2})?$/.test(tls)) return { ok: false, code: ERRORS.INVALID_REQUEST.code, message: 'tlsCertificateSha256 must be a colon-hex SHA-256 fingerprint or ""' };
    const doc: KeyDocument = {
      type: 'phantoma-key-document',
      version: 1,
      identityPublicKey: c.identity.publicKey,
      issuedAt: t.toISOString(),
      releaseVersion: deps.releaseVersion ?? '0.1.0',
      egressPolicyHash: egress,
      tlsCertificateSha256: tls,
      requestKeys: c.requestKeys
        .filter((k) => isKeyUsable(k, t))
        .map((k) => ({ id: k.id, x25519: k.x25519Public, mlkem768: k.mlkemPublic, notBefore: k.notBefore, notAfter: k.notAfter })),
    };
    const signature = signPayload(identityPrivateKey(c), 'key-document', Buffer.from(canonicalJson(doc)));
    return { ok: true, document: doc, signature: signature.toString('base64') };
  }

  return {
    attach(caller, channel) {
      const workerId = workerIdOf(caller, deps.policy);
      if (!workerId) return () => {};
      const entry = { cgroup: caller.cgroup!, channel };
      const list = attached.get(workerId) ?? [];
      list.push(entry);
      attached.set(workerId, list);
      return () => {
        const rest = (attached.get(workerId) ?? []).filter((e) => e !== entry);
        if (rest.length > 0) attached.set(workerId, rest);
        else attached.delete(workerId);
      };
    },
    handle(caller, request) {
      const r = (request && typeof request === 'object' ? request : {}) as Record<string, unknown>;
      const op = typeof r.op === 'string' ? r.op.slice(0, 32) : '';
      if (op === 'decapsulate') return decap(caller, r);
      if (op !== 'key-document' && op !== 'sign' && op !== 'tls' && op !== 'ping' && op !== 'registry' && op !== 'prepare') return { ok: false, code: ERRORS.INVALID_REQUEST.code, message: 'unknown op' };
      if (op === 'ping') return { ok: true, pid: process.pid };
      if (!isGateway(caller)) return refuse(caller, op, ERRORS.KEYD_REFUSED, 'not_gateway', `${op} is for the gateway only`);
      if (op === 'key-document') return keyDocument(r);
      if (op === 'prepare') return prepare(caller, r);
      if (op === 'registry') {
        // What the gateway's sealed checks need, all public: clients (name, Ed25519 public key, revoked)
        // and the request key ids with their windows. No private key leaves keyd.
        const c = deps.contents();
        return {
          ok: true,
          clients: c.clients.map((x) => ({ name: x.name, publicKey: x.publicKey, revoked: x.revokedAt !== undefined })),
          requestKeys: c.requestKeys.map((k) => ({ id: k.id, notBefore: k.notBefore, notAfter: k.notAfter })),
        };
      }
      if (op === 'tls') {
        const tls = deps.contents().tls;
        return tls ? { ok: true, key: tls.key, cert: tls.cert } : { ok: false, code: ERRORS.TLS_SETUP_FAILED.code, message: 'the vault holds no TLS key' };
      }
      const purpose = r.purpose as SignPurpose;
      if (!SIGN_PURPOSES.includes(purpose) || purpose === 'key-document') return { ok: false, code: ERRORS.INVALID_REQUEST.code, message: 'sign purpose must be receipt or heartbeat' };
      if (typeof r.payload !== 'string' || r.payload.length > 8192) return { ok: false, code: ERRORS.INVALID_REQUEST.code, message: 'sign needs a base64 payload of at most 6 KiB' };
      return { ok: true, signature: signPayload(identityPrivateKey(deps.contents()), purpose, Buffer.from(r.payload, 'base64')).toString('base64') };
    },
  };
}

/** The process at the other end of a unix socket, by the kernel's word; throws if it cannot be pinned down. */
export function identifyPeer(socket: Socket): Caller {
  const fd = socketFd(socket);
  const cred = peerCredentials(fd);
  // The pidfd pins the process: if it exits and its pid is reused while we read /proc, the fdinfo check
  // below sees the pidfd's process gone (Pid: -1) and we refuse.
  const pidfd = peerPidfd(fd);
  try {
    let cgroup: string | undefined;
    try {
      const line = readFileSync(`/proc/${cred.pid}/cgroup`, 'utf8').split('\n').find((l) => l.startsWith('0::'));
      cgroup = line?.slice(3);
    } catch {
      cgroup = undefined;
    }
    const info = readFileSync(`/proc/self/fdinfo/${pidfd}`, 'utf8');
    const pid = /^Pid:\s*(-?\d+)/m.exec(info)?.[1];
    if (pid !== String(cred.pid)) throw new Error('the peer exited while it was being identified');
    return { pid: cred.pid, uid: cred.uid, cgroup };
  } finally {
    closeSync(pidfd);
  }
}

export interface KeydServer {
  server: Server;
  close(): Promise<void>;
}

/** keyd's socket server: newline-delimited JSON, one caller identity per connection, bounded lines and idle time. */
export async function listenKeyd(opts: { socketPath: string; service: KeyService; logger: Logger; idleMs?: number }): Promise<KeydServer> {
  mkdirSync(dirname(opts.socketPath), { recursive: true, mode: 0o755 });
  try {
    unlinkSync(opts.socketPath);
  } catch {
    /* none */
  }
  const server = createServer((socket) => {
    socket.setTimeout(opts.idleMs ?? KEYD_IDLE_MS, () => socket.destroy());
    socket.on('error', () => {});
    let caller: Caller;
    try {
      caller = identifyPeer(socket);
    } catch (err) {
      opts.logger.warn({ code: (err as { code?: string }).code }, 'keyd: cannot identify a caller; closed');
      socket.end(JSON.stringify({ ok: false, code: ERRORS.KEYD_REFUSED.code, message: 'caller not identifiable' }) + '\n');
      return;
    }
    // A worker's connection is where a prepared key is pushed; a destroyed one takes nothing (an idle
    // close destroys at once, its 'close' event comes later).
    const detach = opts.service.attach(caller, {
      live: () => !socket.destroyed && socket.writable,
      push: (message) => void socket.write(JSON.stringify(message) + '\n'),
    });
    socket.once('close', detach);
    let buf = '';
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length > KEYD_MAX_LINE) {
        socket.end(JSON.stringify({ ok: false, code: ERRORS.REQUEST_TOO_LARGE.code, message: 'request line too long' }) + '\n');
        buf = '';
        return;
      }
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let reply: Record<string, unknown>;
        try {
          reply = opts.service.handle(caller, JSON.parse(line));
        } catch (err) {
          reply = err instanceof SyntaxError ? { ok: false, code: ERRORS.INVALID_JSON.code, message: 'not JSON' } : { ok: false, code: ERRORS.INTERNAL.code, message: 'keyd failed' };
          if (!(err instanceof SyntaxError)) opts.logger.error({ err: (err as Error).message }, 'keyd: request failed');
        }
        socket.write(JSON.stringify(reply) + '\n');
      }
    });
  });
  // Bounded: a local process opening connections in a loop must not exhaust keyd's descriptors.
  server.maxConnections = KEYD_MAX_CONNECTIONS;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.socketPath, () => resolve());
  });
  // Worker uids (61000-61999) must be able to connect; who may do what is decided per caller, above.
  chmodSync(opts.socketPath, 0o666);
  return {
    server,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        try {
          unlinkSync(opts.socketPath);
        } catch {
          /* gone */
        }
      }),
  };
}

/**
 * Removes request keys past their window from the vault file itself (keyd runs this every minute), so a
 * rotated key is gone from the vault once its overlap ends even if nobody rotates again. Returns the ids
 * removed; the write is the usual locked, atomic update.
 */
export function pruneExpiredInVault(path: string, keys: SealKeys, now: Date): string[] {
  const expired = readVault(path, keys).contents.requestKeys.filter((k) => Date.parse(k.notAfter) <= now.getTime());
  if (expired.length === 0) return [];
  // Never the last key: a node with no request key could not be reached by sealed requests at all.
  const after = updateVault(path, keys, (c) => {
    const kept = pruneExpiredKeys(c, now);
    return kept.requestKeys.length > 0 ? kept : c;
  });
  const left = new Set(after.contents.requestKeys.map((k) => k.id));
  return expired.map((k) => k.id).filter((id) => !left.has(id));
}

/** The vault as keyd sees it: re-read (under the keys already derived) whenever the file changes. */
export function watchedVault(path: string, keys: SealKeys, initial: VaultContents, logger: Logger): () => VaultContents {
  let current = initial;
  let stamp = stampOf(path);
  return () => {
    const s = stampOf(path);
    if (s !== stamp) {
      try {
        current = readVault(path, keys).contents;
        stamp = s;
        logger.info({ requestKeys: current.requestKeys.map((k) => k.id) }, 'keyd: vault changed; reloaded');
      } catch (err) {
        logger.error({ code: (err as PhantomaError).code }, 'keyd: the changed vault does not open; keeping the keys it had');
      }
    }
    return current;
  };
}

function stampOf(path: string): string {
  try {
    const s = statSync(path);
    return `${s.ino}:${s.size}:${s.mtimeMs}`;
  } catch {
    return 'missing';
  }
}
