// phantoma audit tail|verify — reads the node's hash-chained audit log (<stateDir>/audit); never writes it.
import type { Command } from './main.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { AUDIT_CHAIN_BROKEN as CHAIN_BROKEN, auditDirOf, tailAuditLog, verifyAuditLog, type AuditEntry } from '../audit/audit-log.ts';
const ENTRY_KEYS = new Set(['seq', 'time', 'type', 'prev', 'hash']);

function formatEntry(e: AuditEntry): string {
  const fields = Object.entries(e)
    .filter(([k]) => !ENTRY_KEYS.has(k))
    .map(([k, v]) => `${k}=${String(v)}`);
  return [String(e.seq).padStart(6), e.time, e.type.padEnd(16), ...fields].join(' ');
}

export const auditCommand: Command = {
  summary: 'show the last audit log entries, or verify the hash chain',
  usage: 'phantoma audit tail [-n N] [--json] | audit verify [--json]',
  options: { lines: { type: 'string', short: 'n' } },
  async run(ctx, { values, positionals }) {
    const [sub, ...extra] = positionals;
    if (extra.length > 0) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const dir = auditDirOf(ctx.config());
    if (sub === 'tail') {
      const raw = values.lines ?? '20';
      if (typeof raw !== 'string' || !/^[0-9]{1,6}$/.test(raw)) throw new UsageError(ERRORS.CLI_USAGE, '-n takes a number of entries (0-999999)');
      const entries = tailAuditLog(dir, Number(raw));
      ctx.out(ctx.json ? JSON.stringify(entries) : entries.length === 0 ? `no audit entries in ${dir}` : entries.map(formatEntry).join('\n'));
      return 0;
    }
    if (sub === 'verify') {
      if (values.lines !== undefined) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
      const r = verifyAuditLog(dir);
      if (ctx.json) {
        ctx.out(JSON.stringify(r.ok ? r : { ...r, error: { code: CHAIN_BROKEN.code } }));
      } else if (!r.ok && r.problem) {
        const p = r.problem;
        ctx.err(`phantoma: audit log chain broken at ${p.file} line ${p.line}${p.seq === undefined ? '' : ` (seq ${p.seq})`}: ${p.reason} [${CHAIN_BROKEN.code}]`);
      } else if (r.entries === 0) {
        ctx.out(`no audit entries in ${dir}; nothing to verify`);
      } else {
        const a = r.anchor!;
        const anchor = a.genesis
          ? 'it starts at the genesis entry'
          : `it starts at seq ${a.seq} in ${a.file}, whose prev ${a.prev} is the anchor (older files were rotated away)`;
        ctx.out(`audit log verified: ${r.entries} entries in ${r.files.length} file(s) (${r.files.map((f) => f.file).join(', ')}); ${anchor}; head seq ${r.head!.seq} hash ${r.head!.hash}`);
      }
      return r.ok ? 0 : CHAIN_BROKEN.exit;
    }
    throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
  },
};
