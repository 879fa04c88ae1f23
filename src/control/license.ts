// Licensing on the node (docs/licensing.md). Pure: a lease and a time in, a decision out.
//   valid    now < expiresAt                       serve
//   grace    expiresAt ≤ now < expiresAt + grace   serve (the control plane was unreachable; heartbeats retry)
//   expired  now ≥ expiresAt + grace               refuse new inference: license_expired, /readyz says why
//   revoked  the control plane said so             refuse new inference: license_revoked
// A clock that moved back more than the lease's skew bound before the moment the lease was received counts
// as expired (winding the clock back must not stretch a lease). Requests already running are not cut off.
import { statSync } from 'node:fs';
import { PhantomaError, ERRORS } from '../errors.ts';
import type { Lease } from './protocol.ts';
import { readControlState, statePathOf } from './state.ts';

export type LicenseState = 'unenrolled' | 'valid' | 'grace' | 'expired' | 'revoked';

export interface LicenseDecision {
  state: LicenseState;
  /** Set when new inference must be refused. */
  refusal?: PhantomaError;
  /** One line for /readyz and logs. */
  reason?: string;
}

export function evaluateLicense(lease: Lease | undefined, receivedAtMs: number | undefined, nowMs: number, required: boolean): LicenseDecision {
  if (!lease) {
    if (!required) return { state: 'unenrolled' };
    const reason = 'licensing is required and this node holds no lease: run phantoma enroll';
    return { state: 'unenrolled', reason, refusal: new PhantomaError(ERRORS.NOT_ENROLLED, reason) };
  }
  if (lease.status === 'revoked') {
    const reason = `the control plane revoked this node (${lease.node}) at ${lease.issuedAt}`;
    return { state: 'revoked', reason, refusal: new PhantomaError(ERRORS.LICENSE_REVOKED, reason) };
  }
  const expires = Date.parse(lease.expiresAt);
  const graceEnds = expires + lease.graceSeconds * 1000;
  const wound = receivedAtMs !== undefined && nowMs < receivedAtMs - lease.maxClockSkewSeconds * 1000;
  if (nowMs >= graceEnds || wound) {
    const reason = wound
      ? `the clock is before the moment the lease was received (${new Date(receivedAtMs!).toISOString()}) by more than ${lease.maxClockSkewSeconds} s`
      : `the lease expired at ${lease.expiresAt} and its ${lease.graceSeconds} s grace ended at ${new Date(graceEnds).toISOString()}; the control plane has not renewed it`;
    return { state: 'expired', reason, refusal: new PhantomaError(ERRORS.LICENSE_EXPIRED, `new inference is refused: ${reason}`, { details: { expiresAt: lease.expiresAt, graceEndsAt: new Date(graceEnds).toISOString() } }) };
  }
  if (nowMs >= expires) return { state: 'grace', reason: `the lease expired at ${lease.expiresAt}; serving during grace until ${new Date(graceEnds).toISOString()}` };
  return { state: 'valid' };
}

export interface LicenseGate {
  decision(): LicenseDecision;
  /** Re-read the state file at the next decision (the heartbeat loop calls it after writing a lease). */
  invalidate(): void;
}

/**
 * The gateway's view: reads `<stateDir>/control/state.json` (written by `phantoma enroll` and the heartbeat
 * loop) when its mtime changes, at most once a second, and decides against the current time on every call.
 */
export function createLicenseGate(opts: { stateDir: string; required: boolean; clock?: () => number }): LicenseGate {
  const clock = opts.clock ?? Date.now;
  const path = statePathOf(opts.stateDir);
  let checkedAt = -Infinity;
  let mtime = -1;
  let lease: Lease | undefined;
  let receivedAt: number | undefined;
  let broken: PhantomaError | undefined;
  function refresh(now: number): void {
    if (now - checkedAt < 1000 && now >= checkedAt) return;
    checkedAt = now;
    let m: number;
    try {
      m = statSync(path).mtimeMs;
    } catch {
      m = 0;
    }
    if (m === mtime) return;
    mtime = m;
    try {
      const state = m === 0 ? undefined : readControlState(opts.stateDir);
      lease = state?.lease.lease;
      receivedAt = state ? Date.parse(state.leaseReceivedAt) : undefined;
      broken = undefined;
    } catch (err) {
      // A damaged state file is not a lease; the node fails closed when licensing applies to it.
      lease = undefined;
      broken = err as PhantomaError;
    }
  }
  return {
    decision() {
      const now = clock();
      refresh(now);
      if (broken) return { state: 'expired', reason: broken.message, refusal: new PhantomaError(ERRORS.LICENSE_EXPIRED, `new inference is refused: ${broken.message}`) };
      return evaluateLicense(lease, receivedAt, now, opts.required);
    },
    invalidate() {
      checkedAt = -Infinity;
      mtime = -1;
    },
  };
}
