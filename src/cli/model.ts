// phantoma model pull|list|remove (issue 10): models pulled into the node's model directory
// (<stateDir>/models). `pull` runs the download in the warden's download cgroup (src/models/pull.ts), so it
// only reaches an address a maintenance window allows (phantoma egress window open). The gateway picks up
// a pulled model without a restart. (`phantoma models` is the older command for the built-in test models.)
import type { Command } from './main.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { resolveFromRoot } from '../paths.ts';
import { pullModel, type PullProgress } from '../models/pull.ts';
import { listModels, modelDirOf, removeModel, isServed } from '../models/store.ts';

function human(n: number): string {
  return n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(2)} GiB` : n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${(n / 1024).toFixed(0)} KiB`;
}

function eta(s: number | null): string {
  if (s === null || !Number.isFinite(s)) return '--:--';
  const m = Math.floor(s / 60);
  return `${String(m).padStart(2, '0')}:${String(Math.round(s % 60)).padStart(2, '0')}`;
}

/** bytes, rate and ETA: redrawn in place on a terminal, a line per quarter otherwise. */
function progressBar(stream: NodeJS.WriteStream): { update(p: PullProgress): void; finish(): void } {
  let last = 0;
  let quarter = -1;
  return {
    update(p) {
      const frac = p.total ? Math.min(1, p.bytes / p.total) : 0;
      const text = `${human(p.bytes)}${p.total ? ` / ${human(p.total)}` : ''}  ${human(p.rate)}/s  ETA ${eta(p.eta)}`;
      if (stream.isTTY) {
        if (Date.now() - last < 100 && frac < 1) return;
        last = Date.now();
        const filled = Math.round(frac * 30);
        stream.write(`\r[${'#'.repeat(filled)}${'.'.repeat(30 - filled)}] ${(frac * 100).toFixed(0).padStart(3)}% ${text}   `);
      } else if (Math.floor(frac * 4) > quarter) {
        quarter = Math.floor(frac * 4);
        stream.write(`pull: ${(frac * 100).toFixed(0)}% ${text}\n`);
      }
    },
    finish() {
      if (stream.isTTY) stream.write('\n');
    },
  };
}

export const modelCommand: Command = {
  summary: 'pull a model over the network (inside a maintenance window), list or remove pulled models',
  usage: 'phantoma model pull URL --sha256 HEX [--size BYTES] [--name NAME] [--stall-timeout 30s] [--json] | model list [--json] | model remove NAME',
  options: { sha256: { type: 'string' }, size: { type: 'string' }, name: { type: 'string' }, 'stall-timeout': { type: 'string' } },
  async run(ctx, { values, positionals }) {
    const [sub, ...rest] = positionals;
    const config = ctx.config();
    const stateDir = resolveFromRoot(config.stateDir);
    const dir = modelDirOf(stateDir);
    if (sub === 'pull') {
      if (rest.length !== 1 || typeof values.sha256 !== 'string') throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
      const size = typeof values.size === 'string' ? Number(values.size) : undefined;
      let stallMs: number | undefined;
      if (typeof values['stall-timeout'] === 'string') {
        const { parseDuration } = await import('../egress/window.ts');
        stallMs = parseDuration(values['stall-timeout']);
      }
      const bar = ctx.json ? undefined : progressBar(process.stderr);
      let lastJson = 0;
      const r = await pullModel({
        url: rest[0]!,
        sha256: values.sha256,
        ...(size !== undefined ? { size } : {}),
        ...(typeof values.name === 'string' ? { name: values.name } : {}),
        ...(stallMs ? { stallMs } : {}),
        modelDir: dir,
        stateDir,
        wardenSocket: config.warden.socket,
        onProgress: (p) => {
          bar?.update(p);
          if (ctx.json && (Date.now() - lastJson >= 250 || p.bytes === p.total)) {
            lastJson = Date.now();
            ctx.out(JSON.stringify({ event: 'progress', bytes: p.bytes, total: p.total, rate: Math.round(p.rate), eta: p.eta === null ? null : Math.round(p.eta) }));
          }
        },
      });
      bar?.finish();
      if (ctx.json) ctx.out(JSON.stringify({ event: 'done', already: r.already, resumed: r.resumed, attempts: r.attempts, path: r.path, model: r.manifest }));
      else ctx.out(`${r.manifest.name}: ${r.already ? 'already present' : 'pulled'} (${human(r.manifest.bytes)}, sha256 ${r.manifest.sha256}, ${r.manifest.quantisation}, context ${r.manifest.contextLength}) -> ${r.path}`);
      return 0;
    }
    if (sub === 'list') {
      if (rest.length !== 0) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
      const rows = listModels(dir).map((m) => ({ ...m, served: isServed(dir, m.name) }));
      if (ctx.json) ctx.out(JSON.stringify(rows));
      else if (rows.length === 0) ctx.out(`no pulled models in ${dir}`);
      else {
        ctx.out(`${'NAME'.padEnd(24)} ${'SIZE'.padStart(10)}  ${'QUANT'.padEnd(7)} ${'CONTEXT'.padStart(7)}  SHA256            SOURCE`);
        for (const r of rows) {
          const src = r.source.kind === 'url' ? r.source.url : `tuf:${r.source.repository}/${r.source.target}`;
          ctx.out(`${r.name.padEnd(24)} ${human(r.bytes).padStart(10)}  ${r.quantisation.padEnd(7)} ${String(r.contextLength).padStart(7)}  ${r.sha256.slice(0, 16)}  ${src}${r.served ? '  (served)' : ''}`);
        }
      }
      return 0;
    }
    if (sub === 'remove') {
      if (rest.length !== 1) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
      const m = removeModel(dir, rest[0]!);
      ctx.out(ctx.json ? JSON.stringify({ removed: m.name }) : `removed ${m.name} (${human(m.bytes)})`);
      return 0;
    }
    throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
  },
};
