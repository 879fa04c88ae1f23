// The node's audit log: append-only JSON lines in `<dir>/audit.log`, each entry hash-chained to the one
// before it, fsynced, rotated by size with the chain carried across files (src/audit/README.md).
//
// One writer: the gateway process. `append` is synchronous (one writeSync of the whole line, then
// fsyncSync), so entries are never interleaved or reordered inside the process and an entry is on disk
// when `append` returns. A second writer process on the same directory would fork the chain; don't.
// Readers (`phantoma audit tail|verify`) use the functions below that never write.
import { createHash } from 'node:crypto';
import { closeSync, existsSync, fstatSync, fsyncSync, mkdirSync, openSync, readFileSync, readSync, readdirSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { fsyncDir } from '../util/atomic-file.ts';
import { resolveFromRoot } from '../paths.ts';
import { PhantomaError, ERRORS } from '../errors.ts';
import { checkAuditEvent, type AuditEvent } from './audit-events.ts';

// The audit log's error codes, in one place (the CLI and the tests use these too).
export const AUDIT_CHAIN_BROKEN = ERRORS.AUDIT_CHAIN_BROKEN;
export const AUDIT_EVENT_REFUSED = ERRORS.AUDIT_EVENT_REFUSED;
const CHAIN_BROKEN = AUDIT_CHAIN_BROKEN;
const EVENT_REFUSED = AUDIT_EVENT_REFUSED;

export const GENESIS = '0'.repeat(64);
export const LOG_NAME = 'audit.log';
const HEX64 = /^[0-9a-f]{64}$/;
const FILE_RE = /^audit\.log(?:\.([1-9][0-9]{0,5}))?$/;
/** Entries are a few hundred bytes (every field is capped), so the last 64 KiB hold many whole lines. */
const TAIL_WINDOW = 64 * 1024;

/** An entry as written: `{ seq, time, type, ...fields, prev, hash }`. */
export type AuditEntry = AuditEvent & { seq: number; time: string; prev: string; hash: string };

export interface ChainHead {
  seq: number;
  hash: string;
}

export interface VerifyProblem {
  /** File name inside the audit directory, e.g. `audit.log.2`. */
  file: string;
  /** 1-based line number inside that file. */
  line: number;
  seq?: number;
  reason: string;
}

export interface VerifyResult {
  ok: boolean;
  dir: string;
  /** Entries checked (up to the first problem). */
  entries: number;
  /** The files walked, oldest first. */
  files: Array<{ file: string; entries: number }>;
  /**
   * The first entry of the oldest remaining file. `genesis` when its prev is 64 zeros (nothing was ever
   * rotated away); otherwise older files were deleted by rotation and this prev is the trust anchor.
   */
  anchor: { file: string; seq: number; prev: string; genesis: boolean } | null;
  /** The last entry that verified. */
  head: ChainHead | null;
  problem?: VerifyProblem;
}

export interface AuditLog {
  /** Validates the event against the closed schema, appends it, fsyncs; returns the written entry. */
  append(event: AuditEvent): AuditEntry;
  /** Full verification of every file, oldest to newest. */
  verify(): VerifyResult;
  /** The last n entries, oldest first, across files. */
  tail(n: number): AuditEntry[];
  /** The chain head (for anchoring elsewhere, e.g. a heartbeat); null for an empty log. */
  head(): ChainHead | null;
  close(): void;
}

export interface AuditLogOptions {
  dir: string;
  clock?: () => Date;
  /** Rotate before a write would make audit.log larger than this. */
  maxFileBytes: number;
  /** Rotated files kept (audit.log.1 … audit.log.N); older ones are deleted. Default 10. */
  maxFiles?: number;
  /** fsync after every append (default true; off only for benchmarks). */
  fsync?: boolean;
  /**
   * Another closed vocabulary for a log in the same format (the heartbeat ledger, src/control/ledger.ts).
   * Same contract as checkAuditEvent: the problem, or undefined and `fields` filled in order.
   */
  check?: (event: unknown, fields: Array<[string, string | number | boolean]>) => string | undefined;
}

/** `<stateDir>/audit`, stateDir resolved like every configured path. */
export function auditDirOf(config: { stateDir: string }): string {
  return join(resolveFromRoot(config.stateDir), 'audit');
}

/** JSON with object keys sorted at every level: the byte string the hash covers. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const obj = value as Record<string, unknown>;
    const keys = Object.keys(obj).filter((k) => obj[k] !== undefined).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(obj[k])}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

/** SHA-256 (hex) over the canonical JSON of the entry without its `hash`. */
export function entryHash(entry: Record<string, unknown>): string {
  const { hash: _hash, ...rest } = entry;
  return createHash('sha256').update(canonicalJson(rest)).digest('hex');
}

interface LogFile {
  name: string;
  /** 0 for audit.log, i for audit.log.i (larger is older). */
  index: number;
}

/** The log's files, oldest first. */
function listFiles(dir: string): LogFile[] {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  const files: LogFile[] = [];
  for (const name of names) {
    const m = FILE_RE.exec(name);
    if (m) files.push({ name, index: m[1] === undefined ? 0 : Number(m[1]) });
  }
  return files.sort((a, b) => b.index - a.index);
}

type Parsed = { entry: AuditEntry } | { reason: string; seq?: number };

/** Parses one line and checks its own hash; says why when it cannot. */
function parseLine(text: string): Parsed {
  if (text.length === 0) return { reason: 'empty line' };
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return { reason: 'not valid JSON (a truncated or garbled line)' };
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return { reason: 'not a JSON object' };
  const e = value as Record<string, unknown>;
  if (typeof e.seq !== 'number' || !Number.isSafeInteger(e.seq) || e.seq < 1) return { reason: 'seq is missing or not a positive integer' };
  if (typeof e.time !== 'string' || typeof e.type !== 'string') return { reason: 'time or type is missing' };
  if (typeof e.prev !== 'string' || !HEX64.test(e.prev)) return { reason: 'prev is missing or not a SHA-256 hex digest' };
  if (typeof e.hash !== 'string' || !HEX64.test(e.hash)) return { reason: 'hash is missing or not a SHA-256 hex digest' };
  if (entryHash(e) !== e.hash) return { reason: 'hash does not match the entry (the line was edited)', seq: e.seq };
  return { entry: e as unknown as AuditEntry };
}

/** Why `entry` cannot follow `before`, or undefined when it links correctly. */
function linkProblem(before: ChainHead, entry: AuditEntry): string | undefined {
  if (entry.prev === before.hash && entry.seq === before.seq + 1) return undefined;
  if (entry.seq === before.seq + 1) return 'prev does not match the hash of the entry before it (a line was replaced, inserted or reordered)';
  if (entry.seq > before.seq + 1) return `seq ${entry.seq} follows seq ${before.seq}: a line was removed or reordered here`;
  return `seq ${entry.seq} follows seq ${before.seq}: lines are out of order`;
}

/** Splits file text into lines; `torn` when the text does not end in a newline (a partial last line). */
function splitLines(text: string): { lines: string[]; torn: boolean } {
  if (text.length === 0) return { lines: [], torn: false };
  const lines = text.split('\n');
  const torn = lines[lines.length - 1] !== '';
  if (!torn) lines.pop();
  return { lines, torn };
}

/** Full verification of the log in `dir`, oldest file to newest. Never writes. */
export function verifyAuditLog(dir: string): VerifyResult {
  const result: VerifyResult = { ok: true, dir, entries: 0, files: [], anchor: null, head: null };
  const fail = (problem: VerifyProblem): VerifyResult => Object.assign(result, { ok: false, problem });
  const files = listFiles(dir);
  let last: ChainHead | null = null;
  let lastFile: LogFile | undefined;
  for (const file of files) {
    const { lines, torn } = splitLines(readFileSync(join(dir, file.name), 'utf8'));
    const summary = { file: file.name, entries: 0 };
    result.files.push(summary);
    for (let i = 0; i < lines.length; i++) {
      const where = { file: file.name, line: i + 1 };
      if (torn && i === lines.length - 1) return fail({ ...where, reason: 'the last line is truncated (no newline at the end of the file)' });
      const parsed = parseLine(lines[i]!);
      if ('reason' in parsed) return fail({ ...where, ...(parsed.seq === undefined ? {} : { seq: parsed.seq }), reason: parsed.reason });
      const { entry } = parsed;
      if (last === null) {
        result.anchor = { file: file.name, seq: entry.seq, prev: entry.prev, genesis: entry.prev === GENESIS };
        if (entry.prev === GENESIS && entry.seq !== 1) return fail({ ...where, seq: entry.seq, reason: `the genesis entry has seq ${entry.seq}, not 1` });
      } else {
        let problem = linkProblem(last, entry);
        if (problem && i === 0 && lastFile) {
          const missing = lastFile.index - file.index > 1 ? `; ${Array.from({ length: lastFile.index - file.index - 1 }, (_, k) => `${LOG_NAME}.${lastFile!.index - k - 1}`).join(', ')} missing` : '';
          problem += ` (across files: ${lastFile.name} ends at seq ${last.seq}${missing})`;
        }
        if (problem) return fail({ ...where, seq: entry.seq, reason: problem });
      }
      last = { seq: entry.seq, hash: entry.hash };
      result.head = last;
      result.entries++;
      summary.entries++;
    }
    if (lines.length > 0) lastFile = file;
  }
  return result;
}

function brokenError(dir: string, problem: VerifyProblem | undefined, fallback: string): PhantomaError {
  const where = problem ? `${problem.file} line ${problem.line}: ${problem.reason}` : fallback;
  return new PhantomaError(CHAIN_BROKEN, `audit log in ${dir} is damaged: ${where}`, problem ? { details: { ...problem } } : undefined);
}

/** The last n entries in `dir`, oldest first, across files. Never writes. */
export function tailAuditLog(dir: string, n: number): AuditEntry[] {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError('tail: n must be a non-negative integer');
  const out: AuditEntry[] = [];
  const files = listFiles(dir).reverse();
  for (const file of files) {
    if (out.length >= n) break;
    const { lines, torn } = splitLines(readFileSync(join(dir, file.name), 'utf8'));
    const taken: AuditEntry[] = [];
    for (let i = lines.length - 1; i >= 0 && out.length + taken.length < n; i--) {
      const parsed = torn && i === lines.length - 1 ? { reason: 'the last line is truncated' } : parseLine(lines[i]!);
      if ('reason' in parsed) throw brokenError(dir, { file: file.name, line: i + 1, reason: parsed.reason }, '');
      taken.push(parsed.entry);
    }
    out.unshift(...taken.reverse());
  }
  return out;
}

/**
 * The last entry of one file, checking the lines in its last 64 KiB (each line's hash and the links
 * between them). Undefined for an empty file; a string naming the problem when the tail is damaged.
 */
function readTailEntry(path: string): AuditEntry | undefined | string {
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    if (size === 0) return undefined;
    const start = Math.max(0, size - TAIL_WINDOW);
    const buf = Buffer.alloc(size - start);
    let off = 0;
    while (off < buf.length) {
      const n = readSync(fd, buf, off, buf.length - off, start + off);
      if (n === 0) break;
      off += n;
    }
    const { lines, torn } = splitLines(buf.subarray(0, off).toString('utf8'));
    if (torn) return 'the last line is truncated';
    if (start > 0) lines.shift();
    let before: AuditEntry | undefined;
    for (const line of lines) {
      const parsed = parseLine(line);
      if ('reason' in parsed) return parsed.reason;
      if (before && linkProblem(before, parsed.entry)) return 'the chain is broken near the end';
      before = parsed.entry;
    }
    return before ?? 'no complete entry in the last 64 KiB';
  } finally {
    closeSync(fd);
  }
}

function writeAll(fd: number, data: Buffer): void {
  let off = 0;
  while (off < data.length) off += writeSync(fd, data, off, data.length - off);
}

export function createAuditLog(options: AuditLogOptions): AuditLog {
  const { dir } = options;
  const clock = options.clock ?? (() => new Date());
  const maxFiles = options.maxFiles ?? 10;
  const doFsync = options.fsync ?? true;
  if (!Number.isSafeInteger(options.maxFileBytes) || options.maxFileBytes < 1) throw new RangeError('audit log: maxFileBytes must be a positive integer');
  if (!Number.isSafeInteger(maxFiles) || maxFiles < 1 || maxFiles > 999_999) throw new RangeError('audit log: maxFiles must be an integer from 1');

  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const current = join(dir, LOG_NAME);

  // Continue the chain from the newest non-empty file (audit.log may be empty or missing right after a
  // rotation, or after a crash between rotation's rename and the new file's creation).
  let last: ChainHead | null = null;
  for (const file of listFiles(dir).reverse()) {
    const tail = readTailEntry(join(dir, file.name));
    if (tail === undefined) continue;
    if (typeof tail === 'string') {
      const full = verifyAuditLog(dir);
      throw brokenError(dir, full.problem, `${file.name}: ${tail}`);
    }
    last = { seq: tail.seq, hash: tail.hash };
    break;
  }

  function openCurrent(): { fd: number; size: number } {
    const existed = existsSync(current);
    const fd = openSync(current, 'a', 0o600);
    if (!existed) fsyncDir(dir);
    return { fd, size: fstatSync(fd).size };
  }

  let { fd, size } = openCurrent();
  let closed = false;
  let failed: unknown;

  function rotate(): void {
    fsyncSync(fd);
    closeSync(fd);
    for (const f of listFiles(dir)) {
      if (f.index >= maxFiles) unlinkSync(join(dir, f.name));
    }
    for (let i = maxFiles - 1; i >= 1; i--) {
      const from = join(dir, `${LOG_NAME}.${i}`);
      if (existsSync(from)) renameSync(from, join(dir, `${LOG_NAME}.${i + 1}`));
    }
    renameSync(current, join(dir, `${LOG_NAME}.1`));
    ({ fd, size } = openCurrent());
    fsyncDir(dir);
  }

  return {
    append(event) {
      if (closed) throw new Error('audit log is closed');
      if (failed !== undefined) throw new PhantomaError(CHAIN_BROKEN, `audit log in ${dir} failed earlier and takes no more entries`, { cause: failed });
      const fields: Array<[string, string | number | boolean]> = [];
      const problem = (options.check ?? checkAuditEvent)(event, fields);
      if (problem) throw new PhantomaError(EVENT_REFUSED, `audit event refused: ${problem}`);
      const entry: Record<string, unknown> = { seq: (last?.seq ?? 0) + 1, time: clock().toISOString(), type: event.type };
      for (const [k, v] of fields) entry[k] = v;
      entry.prev = last?.hash ?? GENESIS;
      entry.hash = entryHash(entry);
      const line = Buffer.from(JSON.stringify(entry) + '\n');
      try {
        if (size > 0 && size + line.length > options.maxFileBytes) rotate();
        writeAll(fd, line);
        if (doFsync) fsyncSync(fd);
      } catch (err) {
        // A failed write may have left a partial line; appending after it would bury the damage.
        failed = err;
        throw err;
      }
      size += line.length;
      last = { seq: entry.seq as number, hash: entry.hash as string };
      return Object.freeze(entry) as unknown as AuditEntry;
    },
    verify: () => verifyAuditLog(dir),
    tail: (n) => tailAuditLog(dir, n),
    head: () => (last ? { ...last } : null),
    close() {
      if (closed) return;
      closed = true;
      try {
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
    },
  };
}

