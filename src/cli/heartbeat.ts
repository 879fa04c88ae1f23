// phantoma heartbeat log|verify|status: what this node sent to its control plane and what came back
// (the hash-chained ledger, src/control/ledger.ts), whether the chain verifies, and the license state.
// Read-only: nothing here sends or writes.
import type { Command } from './main.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { resolveFromRoot } from '../paths.ts';
import { AUDIT_CHAIN_BROKEN as CHAIN_BROKEN, type AuditEntry } from '../audit/audit-log.ts';
import { createLedger, ledgerDirOf } from '../control/ledger.ts';
import { readControlState } from '../control/state.ts';
import { evaluateLicense } from '../control/license.ts';

function formatEntry(e: AuditEntry): string {
  const r = e as unknown as Record<string, unknown>;
  const extra = [r.status === undefined ? '' : `status=${String(r.status)}`, r.code === undefined ? '' : `code=${String(r.code)}`].filter(Boolean);
  return [String(e.seq).padStart(6), e.time, String(e.type).padEnd(18), String(r.url ?? ''), ...extra, r.body === undefined ? '' : `\n       ${String(r.body)}`].join(' ');
}

export const heartbeatCommand: Command = {
  summary: 'show or verify the ledger of everything sent to the control plane; show the license state',
  usage: 'phantoma heartbeat log [-n N] [--json] | heartbeat verify [--json] | heartbeat status [--json]',
  options: { lines: { type: 'string', short: 'n' } },
  async run(ctx, { values, positionals }) {
    const [sub, ...extra] = positionals;
    if (extra.length > 0) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const stateDir = resolveFromRoot(ctx.config().stateDir);
    const dir = ledgerDirOf(stateDir);
    const ledger = createLedger({ dir });
    if (sub === 'log') {
      const raw = values.lines ?? '20';
      if (typeof raw !== 'string' || !/^[0-9]{1,6}$/.test(raw)) throw new UsageError(ERRORS.CLI_USAGE, '-n takes a number of entries (0-999999)');
      const entries = ledger.tail(Number(raw));
      ctx.out(ctx.json ? JSON.stringify(entries) : entries.length === 0 ? `nothing was ever sent to a control plane (${dir} is empty)` : entries.map(formatEntry).join('\n'));
      return 0;
    }
    if (sub === 'verify') {
      const r = ledger.verify();
      if (ctx.json) ctx.out(JSON.stringify(r.ok ? r : { ...r, error: { code: CHAIN_BROKEN.code } }));
      else if (!r.ok && r.problem) ctx.err(`phantoma: heartbeat ledger chain broken at ${r.problem.file} line ${r.problem.line}: ${r.problem.reason} [${CHAIN_BROKEN.code}]`);
      else ctx.out(r.entries === 0 ? 'the heartbeat ledger is empty; nothing to verify' : `heartbeat ledger verified: ${r.entries} entries; head seq ${r.head!.seq} hash ${r.head!.hash}`);
      return r.ok ? 0 : CHAIN_BROKEN.exit;
    }
    if (sub === 'status') {
      const state = readControlState(stateDir);
      const d = evaluateLicense(state?.lease.lease, state ? Date.parse(state.leaseReceivedAt) : undefined, Date.now(), ctx.config().control.required);
      const info = state ? { node: state.node, url: state.url, counter: state.counter, status: state.lease.lease.status, expiresAt: state.lease.lease.expiresAt, graceSeconds: state.lease.lease.graceSeconds } : {};
      ctx.out(ctx.json ? JSON.stringify({ license: d.state, ...(d.refusal ? { code: d.refusal.code } : {}), ...(d.reason ? { reason: d.reason } : {}), ...info }) : `license: ${d.state}${d.reason ? ` — ${d.reason}` : ''}${state ? `\nnode ${state.node} at ${state.url}; last counter ${state.counter}; lease until ${info.expiresAt} (+${info.graceSeconds} s grace)` : ''}`);
      return 0;
    }
    throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
  },
};
