// The whole project type-checks under the strict tsconfig (Node runs the sources with types stripped,
// so nothing else would catch a type error).
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { ROOT } from './helpers.ts';

t.test('tsc --noEmit passes', async (t) => {
  const r = spawnSync(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(ROOT, 'tsconfig.json')], { encoding: 'utf8', timeout: 180_000 });
  t.equal(r.status, 0, r.stdout + r.stderr);
});
