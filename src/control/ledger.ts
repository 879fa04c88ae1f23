// The heartbeat ledger: everything the node sends to the control plane, exactly as sent, and everything it
// receives, exactly as received — in the audit log's hash-chained format (src/audit/README.md: same line
// layout, canonical-JSON hashes, rotation, `verify`), in its own directory `<stateDir>/control/ledger/`.
// `phantoma heartbeat log` shows it, `phantoma heartbeat verify` checks it.
//
// The vocabulary is closed like the audit log's. `body` holds the exact bytes of one HTTP body (JSON text);
// an enrolment is recorded with the token replaced by its SHA-256, because the token is never written down.
// The ledger is opened, appended and closed per exchange (one every few minutes), so `phantoma enroll`
// and a running gateway never hold it open at the same time for long; run enroll with the node stopped or
// idle (two writers appending at the same instant would fork the chain, which `verify` would then show).
import { join } from 'node:path';
import { createAuditLog, verifyAuditLog, tailAuditLog, type AuditEntry, type VerifyResult } from '../audit/audit-log.ts';
import type { AuditEvent } from '../audit/audit-events.ts';

export const LEDGER_EVENTS = {
  enrol_sent: ['url', 'body'],
  enrol_received: ['url', 'status', 'body'],
  heartbeat_sent: ['url', 'body'],
  heartbeat_received: ['url', 'status', 'body'],
  /** No answer at all (connection refused, timeout, pin mismatch): the code only. */
  exchange_failed: ['url', 'code'],
} as const;
export type LedgerEventType = keyof typeof LEDGER_EVENTS;
export type LedgerEvent =
  | { type: 'enrol_sent' | 'heartbeat_sent'; url: string; body: string }
  | { type: 'enrol_received' | 'heartbeat_received'; url: string; status: number; body: string }
  | { type: 'exchange_failed'; url: string; code: string };

const MAX_BODY = 32 * 1024;

export function checkLedgerEvent(event: unknown, fields: Array<[string, string | number | boolean]>): string | undefined {
  if (event === null || typeof event !== 'object' || Array.isArray(event)) return 'a ledger event must be an object';
  const e = event as Record<string, unknown>;
  const type = e.type;
  if (typeof type !== 'string' || !Object.hasOwn(LEDGER_EVENTS, type)) return 'unknown ledger event type';
  const names = LEDGER_EVENTS[type as LedgerEventType] as readonly string[];
  for (const k of Object.keys(e)) if (k !== 'type' && !names.includes(k)) return `ledger event ${type} has no field ${/^[A-Za-z0-9_]{1,64}$/.test(k) ? k : '(unprintable)'}`;
  for (const name of names) {
    const v = e[name];
    if (name === 'status') {
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 999) return `field status of ${type} must be an HTTP status`;
    } else if (name === 'body') {
      if (typeof v !== 'string' || v.length > MAX_BODY) return `field body of ${type} must be a string of at most ${MAX_BODY} characters`;
    } else if (name === 'url') {
      if (typeof v !== 'string' || !/^https:\/\/[A-Za-z0-9.:[\]_/-]{1,300}$/.test(v)) return `field url of ${type} must be an https URL`;
    } else if (typeof v !== 'string' || !/^[a-z0-9_]{1,64}$/.test(v)) return `field ${name} of ${type} must be an error code`;
    fields.push([name, v as string | number]);
  }
  return undefined;
}

export function ledgerDirOf(stateDir: string): string {
  return join(stateDir, 'control', 'ledger');
}

export interface Ledger {
  /** Appends the events in order, fsynced, in one open of the log. Returns the entries written. */
  record(events: LedgerEvent[]): AuditEntry[];
  verify(): VerifyResult;
  tail(n: number): AuditEntry[];
}

export function createLedger(opts: { dir: string; maxFileBytes?: number; maxFiles?: number; clock?: () => Date }): Ledger {
  return {
    record(events) {
      const log = createAuditLog({
        dir: opts.dir,
        maxFileBytes: opts.maxFileBytes ?? 16 << 20,
        maxFiles: opts.maxFiles ?? 10,
        check: checkLedgerEvent,
        ...(opts.clock ? { clock: opts.clock } : {}),
      });
      try {
        return events.map((e) => log.append(e as unknown as AuditEvent));
      } finally {
        log.close();
      }
    },
    verify: () => verifyAuditLog(opts.dir),
    tail: (n) => tailAuditLog(opts.dir, n),
  };
}
