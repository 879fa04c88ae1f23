// Atomic file replacement: write a temp file beside the target, fsync it, rename over the target, fsync
// the directory. A crash at any point leaves either the old file or the new one, never a partial one.
import { openSync, writeSync, fsyncSync, closeSync, renameSync, unlinkSync, mkdirSync } from 'node:fs';
import { dirname, basename, join } from 'node:path';
import { randomBytes } from 'node:crypto';

export interface AtomicWriter {
  readonly fd: number;
  readonly tempPath: string;
  write(chunk: Uint8Array): void;
  /** fsync, rename into place, fsync the directory. */
  commit(): void;
  /** Remove the temp file; the target is untouched. Safe to call after commit (then a no-op). */
  abort(): void;
}

export function fsyncDir(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export function openAtomic(target: string, mode = 0o644): AtomicWriter {
  const dir = dirname(target);
  mkdirSync(dir, { recursive: true });
  const tempPath = join(dir, `.${basename(target)}.${randomBytes(6).toString('hex')}.tmp`);
  const fd = openSync(tempPath, 'wx', mode);
  let done = false;
  return {
    fd,
    tempPath,
    write(chunk) {
      let off = 0;
      while (off < chunk.length) off += writeSync(fd, chunk, off, chunk.length - off);
    },
    commit() {
      fsyncSync(fd);
      closeSync(fd);
      done = true;
      renameSync(tempPath, target);
      fsyncDir(dir);
    },
    abort() {
      if (done) return;
      done = true;
      try {
        closeSync(fd);
      } catch {
        /* already closed */
      }
      try {
        unlinkSync(tempPath);
      } catch {
        /* already gone */
      }
    },
  };
}

export function writeFileAtomic(target: string, data: string | Uint8Array, mode = 0o644): void {
  const w = openAtomic(target, mode);
  try {
    w.write(typeof data === 'string' ? Buffer.from(data) : data);
    w.commit();
  } catch (err) {
    w.abort();
    throw err;
  }
}
