// The vault on disk: read (with credential), create exclusively, replace atomically. Each write goes
// temp file → fsync → rename over the old vault → fsync the directory, so a crash at any step leaves the
// old vault or the new one, never neither and never a half-written one. Leftover temp files of a crashed
// write are removed on the next read (no older sealed copy is kept beside the vault).
import { closeSync, existsSync, fsyncSync, linkSync, openSync, readdirSync, readFileSync, renameSync, unlinkSync, writeFileSync, writeSync, mkdirSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { ERRORS, PhantomaError } from '../errors.ts';
import { fsyncDir } from '../util/atomic-file.ts';
import { openFile, sealFile, newSealKeys, KDF_SCRYPT, type Credential, type FileKind, type ScryptParams, type SealKeys } from './format.ts';
import { parseVaultContents, serializeVaultContents, type VaultContents } from './contents.ts';
import { processExists } from '../util/process.ts';

/** Write steps, in order; a test hook runs after each (the crash test SIGKILLs the writer there). */
export const WRITE_STEPS = ['temp-created', 'temp-half-written', 'temp-written', 'temp-synced', 'renamed', 'dir-synced'] as const;
export type WriteStep = (typeof WRITE_STEPS)[number];

export interface WriteOptions {
  /** Test hook: called after each step. */
  onStep?: (step: WriteStep) => void;
}

export interface OpenedVault {
  contents: VaultContents;
  keys: SealKeys;
}

/** Temp files are `.<vault name>.<writer pid>.<random>.tmp`: the pid tells a crashed writer's from a live one's. */
function tempPattern(path: string): (name: string) => boolean {
  const prefix = `.${basename(path)}.`;
  return (name) => name.startsWith(prefix) && name.endsWith('.tmp') && /^\d+\.[0-9a-f]{12}$/.test(name.slice(prefix.length, -4));
}

function writerAlive(pid: number): boolean {
  return pid === process.pid || processExists(pid);
}

/** Removes temp files a crashed write left beside the vault (sealed, but an extra copy all the same). */
export function removeStaleTemps(path: string): number {
  const dir = dirname(path);
  let removed = 0;
  let names: string[] = [];
  try {
    names = readdirSync(dir);
  } catch {
    return 0;
  }
  const prefix = `.${basename(path)}.`;
  for (const name of names.filter(tempPattern(path))) {
    // A live writer's temp file is its next vault: leave it (it is renamed or removed by that writer).
    if (writerAlive(Number(name.slice(prefix.length).split('.')[0]))) continue;
    try {
      unlinkSync(join(dir, name));
      removed++;
    } catch {
      /* gone already */
    }
  }
  // And the lock of a writer that died holding it.
  const lock = join(dir, `${prefix}lock`);
  try {
    const holder = Number(readFileSync(lock, 'utf8'));
    if (!(Number.isSafeInteger(holder) && holder > 0 && writerAlive(holder))) {
      unlinkSync(lock);
      removed++;
    }
  } catch {
    /* no lock */
  }
  if (removed) fsyncDir(dir);
  return removed;
}

function readSealed(path: string, kind: FileKind): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new PhantomaError(ERRORS.VAULT_NOT_FOUND, kind === 'vault' ? `no vault at ${path} (phantoma vault init makes one)` : `no backup at ${path}`);
    }
    throw new PhantomaError(ERRORS.VAULT_CORRUPT, `cannot read ${path}: ${(err as Error).message}`, { cause: err });
  }
}

export function openSealedBytes(file: Buffer, kind: FileKind, using: Credential | SealKeys): OpenedVault {
  const { plaintext, keys } = openFile(file, kind, using);
  try {
    return { contents: parseVaultContents(plaintext), keys };
  } finally {
    plaintext.fill(0);
  }
}

export function readVault(path: string, credential: Credential | SealKeys, kind: FileKind = 'vault'): OpenedVault {
  if (kind === 'vault') removeStaleTemps(path);
  return openSealedBytes(readSealed(path, kind), kind, credential);
}

/** Writes `bytes` to a fresh temp file beside `path`, synced; returns its name. */
function writeTemp(path: string, bytes: Buffer, mode: number, onStep: (s: WriteStep) => void): string {
  const dir = dirname(path);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const temp = join(dir, `.${basename(path)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
  const fd = openSync(temp, 'wx', mode);
  try {
    onStep('temp-created');
    const half = bytes.length >> 1;
    for (const [from, to] of [[0, half], [half, bytes.length]] as const) {
      let off = from;
      while (off < to) off += writeSync(fd, bytes, off, to - off);
      onStep(to === half ? 'temp-half-written' : 'temp-written');
    }
    fsyncSync(fd);
    onStep('temp-synced');
  } catch (err) {
    closeSync(fd);
    try {
      unlinkSync(temp);
    } catch {
      /* already gone */
    }
    throw err;
  }
  closeSync(fd);
  return temp;
}

/** Replaces the vault (or writes a backup) atomically. */
export function writeSealed(path: string, kind: FileKind, keys: SealKeys, contents: VaultContents, opts: WriteOptions = {}): void {
  const onStep = opts.onStep ?? (() => {});
  const plain = serializeVaultContents(contents);
  const bytes = sealFile(kind, keys, plain);
  plain.fill(0);
  const temp = writeTemp(path, bytes, 0o600, onStep);
  try {
    renameSync(temp, path);
  } catch (err) {
    try {
      unlinkSync(temp);
    } catch {
      /* already gone */
    }
    throw err;
  }
  onStep('renamed');
  fsyncDir(dirname(path));
  onStep('dir-synced');
}

/** Creates a file that must not exist yet: link(2) of the synced temp file fails with EEXIST instead of overwriting. */
export function createSealed(path: string, kind: FileKind, keys: SealKeys, contents: VaultContents, opts: WriteOptions = {}): void {
  const onStep = opts.onStep ?? (() => {});
  if (existsSync(path)) throw new PhantomaError(ERRORS.VAULT_EXISTS, `${path} already exists; it is never overwritten`);
  const plain = serializeVaultContents(contents);
  const bytes = sealFile(kind, keys, plain);
  plain.fill(0);
  const temp = writeTemp(path, bytes, 0o600, onStep);
  try {
    linkSync(temp, path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new PhantomaError(ERRORS.VAULT_EXISTS, `${path} already exists; it is never overwritten`);
    throw err;
  } finally {
    unlinkSync(temp);
  }
  onStep('renamed');
  fsyncDir(dirname(path));
  onStep('dir-synced');
}

export function createVault(path: string, credential: Credential, params: ScryptParams, contents: VaultContents, opts: WriteOptions = {}): SealKeys {
  if (existsSync(path)) throw new PhantomaError(ERRORS.VAULT_EXISTS, `a vault already exists at ${path}; it is never overwritten`);
  const keys = newSealKeys(credential, params);
  createSealed(path, 'vault', keys, contents, opts);
  return keys;
}

/** Read, change, write back under the same keys (no second KDF run). */
/**
 * Read, change, write back under the same keys (no second KDF run). One writer at a time: an update takes
 * `.<vault name>.lock` (O_EXCL, holding its pid), so two commands cannot both read the old vault and the
 * second silently drop the first's change. A lock whose pid is gone (a crash) is taken over.
 */
export function updateVault(path: string, credential: Credential | SealKeys, change: (c: VaultContents) => VaultContents, opts: WriteOptions = {}): OpenedVault {
  const release = lockVault(path);
  try {
    const opened = readVault(path, credential);
    const next = change(opened.contents);
    writeSealed(path, 'vault', opened.keys, next, opts);
    return { contents: next, keys: opened.keys };
  } finally {
    release();
  }
}

function lockVault(path: string): () => void {
  const lock = join(dirname(path), `.${basename(path)}.lock`);
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      // Made whole, then linked into place: a reader never sees a lock without its pid.
      const pending = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
      writeFileSync(pending, String(process.pid), { mode: 0o600 });
      try {
        linkSync(pending, lock);
      } finally {
        unlinkSync(pending);
      }
      return () => {
        try {
          unlinkSync(lock);
        } catch {
          /* gone */
        }
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new PhantomaError(ERRORS.VAULT_NOT_FOUND, `no vault at ${path} (phantoma vault init makes one)`);
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      let holder = NaN;
      try {
        holder = Number(readFileSync(lock, 'utf8'));
      } catch {
        /* removed meanwhile: retry */
      }
      if (Number.isSafeInteger(holder) && holder > 0 && holder !== process.pid && writerAlive(holder)) {
        throw new PhantomaError(ERRORS.VAULT_LOCKED, `the vault is being changed by process ${holder} (lock ${lock}); try again when it is done`);
      }
      try {
        unlinkSync(lock);
      } catch {
        /* someone else took it over */
      }
    }
  }
  throw new PhantomaError(ERRORS.VAULT_LOCKED, `cannot take the vault lock ${lock}`);
}

export function describeKdf(keys: SealKeys): string {
  return keys.kdf === KDF_SCRYPT ? `scrypt N=2^${keys.params.log2N} r=${keys.params.r} p=${keys.params.p}` : 'key file (HKDF-SHA256)';
}
