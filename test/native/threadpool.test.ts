// The persistent-threadpool preload library attaches a pool to node-llama-cpp's context and changes
// nothing about what is generated.
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { ROOT } from '../helpers.ts';
import { threadpoolShimPath } from '../../src/main.ts';

const script = join(ROOT, 'test', 'native', 'gen-once.ts');
const run = (env: Record<string, string>) =>
  spawnSync(process.execPath, ['--disable-warning=ExperimentalWarning', script], { env: { ...process.env, ...env }, encoding: 'utf8', timeout: 60_000 });

t.test('the shim attaches a persistent threadpool and generation is unchanged', async (t) => {
  const shim = threadpoolShimPath();
  const plain = run({ PHANTOMA_THREADPOOL_DEBUG: '1' });
  const pooled = run({ LD_PRELOAD: shim, PHANTOMA_THREADPOOL_DEBUG: '1' });
  t.equal(plain.status, 0, plain.stderr);
  t.equal(pooled.status, 0, pooled.stderr);
  t.notMatch(plain.stderr, /attached a persistent threadpool/, 'without the shim nothing is attached (the check can tell)');
  t.match(pooled.stderr, /phantoma_threadpool: attached a persistent threadpool/);
  t.same(JSON.parse(pooled.stdout).tokens, JSON.parse(plain.stdout).tokens, 'same token ids with and without the shim');
  t.equal(JSON.parse(pooled.stdout).tokens.length, 24);
});
