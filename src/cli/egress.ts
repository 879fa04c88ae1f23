// phantoma egress status [--probe] — asks the warden (as the gateway's uid: the warden answers no one
// else) what the kernel says is attached to workers/ and download/, compares the tags with the programs we
// built, lists the download allowlist and the counters, and prints the egress policy hash. With --probe
// it also runs the live probe. Exit 0 when verified, 5 (egress_unverified) when not.
import type { Command } from './main.ts';
import { ERRORS, PhantomaError, UsageError } from '../errors.ts';
import { createEgressClient, HOOKS, SETS, type ProbeResult } from '../egress/warden-egress.ts';
import { checkStatus, egressPolicyHash, loadExpectedTags, type ExpectedTags } from '../egress/policy.ts';
import { closeWindow, openWindow, parseDuration, readWindow } from '../egress/window.ts';
import { resolveFromRoot } from '../paths.ts';
import { userInfo } from 'node:os';

export const egressCommand: Command = {
  summary: 'show the kernel egress filter: programs and tags per cgroup, allowlists, counters, policy hash',
  usage: 'phantoma egress status [--probe] [--json] | egress window open --for 30m --allow HOST:PORT... [--json] | egress window close | egress window status',
  options: { probe: { type: 'boolean' }, for: { type: 'string' }, allow: { type: 'string', multiple: true } },
  async run(ctx, { values, positionals }) {
    if (positionals[0] === 'window') return windowCommand(ctx, values, positionals.slice(1), this.usage);
    if (positionals.length !== 1 || positionals[0] !== 'status') throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const config = ctx.config();
    const client = createEgressClient({ socketPath: config.warden.socket, timeoutMs: 10_000 });
    let expected: ExpectedTags | undefined;
    let expectedError: string | undefined;
    try {
      expected = loadExpectedTags();
    } catch (err) {
      expectedError = (err as Error).message;
    }
    let status;
    try {
      status = await client.status();
    } catch (err) {
      throw new PhantomaError(ERRORS.EGRESS_UNVERIFIED, `cannot ask the warden at ${config.warden.socket}: ${(err as Error).message}`);
    }
    const reasons = expected ? checkStatus(status, expected) : [`the built program tags are unknown: ${expectedError}`];
    let probe: ProbeResult | undefined;
    if (values.probe === true && status.mode === 'enforce') {
      probe = await client.probe();
      if (!probe.refused) reasons.push(`the live probe was not refused (${probe.detail})`);
    }
    const verified = reasons.length === 0;
    const policyHash = status.mode === 'off' ? egressPolicyHash({ mode: 'off' }) : egressPolicyHash({ mode: 'enforce', ...(expected ? { expected } : {}), downloadAllow: status.downloadAllow ?? [] });
    if (ctx.json) {
      ctx.out(JSON.stringify({ verified, reasons, policyHash, expectedTags: expected ? Object.fromEntries(expected) : null, status, ...(probe ? { probe } : {}) }));
    } else {
      const lines = [`egress filter: ${status.mode}${verified ? ', verified' : ', NOT verified'}`, `policy hash: ${policyHash}`];
      if (status.sets) {
        lines.push(`pins: ${status.pins}`);
        for (const s of SETS) {
          const st = status.sets[s];
          lines.push(`${s}/ (cgroup ${st.cgroupId}): denied ${st.denied}, allowed ${st.allowed}, events lost ${st.lost}`);
          for (const h of HOOKS) {
            const p = st.programs[h];
            const shown = typeof p === 'string' ? p : p.length === 0 ? 'NOTHING ATTACHED' : p.map((x) => `id ${x.id} tag ${x.tag}${x.tag === expected?.get(h) ? ' (built)' : ' (NOT OURS)'}`).join(', ');
            lines.push(`  ${h.padEnd(9)} ${shown}`);
          }
        }
        lines.push(`allowlist workers/: ${status.workersAllowCount === 0 ? 'empty' : `${status.workersAllowCount} entries (MUST be empty)`}`);
        lines.push(`allowlist download/: ${status.downloadAllow?.length ? status.downloadAllow.join(', ') : 'empty'}`);
        lines.push(`deny events streamed: ${status.eventsSent}, dropped: ${status.eventsDropped}`);
      }
      if (probe) lines.push(`live probe: ${probe.refused ? 'refused' : 'NOT REFUSED'} (${Object.entries(probe.attempts).map(([k, v]) => `${k} ${v}`).join(', ')}; ${probe.ms} ms)`);
      for (const r of reasons) lines.push(`problem: ${r}`);
      ctx.out(lines.join('\n'));
    }
    return verified ? 0 : ERRORS.EGRESS_UNVERIFIED.exit;
  },
};

// phantoma egress window open|close|status (issue 10): fills / empties the download/ allowlist. Runs as the
// gateway's uid (the warden answers no one else); resolves host names here and pins the addresses; the
// gateway's window keeper records the window in the audit log and closes it at its deadline.
async function windowCommand(ctx: Parameters<Command['run']>[0], values: Record<string, unknown>, args: string[], usage: string): Promise<number> {
  const config = ctx.config();
  const stateDir = resolveFromRoot(config.stateDir);
  const egress = createEgressClient({ socketPath: config.warden.socket, timeoutMs: 10_000 });
  const sub = args[0];
  if (args.length !== 1) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${usage}`);
  if (sub === 'open') {
    if (typeof values.for !== 'string') throw new UsageError(ERRORS.CLI_USAGE, 'window open needs --for DURATION (e.g. 30m)');
    const allow = (Array.isArray(values.allow) ? values.allow : []) as string[];
    let by = `uid:${process.getuid?.() ?? 0}`;
    try {
      by = userInfo().username || by;
    } catch {
      // no passwd entry
    }
    const w = await openWindow({ egress, stateDir, forMs: parseDuration(values.for), allow, by });
    if (ctx.json) ctx.out(JSON.stringify(w));
    else {
      ctx.out(`maintenance window ${w.id} open until ${new Date(w.until).toISOString()} (by ${w.by})`);
      for (const t of w.targets) ctx.out(`  ${t.spec} -> ${t.addresses.join(', ')} (pinned)`);
    }
    return 0;
  }
  if (sub === 'close') {
    const r = await closeWindow({ egress, stateDir });
    ctx.out(ctx.json ? JSON.stringify({ closed: r.window?.id ?? null, removed: r.removed }) : r.window ? `maintenance window ${r.window.id} closed (${r.removed} allowlist entries removed)` : `no window was open (${r.removed} stray entries removed)`);
    return 0;
  }
  if (sub === 'status') {
    const w = readWindow(stateDir);
    const st = await egress.status();
    const open = w !== undefined && w.until > Date.now();
    if (ctx.json) ctx.out(JSON.stringify({ open, window: w ?? null, downloadAllow: st.downloadAllow ?? [] }));
    else {
      ctx.out(!w ? 'no maintenance window' : open ? `maintenance window ${w.id} open until ${new Date(w.until).toISOString()} (by ${w.by})` : `maintenance window ${w.id} EXPIRED at ${new Date(w.until).toISOString()}: the gateway closes it (or run: phantoma egress window close)`);
      ctx.out(`allowlist download/: ${st.downloadAllow?.length ? st.downloadAllow.join(', ') : 'empty'}`);
    }
    return 0;
  }
  throw new UsageError(ERRORS.CLI_USAGE, `usage: ${usage}`);
}
