// phantoma update status|check|apply|rollback: the node's side of signed updates (src/updates/). `apply`
// verifies (TUF + k Sigstore bundles) and unpacks into the inactive slot, then switches `current`; the
// restart that starts the trial boot is the supervisor's (systemd in production). Only what the node's
// lease allows (newestRelease) is chosen.
import { cpSync, existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from './main.ts';
import { ERRORS, UsageError, PhantomaError } from '../errors.ts';
import { resolveFromRoot } from '../paths.ts';
import { readControlState } from '../control/state.ts';
import { applyUpdate, checkForUpdate, manualRollback, updateStatus, type UpdateDeps } from '../updates/update.ts';
import { concludeTrial, currentSlot, readState, slotVersion, type TrialState } from '../updates/slots.ts';
import type { Config } from '../config/schema.ts';
import type { AuditEvent } from '../audit/audit-events.ts';
import { auditDirOf } from '../audit/audit-log.ts';
import { appendPendingAudit } from '../audit/pending.ts';

function updateDeps(config: Readonly<Config>): { deps: UpdateDeps; allowed: string | undefined } {
  const stateDir = resolveFromRoot(config.stateDir);
  const metadataDir = join(stateDir, 'updates', 'tuf');
  if (!existsSync(join(metadataDir, 'root.json'))) {
    const pinned = resolveFromRoot(config.updates.trustedRoot);
    if (!existsSync(pinned)) throw new PhantomaError(ERRORS.CONFIG_INVALID, `updates.trustedRoot: ${pinned} does not exist (the pinned TUF root.json from phantoma-release init-repo)`);
    mkdirSync(metadataDir, { recursive: true, mode: 0o700 });
    cpSync(pinned, join(metadataDir, 'root.json'));
  }
  const control = readControlState(stateDir);
  const url = config.updates.repositoryUrl ?? (control ? `${control.url.replace(/\/$/, '')}/v1/updates/` : undefined);
  if (!url) throw new PhantomaError(ERRORS.NOT_ENROLLED, 'no update repository: enrol the node (phantoma enroll) or set updates.repositoryUrl');
  const fetcher = url.startsWith('https://') && control ? { pin: control.pin } : {};
  return {
    deps: { root: resolveFromRoot(config.updates.root), trust: { metadataDir, repository: { url, fetcher } }, trialMs: config.updates.trialSeconds * 1000 },
    allowed: control?.lease.lease.newestRelease,
  };
}

/** Milliseconds from the install that started the trial to its outcome. */
function trialMs(trial: TrialState): number {
  return Math.max(0, Date.now() - Date.parse(trial.startedAt));
}

/** Outcomes go to the node's audit log through the pending file (src/audit/pending.ts): serve may be writing the chain. */
function pendingAudit(config: Readonly<Config>): (event: AuditEvent) => void {
  return (event) => appendPendingAudit(auditDirOf(config), event);
}

export const updateCommand: Command = {
  summary: 'signed updates: show the slots, check for, apply or roll back a release',
  usage: 'phantoma update status | check | apply [--name TARGET] | rollback | trial-passed | trial-failed [--check]   [--json]',
  options: { name: { type: 'string' }, check: { type: 'boolean' } },
  async run(ctx, { values, positionals }) {
    const [sub, ...extra] = positionals;
    if (extra.length > 0) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const config = ctx.config();
    const root = resolveFromRoot(config.updates.root);
    switch (sub) {
      case 'status': {
        const s = updateStatus(root);
        ctx.out(ctx.json ? JSON.stringify(s) : `running ${s.version ?? '(unknown)'} from slot ${s.slot}${s.state.trial ? `; slot ${s.state.trial.slot} (${s.state.trial.version}) is on trial` : ''}${s.state.last ? `; last update: ${s.state.last.result} ${s.state.last.version}${s.state.last.code ? ` [${s.state.last.code}]` : ''}` : ''}`);
        return 0;
      }
      case 'check': {
        const { deps, allowed } = updateDeps(config);
        const r = await checkForUpdate(deps, allowed);
        ctx.out(ctx.json ? JSON.stringify({ ...r, allowed }) : r.available ? `release ${r.available} is available (running ${r.running}); phantoma update apply installs it` : `up to date (running ${r.running}${allowed ? `, the lease allows up to ${allowed}` : ''})`);
        return 0;
      }
      case 'apply': {
        const { deps, allowed } = updateDeps(config);
        const r = await applyUpdate({ ...deps, audit: pendingAudit(config) }, { ...(typeof values.name === 'string' ? { name: values.name } : {}), ...(allowed ? { allowed } : {}) });
        ctx.out(ctx.json ? JSON.stringify({ version: r.version, slot: r.slot, signers: r.release.signers, trialSeconds: r.trial.deadlineMs / 1000 }) : `release ${r.version} verified (${r.release.signers.length} maintainer bundles) and installed into slot ${r.slot}; restart the node (systemctl restart phantoma) to start its ${r.trial.deadlineMs / 1000} s trial boot`);
        return 0;
      }
      case 'rollback': {
        const s = manualRollback(root, pendingAudit(config));
        ctx.out(ctx.json ? JSON.stringify(s) : `switched back to slot ${s.current} (${s.last?.version}); restart the node to run it`);
        return 0;
      }
      // systemd's side of the trial boot (deploy/systemd, issue 13). trial-passed: phantoma.service's
      // ExecStartPost=, i.e. after READY=1 — the release on trial is kept. trial-failed: phantoma-rollback.service
      // (OnFailure= of phantoma.service, run from the *previous* slot's code) switches back; with --check it
      // only answers whether a trial is recorded (exit 0) or not (exit 1), for ExecCondition=.
      case 'trial-passed': {
        const trial = readState(root).trial; // none when no update-state.json exists
        if (!trial || currentSlot(root) !== trial.slot) {
          ctx.out(ctx.json ? JSON.stringify({ trial: false }) : 'no trial boot in progress');
          return 0;
        }
        const s = concludeTrial(root, true);
        pendingAudit(config)({ type: 'update_trial', version: trial.version, slot: trial.slot, passed: true, ms: trialMs(trial) });
        ctx.out(ctx.json ? JSON.stringify(s) : `trial boot of ${trial.version} (slot ${trial.slot}) passed: kept`);
        return 0;
      }
      case 'trial-failed': {
        const trial = readState(root).trial; // none when no update-state.json exists
        if (values.check) {
          ctx.out(trial ? `slot ${trial.slot} (${trial.version}) is on trial` : 'no trial boot in progress');
          return trial ? 0 : 1;
        }
        if (!trial) {
          ctx.out(ctx.json ? JSON.stringify({ trial: false }) : 'no trial boot in progress: nothing to roll back');
          return 0;
        }
        const s = concludeTrial(root, false, ERRORS.UPDATE_TRIAL_FAILED.code);
        const record = pendingAudit(config);
        record({ type: 'update_trial', version: trial.version, slot: trial.slot, passed: false, ms: trialMs(trial) });
        record({ type: 'update_rolled_back', from: trial.version, to: slotVersion(root, trial.previous) ?? 'unknown', manual: false });
        ctx.out(ctx.json ? JSON.stringify(s) : `trial boot of ${trial.version} (slot ${trial.slot}) failed: switched back to slot ${s.current}`);
        return 0;
      }
      default:
        throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    }
  },
};
