// Resolves the configured model names to files on disk: built-in test models are generated into the
// cache on first use; operator models are used from their configured path (and digest, when given).
import { join } from 'node:path';
import type { ModelConfig } from '../config/schema.ts';
import { ensureTestModel, type ProgressFn } from './test-models.ts';
import { ModelError, ERRORS } from '../errors.ts';

export interface ResolvedModel {
  name: string;
  path: string;
  /** Digest to verify before loading (built-in models are verified against their cache manifest instead). */
  sha256?: string;
  builtin: boolean;
}

export interface ModelRegistry {
  names(): string[];
  resolve(name: string, onProgress?: (name: string) => ProgressFn | undefined): Promise<ResolvedModel>;
}

export function createModelRegistry(deps: { models: readonly ModelConfig[]; cacheDir: string }): ModelRegistry {
  const byName = new Map(deps.models.map((m) => [m.name, m]));
  return {
    names: () => [...byName.keys()],
    async resolve(name, onProgress) {
      const m = byName.get(name);
      if (!m) {
        throw new ModelError(ERRORS.MODEL_NOT_FOUND, `model "${name}" is not configured (available: ${[...byName.keys()].join(', ')})`, { details: { model: name } });
      }
      if ('builtin' in m) {
        const made = await ensureTestModel(m.builtin, { cacheDir: join(deps.cacheDir, 'models'), onProgress: onProgress?.(m.builtin) });
        return { name, path: made.path, builtin: true };
      }
      return { name, path: m.path, ...(m.sha256 ? { sha256: m.sha256 } : {}), builtin: false };
    },
  };
}
