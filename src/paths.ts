// Where the project lives on disk. Sources run from src/ (type-stripped) or from dist/src/ (compiled,
// for workers), so the root is the nearest ancestor holding package.json.
import { fileURLToPath } from 'node:url';
import { dirname, resolve, isAbsolute, join } from 'node:path';
import { existsSync } from 'node:fs';

export function projectRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    dir = resolve(dir, '..');
    if (existsSync(join(dir, 'package.json'))) return dir;
  }
  throw new Error('phantoma: cannot find the project root above src/paths');
}

/** Resolves a configured path: absolute as given, relative to the project root otherwise. */
export function resolveFromRoot(p: string): string {
  return isAbsolute(p) ? p : resolve(projectRoot(), p);
}
