// API keys for the plaintext API. A key is shown once at creation; only its SHA-256 is stored (a key has
// 256 random bits, so a fast hash is enough — there is nothing to brute-force). The store is one JSON file,
// written atomically; the gateway re-reads it when it changes, so create/revoke take effect at once.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { writeFileAtomic } from '../util/atomic-file.ts';
import { PhantomaError, ERRORS } from '../errors.ts';

export interface ApiKeyRecord {
  id: string;
  name: string;
  hash: string;
  createdAt: string;
  revokedAt: string | null;
}

interface StoreFile {
  version: 1;
  keys: ApiKeyRecord[];
}

const KEY_PATTERN = /^phk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$/;

function hashSecret(secret: string): string {
  return createHash('sha256').update(secret).digest('hex');
}

export interface ApiKeyStore {
  create(name: string): { id: string; key: string };
  list(): Array<Omit<ApiKeyRecord, 'hash'>>;
  revoke(id: string): void;
  /** The active record the presented key belongs to, or undefined. */
  verify(presented: string): ApiKeyRecord | undefined;
}

export function createApiKeyStore(deps: { path: string; clock?: () => Date }): ApiKeyStore {
  const now = (): string => (deps.clock?.() ?? new Date()).toISOString();
  let cache: { mtimeMs: number; size: number; byId: Map<string, ApiKeyRecord> } | undefined;

  function read(): StoreFile {
    let text: string;
    try {
      text = readFileSync(deps.path, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { version: 1, keys: [] };
      throw err;
    }
    const parsed = JSON.parse(text) as StoreFile;
    if (parsed?.version !== 1 || !Array.isArray(parsed.keys)) {
      throw new PhantomaError(ERRORS.STATE_FILE_INVALID, `API key store ${deps.path} is not a version 1 store; refusing to touch it`);
    }
    return parsed;
  }

  function current(): Map<string, ApiKeyRecord> {
    let st: { mtimeMs: number; size: number } = { mtimeMs: -1, size: -1 };
    try {
      st = statSync(deps.path);
    } catch {
      /* no store yet: no keys */
    }
    if (!cache || cache.mtimeMs !== st.mtimeMs || cache.size !== st.size) {
      cache = { mtimeMs: st.mtimeMs, size: st.size, byId: new Map(read().keys.map((k) => [k.id, k])) };
    }
    return cache.byId;
  }

  function write(store: StoreFile): void {
    writeFileAtomic(deps.path, JSON.stringify(store, null, 2) + '\n', 0o600);
    cache = undefined;
  }

  return {
    create(name) {
      const store = read();
      const id = randomBytes(6).toString('hex');
      const secret = randomBytes(32).toString('base64url');
      store.keys.push({ id, name, hash: hashSecret(secret), createdAt: now(), revokedAt: null });
      write(store);
      return { id, key: `phk_${id}_${secret}` };
    },
    list: () => read().keys.map(({ hash: _hash, ...rest }) => rest),
    revoke(id) {
      const store = read();
      const rec = store.keys.find((k) => k.id === id);
      if (!rec) throw new PhantomaError(ERRORS.API_KEY_NOT_FOUND, `no API key with id ${id}`);
      rec.revokedAt ??= now();
      write(store);
    },
    verify(presented) {
      const m = KEY_PATTERN.exec(presented);
      if (!m) return undefined;
      const rec = current().get(m[1]!);
      if (!rec || rec.revokedAt) return undefined;
      const a = Buffer.from(hashSecret(m[2]!), 'hex');
      const b = Buffer.from(rec.hash, 'hex');
      return a.length === b.length && timingSafeEqual(a, b) ? rec : undefined;
    },
  };
}
