// `phantoma update check|apply|status|rollback` as functions: verify (src/updates/verify.ts) and only then
// install into the inactive slot (src/updates/slots.ts). Every refusal is audited with its code; nothing
// touches the running slot before verification and the manifest check have both passed.
import { join } from 'node:path';
import { rmSync } from 'node:fs';
import type { AuditEvent } from '../audit/audit-events.ts';
import { PhantomaError, ERRORS } from '../errors.ts';
import { verifyRelease, listReleases, type UpdateTrust, type VerifiedRelease } from './verify.ts';
import { installIntoInactiveSlot, readState, rollbackToPrevious, currentSlot, slotVersion, type UpdateState, type InstallResult } from './slots.ts';
import { compareVersions } from './version.ts';

export interface UpdateDeps {
  /** The A/B layout's root (slots/, current, update-state.json). */
  root: string;
  trust: UpdateTrust;
  trialMs: number;
  audit?: (event: AuditEvent) => void;
}

export interface UpdateStatus {
  slot: string;
  version: string | undefined;
  state: UpdateState;
}

export function updateStatus(root: string): UpdateStatus {
  const slot = currentSlot(root);
  return { slot, version: slotVersion(root, slot), state: readState(root) };
}

/** Refreshes TUF metadata and names the newest release the node may install, if newer than it runs. */
export async function checkForUpdate(deps: UpdateDeps, allowed?: string): Promise<{ running: string | undefined; available: string | undefined; name: string | undefined }> {
  const running = updateStatus(deps.root).version;
  const releases = await listReleases(deps.trust);
  const pick = releases.find((r) => !allowed || compareVersions(r.version, allowed) <= 0);
  const newer = pick && (!running || compareVersions(pick.version, running) > 0) ? pick : undefined;
  return { running, available: newer?.version, name: newer?.name };
}

export async function applyUpdate(deps: UpdateDeps, choice: { name?: string; allowed?: string } = {}): Promise<InstallResult & { release: VerifiedRelease }> {
  const running = updateStatus(deps.root).version ?? '0.0.0';
  const downloads = join(deps.root, 'downloads');
  let release: VerifiedRelease | undefined;
  try {
    release = await verifyRelease({ running, ...(choice.name ? { name: choice.name } : {}), ...(choice.allowed ? { allowed: choice.allowed } : {}) }, deps.trust, downloads);
    const installed = await installIntoInactiveSlot(deps.root, release.path, release.version, deps.trialMs);
    deps.audit?.({ type: 'update_installed', version: release.version, slot: installed.slot, signers: release.signers.length });
    return { ...installed, release };
  } catch (err) {
    const e = err instanceof PhantomaError ? err : new PhantomaError(ERRORS.UPDATE_INSTALL_FAILED, (err as Error).message, { cause: err });
    deps.audit?.({ type: 'update_refused', code: e.code, ...(release ? { version: release.version } : {}) });
    throw e;
  } finally {
    rmSync(downloads, { recursive: true, force: true });
  }
}

export function manualRollback(root: string, audit?: (event: AuditEvent) => void): UpdateState {
  const from = updateStatus(root).version ?? 'unknown';
  const next = rollbackToPrevious(root);
  audit?.({ type: 'update_rolled_back', from, to: next.last?.version ?? 'unknown', manual: true });
  return next;
}
