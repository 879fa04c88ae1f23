// Where the project lives on disk, derived from this file's location (src/paths.ts).
import { fileURLToPath } from 'node:url';
import { dirname, resolve, isAbsolute } from 'node:path';

export function projectRoot(): string {
  return resolve(dirname(fileURLToPath(import.meta.url)), '..');
}

/** Resolves a configured path: absolute as given, relative to the project root otherwise. */
export function resolveFromRoot(p: string): string {
  return isAbsolute(p) ? p : resolve(projectRoot(), p);
}
