// The control plane's logic: enrolment, heartbeats, leases, tokens, node administration. No state lives in
// this process: every decision reads Postgres and every change is one SQL statement or one transaction, so
// N instances on one database serve a fleet (control-plane/README.md). The HTTP layer is app.ts.
import { randomBytes } from 'node:crypto';
import {
  DOMAIN,
  PROTOCOL_VERSION,
  NODE_NAME_RE,
  checkEnrolRequest,
  checkHeartbeatRequest,
  schemaProblem,
  sha256Hex,
  signWith,
  verifySignature,
  ed25519PublicKey,
  type Lease,
  type SignedLease,
  type HeartbeatRequest,
  type EnrolRequest,
} from '../../src/control/protocol.ts';
import type { Db } from './db.ts';
import type { LeaseKey } from './lease-key.ts';
import type { CpConfig } from './config.ts';
import { CP_ERRORS, CpError } from './errors.ts';

export interface ControlPlaneDeps {
  db: Db;
  key: LeaseKey;
  config: Readonly<CpConfig>;
  clock?: () => number;
}

export type LeaseState = 'valid' | 'grace' | 'expired' | 'revoked' | 'none';

export interface NodeSummary {
  name: string;
  status: 'active' | 'revoked';
  enrolledAt: string;
  revokedAt: string | null;
  lastCounter: number;
  lastSeenAt: string | null;
  lastVersion: string | null;
  leaseExpiresAt: string | null;
  leaseState: LeaseState;
}

export interface NodeDetail extends NodeSummary {
  publicKeyFingerprint: string;
  lastState: unknown;
  history: Array<{ counter: number; receivedAt: string }>;
}

export interface ControlPlaneService {
  createToken(nodeName: string, ttlSeconds: number): Promise<{ token: string; node: string; expiresAt: string }>;
  enrol(body: unknown): Promise<SignedLease>;
  heartbeat(body: unknown): Promise<SignedLease>;
  listNodes(): Promise<NodeSummary[]>;
  showNode(name: string): Promise<NodeDetail>;
  revoke(name: string): Promise<NodeSummary>;
  /** Deletes history older than heartbeat.historyDays and long-expired tokens; idempotent, any instance may run it. */
  prune(): Promise<{ heartbeats: number; tokens: number }>;
  nodeStates(): Promise<Record<LeaseState, number>>;
}

const iso = (ms: number): string => new Date(ms).toISOString();
const toMs = (v: unknown): number | null => (v === null || v === undefined ? null : v instanceof Date ? v.getTime() : typeof v === 'number' ? v : Date.parse(String(v)));
const toIso = (v: unknown): string | null => {
  const ms = toMs(v);
  return ms === null ? null : iso(ms);
};

interface NodeRow {
  name: string;
  public_key: Uint8Array;
  enrolment: string;
  status: 'active' | 'revoked';
  enrolled_at: Date;
  revoked_at: Date | null;
  last_counter: number | string;
  last_seen_at: Date | null;
  last_version: string | null;
  last_state: unknown;
  lease_expires_at: Date | null;
}

export function createControlPlaneService(deps: ControlPlaneDeps): ControlPlaneService {
  const { db, key, config } = deps;
  const now = deps.clock ?? Date.now;
  const skewMs = config.heartbeat.maxClockSkewSeconds * 1000;
  const graceMs = config.lease.graceSeconds * 1000;
  // Parsed public keys by raw bytes: a cache of a pure function, bounded.
  const keyCache = new Map<string, ReturnType<typeof ed25519PublicKey>>();
  const publicKeyOf = (raw: Uint8Array): ReturnType<typeof ed25519PublicKey> => {
    const id = Buffer.from(raw).toString('base64url');
    let k = keyCache.get(id);
    if (!k) {
      if (keyCache.size >= 10_000) keyCache.clear();
      k = ed25519PublicKey(raw);
      keyCache.set(id, k);
    }
    return k;
  };
  // An enrolment's key never changes (re-enrolment makes a new enrolment id), so (node, enrolment) → key
  // is immutable and safe to remember per instance: the happy path is then one SQL statement, whose WHERE
  // still checks status, enrolment and counter in the database. Not shared state: a miss just reads it.
  const enrolmentKeys = new Map<string, Uint8Array>();
  const ENROLMENT_KEYS_MAX = 200_000;

  function leaseStateOf(status: string, expires: number | null, at: number): LeaseState {
    if (status === 'revoked') return 'revoked';
    if (expires === null) return 'none';
    if (at < expires) return 'valid';
    return at < expires + graceMs ? 'grace' : 'expired';
  }

  function summary(r: NodeRow): NodeSummary {
    const expires = toMs(r.lease_expires_at);
    return {
      name: r.name,
      status: r.status,
      enrolledAt: toIso(r.enrolled_at)!,
      revokedAt: toIso(r.revoked_at),
      lastCounter: Number(r.last_counter),
      lastSeenAt: toIso(r.last_seen_at),
      lastVersion: r.last_version,
      leaseExpiresAt: toIso(expires),
      leaseState: leaseStateOf(r.status, expires, now()),
    };
  }

  function makeLease(node: string, enrolment: string, counter: number, status: 'active' | 'revoked', at: number): SignedLease {
    const lease: Lease = {
      v: PROTOCOL_VERSION,
      node,
      enrolment,
      status,
      counter,
      issuedAt: iso(at),
      notBefore: iso(at),
      // A revocation expires at once and carries no grace: the node stops at its next heartbeat.
      expiresAt: iso(status === 'active' ? at + config.lease.validitySeconds * 1000 : at),
      graceSeconds: status === 'active' ? config.lease.graceSeconds : 0,
      maxClockSkewSeconds: config.heartbeat.maxClockSkewSeconds,
      heartbeatIntervalSeconds: config.heartbeat.intervalSeconds,
      plan: { ...config.lease.plan },
      newestRelease: config.lease.newestRelease,
    };
    return { lease, signature: signWith(key.privateKey, DOMAIN.lease, lease) };
  }

  function checkName(name: string): void {
    if (typeof name !== 'string' || !NODE_NAME_RE.test(name)) throw new CpError(CP_ERRORS.NODE_NAME_INVALID, 'a node name is 1-63 characters of [a-z0-9-], starting with a letter or digit');
  }

  function checkSkew(time: string, at: number): void {
    const t = Date.parse(time);
    if (!Number.isFinite(t) || Math.abs(t - at) > skewMs) {
      throw new CpError(CP_ERRORS.CLOCK_SKEW, `the message time is more than ${config.heartbeat.maxClockSkewSeconds} s from the control plane's clock`);
    }
  }

  async function nodeRow(name: string): Promise<NodeRow | undefined> {
    const rows = await db.query<NodeRow>('SELECT * FROM nodes WHERE name = $1', [name]);
    return rows[0];
  }

  return {
    async createToken(nodeName, ttlSeconds) {
      checkName(nodeName);
      if (!Number.isInteger(ttlSeconds) || ttlSeconds < 1 || ttlSeconds > 7 * 86400) throw new CpError(CP_ERRORS.USAGE, 'a token lives 1 s to 7 days');
      const existing = await nodeRow(nodeName);
      if (existing?.status === 'revoked') throw new CpError(CP_ERRORS.NODE_REVOKED, `node ${nodeName} is revoked; enrol it under a new name`);
      const token = `phcp_${randomBytes(32).toString('base64url')}`;
      const at = now();
      const expiresAt = iso(at + ttlSeconds * 1000);
      await db.query('INSERT INTO enrol_tokens (token_sha256, node_name, created_at, expires_at) VALUES ($1, $2, $3, $4)', [sha256Hex(token), nodeName, new Date(at), new Date(expiresAt)]);
      return { token, node: nodeName, expiresAt };
    },

    async enrol(body) {
      const problem = schemaProblem(checkEnrolRequest, body);
      if (problem) throw new CpError(CP_ERRORS.SCHEMA_VIOLATION, `enrolment refused: ${problem}`);
      const req = body as EnrolRequest;
      const at = now();
      const tokenSha256 = sha256Hex(req.token);
      if (req.claim.tokenSha256 !== tokenSha256) throw new CpError(CP_ERRORS.BAD_SIGNATURE, 'the signed claim does not cover this token');
      const raw = Buffer.from(req.claim.publicKey, 'base64url');
      if (raw.length !== 32 || !verifySignature(publicKeyOf(raw), DOMAIN.enrol, req.claim, req.signature)) {
        throw new CpError(CP_ERRORS.BAD_SIGNATURE, 'the enrolment claim is not signed by the key it carries');
      }
      checkSkew(req.claim.time, at);
      const enrolment = randomBytes(16).toString('base64url');
      const name = await db.transaction(async (q) => {
        const used = await q.query<{ node_name: string }>(
          'UPDATE enrol_tokens SET used_at = $2 WHERE token_sha256 = $1 AND used_at IS NULL AND expires_at > $2 RETURNING node_name',
          [tokenSha256, new Date(at)],
        );
        if (used.length === 0) {
          const [t] = await q.query<{ used_at: Date | null }>('SELECT used_at FROM enrol_tokens WHERE token_sha256 = $1', [tokenSha256]);
          if (!t) throw new CpError(CP_ERRORS.TOKEN_UNKNOWN, 'unknown enrolment token');
          if (t.used_at !== null) throw new CpError(CP_ERRORS.TOKEN_USED, 'this enrolment token was already used');
          throw new CpError(CP_ERRORS.TOKEN_EXPIRED, 'this enrolment token has expired');
        }
        const nodeName = used[0]!.node_name;
        // Re-enrolment (a restored node, or a new key) keeps the name, starts a new enrolment and counter;
        // heartbeats of the old enrolment are refused from now on. A revoked node stays revoked.
        const upserted = await q.query<{ name: string }>(
          `INSERT INTO nodes (name, public_key, enrolment, status, enrolled_at, last_counter, lease_expires_at)
           VALUES ($1, $2, $3, 'active', $4, 0, $5)
           ON CONFLICT (name) DO UPDATE SET public_key = EXCLUDED.public_key, enrolment = EXCLUDED.enrolment,
             enrolled_at = EXCLUDED.enrolled_at, last_counter = 0, lease_expires_at = EXCLUDED.lease_expires_at
           WHERE nodes.status = 'active'
           RETURNING name`,
          [nodeName, raw, enrolment, new Date(at), new Date(at + config.lease.validitySeconds * 1000)],
        );
        if (upserted.length === 0) throw new CpError(CP_ERRORS.NODE_REVOKED, `node ${nodeName} is revoked`);
        return nodeName;
      });
      return makeLease(name, enrolment, 0, 'active', at);
    },

    async heartbeat(body) {
      const problem = schemaProblem(checkHeartbeatRequest, body);
      if (problem) throw new CpError(CP_ERRORS.SCHEMA_VIOLATION, `heartbeat refused: ${problem}`);
      const req = body as HeartbeatRequest;
      const hb = req.heartbeat;
      const at = now();
      const cacheId = `${hb.node}/${hb.enrolment}`;
      const known = enrolmentKeys.get(cacheId);
      if (known) {
        if (!verifySignature(publicKeyOf(known), DOMAIN.heartbeat, hb, req.signature)) throw new CpError(CP_ERRORS.BAD_SIGNATURE, 'the heartbeat is not signed by the enrolled key of this node');
      } else {
        const row = await nodeRow(hb.node);
        if (!row) throw new CpError(CP_ERRORS.NODE_UNKNOWN, 'unknown node');
        if (!verifySignature(publicKeyOf(row.public_key), DOMAIN.heartbeat, hb, req.signature)) throw new CpError(CP_ERRORS.BAD_SIGNATURE, 'the heartbeat is not signed by the enrolled key of this node');
        if (row.status === 'revoked') {
          // Signed, so the node can trust it and stop serving; nothing is recorded.
          throw new CpError(CP_ERRORS.NODE_REVOKED, 'this node is revoked', { details: { lease: makeLease(row.name, row.enrolment, hb.counter, 'revoked', at) } });
        }
        if (row.enrolment !== hb.enrolment) throw new CpError(CP_ERRORS.ENROLMENT_SUPERSEDED, 'this enrolment was superseded by a newer one of the same node');
        if (enrolmentKeys.size >= ENROLMENT_KEYS_MAX) enrolmentKeys.clear();
        enrolmentKeys.set(cacheId, row.public_key);
      }
      checkSkew(hb.time, at);
      const expires = at + config.lease.validitySeconds * 1000;
      const state = JSON.stringify({ time: hb.time, counters: hb.counters, pool: hb.pool, ...(hb.auditHead ? { auditHead: hb.auditHead } : {}), ...(hb.update ? { update: hb.update } : {}) });
      // One statement: the counter condition and the history insert are atomic, so two instances racing on
      // the same node (or a replay arriving at another instance) can never both succeed or go backwards.
      const done = await db.query<{ counter: string | number }>(
        `WITH u AS (
           UPDATE nodes SET last_counter = $3, last_seen_at = $4, last_version = $5, last_state = $6::jsonb, lease_expires_at = $7
           WHERE name = $1 AND enrolment = $2 AND status = 'active' AND last_counter < $3
           RETURNING name)
         INSERT INTO heartbeats (node_name, enrolment, counter, received_at, body)
         SELECT name, $2, $3, $4, $8::jsonb FROM u
         RETURNING counter`,
        [hb.node, hb.enrolment, hb.counter, new Date(at), hb.version, state, new Date(expires), JSON.stringify(req)],
      );
      if (done.length === 0) {
        const again = await nodeRow(hb.node);
        if (again?.status === 'revoked') throw new CpError(CP_ERRORS.NODE_REVOKED, 'this node is revoked', { details: { lease: makeLease(again.name, again.enrolment, hb.counter, 'revoked', at) } });
        if (!again) throw new CpError(CP_ERRORS.NODE_UNKNOWN, 'unknown node');
        if (again.enrolment !== hb.enrolment) throw new CpError(CP_ERRORS.ENROLMENT_SUPERSEDED, 'this enrolment was superseded by a newer one of the same node');
        throw new CpError(CP_ERRORS.COUNTER_STALE, `counter ${hb.counter} is not above the last accepted ${Number(again.last_counter)} (a replay, an old heartbeat, or overtaken by a concurrent one)`);
      }
      return makeLease(hb.node, hb.enrolment, hb.counter, 'active', at);
    },

    async listNodes() {
      return (await db.query<NodeRow>('SELECT * FROM nodes ORDER BY name')).map(summary);
    },

    async showNode(name) {
      checkName(name);
      const row = await nodeRow(name);
      if (!row) throw new CpError(CP_ERRORS.NODE_UNKNOWN, `unknown node ${name}`);
      const history = await db.query<{ counter: string | number; received_at: Date }>(
        'SELECT counter, received_at FROM heartbeats WHERE node_name = $1 AND enrolment = $2 ORDER BY counter DESC LIMIT 20',
        [name, row.enrolment],
      );
      return {
        ...summary(row),
        publicKeyFingerprint: `sha256:${sha256Hex(row.public_key)}`,
        lastState: row.last_state,
        history: history.map((h) => ({ counter: Number(h.counter), receivedAt: toIso(h.received_at)! })),
      };
    },

    async revoke(name) {
      checkName(name);
      const at = new Date(now());
      const rows = await db.transaction(async (q) => {
        await q.query('DELETE FROM enrol_tokens WHERE node_name = $1 AND used_at IS NULL', [name]);
        return q.query<NodeRow>("UPDATE nodes SET status = 'revoked', revoked_at = COALESCE(revoked_at, $2) WHERE name = $1 RETURNING *", [name, at]);
      });
      if (!rows[0]) throw new CpError(CP_ERRORS.NODE_UNKNOWN, `unknown node ${name}`);
      return summary(rows[0]);
    },

    async prune() {
      const at = now();
      const hb = await db.query('DELETE FROM heartbeats WHERE received_at < $1 RETURNING 1', [new Date(at - config.heartbeat.historyDays * 86_400_000)]);
      const tokens = await db.query('DELETE FROM enrol_tokens WHERE expires_at < $1 RETURNING 1', [new Date(at - 86_400_000)]);
      return { heartbeats: hb.length, tokens: tokens.length };
    },

    async nodeStates() {
      const out: Record<LeaseState, number> = { valid: 0, grace: 0, expired: 0, revoked: 0, none: 0 };
      const at = now();
      const rows = await db.query<{ state: LeaseState; n: string | number }>(
        `SELECT CASE WHEN status = 'revoked' THEN 'revoked' WHEN lease_expires_at IS NULL THEN 'none'
                     WHEN lease_expires_at > $1 THEN 'valid' WHEN lease_expires_at > $2 THEN 'grace' ELSE 'expired' END AS state,
                count(*) AS n
         FROM nodes GROUP BY 1`,
        [new Date(at), new Date(at - graceMs)],
      );
      for (const r of rows) out[r.state] += Number(r.n);
      return out;
    },
  };
}
