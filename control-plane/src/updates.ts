// The update repository (issue 12): the control plane serves a TUF repository directory as static files
// under /v1/updates/ (metadata/ and targets/), and keeps its timestamp fresh with the online timestamp key.
// The timestamp lives in Postgres (table update_timestamp) so N instances serve the same one; only the
// instance that wins a Postgres advisory lock re-signs it, with version = newest + 1. Nothing here can
// change what a node installs: targets are signed by the maintainers, offline.
import { createReadStream, existsSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { Metadata, MetadataKind, MetaFile, Timestamp } from '@tufjs/models';
import { createHash } from 'node:crypto';
import type { Db } from './db.ts';
import { CP_ERRORS, CpError } from './errors.ts';
import { readPrivateKey, tufSigner, type PrivateKeyFile } from '../../src/updates/keys.ts';

/** Advisory lock key of the timestamp re-signer (one signer at a time across the fleet). */
export const TIMESTAMP_LOCK = 7_311_402_012;
const METADATA_RE = /^(?:\d{1,6}\.root|root|targets|snapshot|timestamp)\.json$/;
const TARGET_RE = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}(?:\.bundles\/[0-9a-f]{64}\.sigstore\.json)?$/;

type JSONObject = Parameters<typeof Metadata.fromJSON>[1];

interface TimestampRow {
  version: number;
  snapshot_version: number;
  expires: Date | string;
  body: string;
}

async function dbTimestamp(db: Pick<Db, 'query'>): Promise<TimestampRow | undefined> {
  return (await db.query<TimestampRow>('SELECT version, snapshot_version, expires, body FROM update_timestamp WHERE id = 1'))[0];
}

function fileTimestamp(repoDir: string): { version: number; body: string } | undefined {
  const p = join(repoDir, 'metadata', 'timestamp.json');
  if (!existsSync(p)) return undefined;
  const body = readFileSync(p, 'utf8');
  return { version: (JSON.parse(body) as { signed: { version: number } }).signed.version, body };
}

export function registerUpdateRepository(app: FastifyInstance, deps: { repoDir: string; db: Pick<Db, 'query'> }): void {
  const { repoDir } = deps;
  app.get('/v1/updates/metadata/:file', async (request, reply) => {
    const file = (request.params as { file: string }).file;
    if (!METADATA_RE.test(file)) throw new CpError(CP_ERRORS.NOT_FOUND, 'no such metadata');
    if (file === 'timestamp.json') {
      // The newer of the re-signed one (database) and the one `phantoma-release publish` wrote.
      const row = await dbTimestamp(deps.db);
      const onDisk = fileTimestamp(repoDir);
      const body = row && (!onDisk || row.version >= onDisk.version) ? row.body : onDisk?.body;
      if (!body) throw new CpError(CP_ERRORS.NOT_FOUND, 'no timestamp yet');
      return reply.type('application/json').header('cache-control', 'no-store').send(body);
    }
    const p = join(repoDir, 'metadata', file);
    if (!existsSync(p)) throw new CpError(CP_ERRORS.NOT_FOUND, 'no such metadata');
    return reply.type('application/json').header('cache-control', 'no-store').send(readFileSync(p));
  });
  app.get('/v1/updates/targets/*', async (request, reply) => {
    const rel = (request.params as { '*': string })['*'];
    if (!TARGET_RE.test(rel)) throw new CpError(CP_ERRORS.NOT_FOUND, 'no such target');
    const p = join(repoDir, 'targets', rel);
    let size: number;
    try {
      const st = statSync(p);
      if (!st.isFile()) throw new Error('not a file');
      size = st.size;
    } catch {
      throw new CpError(CP_ERRORS.NOT_FOUND, 'no such target');
    }
    return reply.type('application/octet-stream').header('content-length', size).send(createReadStream(p));
  });
}

export interface TimestampResigner {
  /** One attempt: re-signs if this instance wins the lock and the timestamp is stale. Returns the new version or undefined. */
  tick(): Promise<number | undefined>;
  start(): void;
  stop(): void;
}

export function createTimestampResigner(deps: {
  db: Db;
  repoDir: string;
  key: PrivateKeyFile | string;
  everyMs: number;
  expiresInMs: number;
  /** Re-sign when less than this is left before expiry. */
  renewBeforeMs: number;
  clock?: () => number;
  onError?: (err: Error) => void;
}): TimestampResigner {
  const key = typeof deps.key === 'string' ? readPrivateKey(deps.key) : deps.key;
  const sign = tufSigner(key);
  const clock = deps.clock ?? Date.now;
  let timer: NodeJS.Timeout | undefined;
  async function tick(): Promise<number | undefined> {
    const snapPath = join(deps.repoDir, 'metadata', 'snapshot.json');
    if (!existsSync(snapPath)) return undefined;
    return deps.db.transaction(async (q) => {
      const [lock] = await q.query<{ ok: boolean }>('SELECT pg_try_advisory_xact_lock($1) AS ok', [TIMESTAMP_LOCK]);
      if (!lock?.ok) return undefined;
      const snapBytes = readFileSync(snapPath);
      const snapVersion = (JSON.parse(snapBytes.toString('utf8')) as { signed: { version: number } }).signed.version;
      const row = await dbTimestamp(q);
      const onDisk = fileTimestamp(deps.repoDir);
      const now = clock();
      const fresh = row && row.snapshot_version === snapVersion && new Date(row.expires).getTime() - now > deps.renewBeforeMs && row.version >= (onDisk?.version ?? 0);
      if (fresh) return undefined;
      const version = Math.max(row?.version ?? 0, onDisk?.version ?? 0) + 1;
      const expires = new Date(Math.floor((now + deps.expiresInMs) / 1000) * 1000);
      const ts = new Timestamp({
        version,
        specVersion: '1.0.31',
        expires: expires.toISOString().replace('.000Z', 'Z'),
        snapshotMeta: new MetaFile({ version: snapVersion, length: snapBytes.length, hashes: { sha256: createHash('sha256').update(snapBytes).digest('hex') } }),
      });
      const md = new Metadata(ts);
      md.sign(sign, false);
      const body = JSON.stringify(md.toJSON(), null, 1);
      // Parsed back as a client would, so a malformed one is never stored.
      Metadata.fromJSON(MetadataKind.Timestamp, JSON.parse(body) as JSONObject);
      await q.query(
        `INSERT INTO update_timestamp (id, version, snapshot_version, expires, body, signed_at) VALUES (1, $1, $2, $3, $4, now())
         ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, snapshot_version = EXCLUDED.snapshot_version, expires = EXCLUDED.expires, body = EXCLUDED.body, signed_at = now()`,
        [version, snapVersion, expires.toISOString(), body],
      );
      return version;
    });
  }
  return {
    tick,
    start() {
      if (timer) return;
      timer = setInterval(() => {
        tick().catch((err: Error) => deps.onError?.(err));
      }, deps.everyMs);
      timer.unref();
      tick().catch((err: Error) => deps.onError?.(err));
    },
    stop() {
      if (timer) clearInterval(timer);
      timer = undefined;
    },
  };
}
