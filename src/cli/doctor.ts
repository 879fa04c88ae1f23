// phantoma doctor — host checks for what the node's guarantees rest on: swap, core dumps, Yama, init_on_free,
// journald, the cgroup layout and tmpfs noswap. Exit 0 when nothing fails (warnings included), 7 when a
// check fails (docs/errors.md: doctor_check_failed).
import type { Command } from './main.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { overallStatus, type CheckResult } from '../doctor/checks.ts';
import { probeHost } from '../doctor/probe.ts';
import { dockerChecks } from '../doctor/docker.ts';

/** Exit status of `phantoma doctor` when at least one check fails. */
export const DOCTOR_FAILED_EXIT = ERRORS.DOCTOR_CHECK_FAILED.exit;

export function formatDoctorTable(results: CheckResult[], verbose: boolean): string {
  const idWidth = Math.max(...results.map((r) => r.id.length), 5);
  const lines = results.map((r) => {
    const head = `${r.status.toUpperCase().padEnd(4)}  ${r.id.padEnd(idWidth)}  ${r.summary}`;
    if (!verbose || r.detail === undefined) return head;
    return `${head}\n${r.detail.split('\n').map((l) => `${' '.repeat(idWidth + 8)}${l}`).join('\n')}`;
  });
  const counts = (['pass', 'warn', 'fail'] as const).map((s) => `${results.filter((r) => r.status === s).length} ${s}`).join(', ');
  return `${lines.join('\n')}\n\n${counts}: ${overallStatus(results)}`;
}

export const doctorCommand: Command = {
  summary: 'check this host: swap, core dumps, Yama, init_on_free, journald, cgroups, tmpfs noswap',
  usage: 'phantoma doctor [--verbose] [--json]',
  options: { verbose: { type: 'boolean', short: 'v' } },
  async run(ctx, { values, positionals }) {
    if (positionals.length > 0) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const results = probeHost();
    // Host checks need no configuration; the Docker checks run only when a readable config selects Docker.
    let config: ReturnType<typeof ctx.config> | undefined;
    try {
      config = ctx.config();
    } catch {
      config = undefined;
    }
    if (config?.workers.backend === 'docker') results.push(...(await dockerChecks(config)));
    ctx.out(ctx.json ? JSON.stringify(results) : formatDoctorTable(results, values.verbose === true));
    return results.some((r) => r.status === 'fail') ? DOCTOR_FAILED_EXIT : 0;
  },
};
