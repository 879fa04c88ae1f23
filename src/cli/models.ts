// phantoma models ensure|list|check
import { statSync } from 'node:fs';
import type { Command } from './main.ts';
import { resolveFromRoot } from '../paths.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { createModelRegistry } from '../models/registry.ts';
import { ensureTestModel, TEST_MODELS } from '../models/test-models.ts';
import { readGgufSummary } from '../models/gguf-reader.ts';
import { createProgressBar } from './progress.ts';
import { join } from 'node:path';

export const modelsCommand: Command = {
  summary: 'make the built-in test models, list configured models, or check a GGUF file',
  usage: 'phantoma models ensure [tiny|bench ...] [--quiet-if-cached] | models list [--json] | models check FILE [--json]',
  options: { 'quiet-if-cached': { type: 'boolean' } },
  async run(ctx, { values, positionals }) {
    const [sub, ...names] = positionals;
    const config = ctx.config();
    const cacheDir = join(resolveFromRoot(config.cacheDir), 'models');
    if (sub === 'ensure') {
      const wanted = names.length > 0 ? names : Object.keys(TEST_MODELS);
      const results = [];
      for (const name of wanted) {
        const bar = createProgressBar(`generating ${name} model`);
        const made = await ensureTestModel(name, { cacheDir, onProgress: bar.update });
        bar.finish();
        results.push({ name, path: made.path, bytes: made.bytes, sha256: made.sha256, generated: made.generated });
        if (!ctx.json && (made.generated || !values['quiet-if-cached'])) {
          ctx.out(`${name}: ${made.path} (${(made.bytes / 1048576).toFixed(1)} MB, sha256 ${made.sha256.slice(0, 16)}…)${made.generated ? ' generated' : ' cached'}`);
        }
      }
      if (ctx.json) ctx.out(JSON.stringify(results));
      return 0;
    }
    if (sub === 'list') {
      const registry = createModelRegistry({ models: config.models, cacheDir: resolveFromRoot(config.cacheDir) });
      const rows = [];
      for (const name of registry.names()) {
        const m = await registry.resolve(name);
        const s = readGgufSummary(m.path);
        rows.push({ name, path: m.path, builtin: m.builtin, bytes: statSync(m.path).size, contextLength: Number(s.metadata.get(`${String(s.metadata.get('general.architecture'))}.context_length`) ?? 0) });
      }
      ctx.out(ctx.json ? JSON.stringify(rows) : rows.map((r) => `${r.name.padEnd(12)} ctx ${String(r.contextLength).padEnd(7)} ${(r.bytes / 1048576).toFixed(1).padStart(8)} MB  ${r.path}`).join('\n'));
      return 0;
    }
    if (sub === 'check') {
      if (names.length !== 1) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
      const s = readGgufSummary(names[0]!);
      const info = {
        path: names[0],
        version: s.version,
        architecture: s.metadata.get('general.architecture'),
        name: s.metadata.get('general.name'),
        tensors: s.tensors.length,
        metadataEntries: s.metadata.size,
        bytes: s.fileBytes,
      };
      ctx.out(ctx.json ? JSON.stringify(info) : `valid GGUF v${info.version}: ${String(info.name)} (${String(info.architecture)}), ${info.tensors} tensors, ${info.metadataEntries} metadata entries`);
      return 0;
    }
    throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
  },
};
