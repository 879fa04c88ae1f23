// Audit events from processes that are not the node: `phantoma update apply|rollback|trial-passed|
// trial-failed`, run by an operator or by systemd (deploy/systemd) while `phantoma serve` may be writing
// the hash chain. One writer keeps the chain whole, so they do not append to it: they go, checked against
// the same closed schema, into `pending.jsonl` beside the log, and the node moves them into the chain when
// it starts — an update is always followed by a (re)start. At least once: a node that dies between moving
// the events and removing the file records them again at its next start (each says what happened, not
// that it happened once more, and the ledger's times show it).
import { closeSync, existsSync, fchownSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, statSync, unlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { checkAuditEvent, type AuditEvent } from './audit-events.ts';
import { ERRORS, PhantomaError } from '../errors.ts';

export const PENDING_NAME = 'pending.jsonl';
const DRAINING_NAME = 'pending.jsonl.draining';
/** A pending file larger than this is not read (events are ~150 bytes; nothing legitimate comes near it). */
const MAX_PENDING_BYTES = 1 << 20;

/** Appends one event for the node to record at its next start; refused (audit_event_refused) like append. */
export function appendPendingAudit(dir: string, event: AuditEvent): void {
  const problem = checkAuditEvent(event, []);
  if (problem) throw new PhantomaError(ERRORS.AUDIT_EVENT_REFUSED, problem);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const fd = openSync(join(dir, PENDING_NAME), 'a', 0o600);
  try {
    // Written by root (systemd's trial-boot units, an operator's `phantoma update`): the file must belong
    // to whoever owns the audit directory (the node's user), or the node could not read and remove it.
    if (process.getuid?.() === 0) {
      const owner = statSync(dir);
      if (owner.uid !== 0) fchownSync(fd, owner.uid, owner.gid);
    }
    // One write of one line: concurrent appenders (O_APPEND) never interleave within a line.
    writeSync(fd, JSON.stringify(event) + '\n');
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export interface DrainResult {
  recorded: number;
  /** Lines that were not a valid event (a torn last line after a crash, a hand edit): counted, not recorded. */
  skipped: number;
}

/** The node at start-up: every pending event into the chain (through `record`), then the file is gone. */
export function drainPendingAudit(dir: string, record: (event: AuditEvent) => void): DrainResult {
  const pending = join(dir, PENDING_NAME);
  const draining = join(dir, DRAINING_NAME);
  const result: DrainResult = { recorded: 0, skipped: 0 };
  // A .draining file left by a crash mid-drain goes first; then whatever was appended since.
  for (const take of [false, true]) {
    if (take) {
      if (!existsSync(pending)) break;
      renameSync(pending, draining); // appenders from now on start a new pending file
    }
    if (!existsSync(draining)) continue;
    const text = readFileSync(draining);
    const lines = text.length > MAX_PENDING_BYTES ? [] : text.toString('utf8').split('\n');
    if (text.length > MAX_PENDING_BYTES) result.skipped++;
    for (const line of lines) {
      if (line === '') continue;
      let event: unknown;
      try {
        event = JSON.parse(line);
      } catch {
        result.skipped++;
        continue;
      }
      if (checkAuditEvent(event, []) !== undefined) {
        result.skipped++;
        continue;
      }
      record(event as AuditEvent);
      result.recorded++;
    }
    unlinkSync(draining);
  }
  return result;
}
