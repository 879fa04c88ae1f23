// The control plane's one database interface over two engines: embedded PGlite (Postgres in WASM, the
// default) and a real Postgres server through `pg` (fleets: N stateless instances on one server). Both run
// the same SQL and the same migrations (control-plane/migrations/*.sql).
import { readdirSync, readFileSync, mkdirSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CP_ERRORS, CpError } from './errors.ts';

export interface Queryable {
  query<T = Record<string, unknown>>(sql: string, params?: unknown[]): Promise<T[]>;
  /** Several statements, no parameters (migrations). */
  exec(sql: string): Promise<void>;
}

export interface Db extends Queryable {
  readonly kind: 'pglite' | 'postgres';
  transaction<T>(fn: (q: Queryable) => Promise<T>): Promise<T>;
  close(): Promise<void>;
}

export const MIGRATIONS_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'migrations');
/** Key of the advisory lock that serialises migrations between instances. */
const MIGRATION_LOCK = 7_311_402_011;

function dbFailed(err: unknown): CpError {
  if (err instanceof CpError) return err;
  return new CpError(CP_ERRORS.DATABASE_FAILED, `database error: ${(err as Error).message}`, { cause: err });
}

async function openPglite(dataDir: string | undefined): Promise<Db> {
  const { PGlite } = await import('@electric-sql/pglite');
  if (dataDir) mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  const pg = new PGlite(dataDir);
  await pg.waitReady;
  const wrap = (q: { query: (s: string, p?: unknown[]) => Promise<{ rows: unknown[] }>; exec: (s: string) => Promise<unknown> }): Queryable => ({
    async query<T>(sql: string, params?: unknown[]) {
      try {
        return (await q.query(sql, params)).rows as T[];
      } catch (err) {
        throw dbFailed(err);
      }
    },
    async exec(sql) {
      try {
        await q.exec(sql);
      } catch (err) {
        throw dbFailed(err);
      }
    },
  });
  return {
    kind: 'pglite',
    ...wrap(pg),
    transaction: (fn) => pg.transaction((tx) => fn(wrap(tx))),
    close: () => pg.close(),
  };
}

async function openPostgres(url: string): Promise<Db> {
  const { default: pgModule } = await import('pg');
  const pool = new pgModule.Pool({ connectionString: url, max: 8, connectionTimeoutMillis: 10_000, idleTimeoutMillis: 30_000 });
  // An idle client's network error must not crash the process; the next query reports it.
  pool.on('error', () => {});
  type Client = { query: (s: string, p?: unknown[]) => Promise<{ rows: unknown[] }> };
  const wrap = (c: Client): Queryable => ({
    async query<T>(sql: string, params?: unknown[]) {
      try {
        return (await c.query(sql, params)).rows as T[];
      } catch (err) {
        throw dbFailed(err);
      }
    },
    async exec(sql) {
      try {
        await c.query(sql);
      } catch (err) {
        throw dbFailed(err);
      }
    },
  });
  return {
    kind: 'postgres',
    ...wrap(pool),
    async transaction(fn) {
      let client;
      try {
        client = await pool.connect();
      } catch (err) {
        throw dbFailed(err);
      }
      try {
        await client.query('BEGIN');
        const out = await fn(wrap(client));
        await client.query('COMMIT');
        return out;
      } catch (err) {
        await client.query('ROLLBACK').catch(() => {});
        throw dbFailed(err);
      } finally {
        client.release();
      }
    },
    close: () => pool.end(),
  };
}

/** `database` as in the config: "pglite" (in <dataDir>/db), "pglite:memory", "pglite:<dir>", or a postgres:// URL. */
export async function openDb(database: string, dataDir: string): Promise<Db> {
  try {
    if (database === 'pglite') return await openPglite(join(dataDir, 'db'));
    if (database === 'pglite:memory') return await openPglite(undefined);
    if (database.startsWith('pglite:')) return await openPglite(database.slice('pglite:'.length));
    return await openPostgres(database);
  } catch (err) {
    throw dbFailed(err);
  }
}

/** Applies every migration not yet recorded, in file-name order, each once even with N instances starting. */
export async function migrate(db: Db, dir = MIGRATIONS_DIR): Promise<string[]> {
  const files = readdirSync(dir).filter((f) => /^\d{3}_[a-z0-9_]+\.sql$/.test(f)).sort();
  return db.transaction(async (q) => {
    await q.query('SELECT pg_advisory_xact_lock($1)', [MIGRATION_LOCK]);
    await q.exec('CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())');
    const done = new Set((await q.query<{ name: string }>('SELECT name FROM schema_migrations')).map((r) => r.name));
    const applied: string[] = [];
    for (const f of files) {
      if (done.has(f)) continue;
      await q.exec(readFileSync(join(dir, f), 'utf8'));
      await q.query('INSERT INTO schema_migrations (name) VALUES ($1)', [f]);
      applied.push(f);
    }
    return applied;
  });
}
