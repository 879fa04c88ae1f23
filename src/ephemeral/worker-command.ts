// How a worker process is started, whichever backend starts it: the pinned Node runtime, V8 flags that
// keep a one-shot process small, and the compiled worker entry (dist/, made by scripts/build.sh).
import { existsSync, statSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { projectRoot } from '../paths.ts';
import { PhantomaError, ERRORS } from '../errors.ts';
import { SLOT_INFO } from '../updates/slots.ts';

/**
 * A worker lives for one request: a 1 MiB young generation and one GC helper thread cost nothing there
 * and save ~13 MiB of memory per warm worker (measured: 52 → 39 MiB for Node plus our imports).
 */
export const WORKER_NODE_FLAGS = ['--max-semi-space-size=1', '--v8-pool-size=1', '--expose-gc', '--disable-warning=ExperimentalWarning'] as const;

export interface WorkerCommand {
  exec: string;
  flags: readonly string[];
  script: string;
}

function newestMtime(dir: string): number {
  let newest = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    newest = Math.max(newest, e.isDirectory() ? newestMtime(p) : statSync(p).mtimeMs);
  }
  return newest;
}

/**
 * The compiled worker; in a checkout it refuses a dist/ older than src/ (a stale worker would run old code
 * silently). An installed release slot (src/updates/slots.ts marks it) needs no such check: its dist/ and
 * src/ are one signed, manifest-checked build, unpacked with normalised times and without the stamp.
 */
export function workerCommand(): WorkerCommand {
  const root = projectRoot();
  const script = join(root, 'dist', 'src', 'ephemeral', 'worker-main.js');
  if (existsSync(join(root, SLOT_INFO))) {
    if (!existsSync(script)) throw new PhantomaError(ERRORS.CONFIG_INVALID, `the release in ${root} has no compiled worker (${script})`);
    return { exec: process.execPath, flags: WORKER_NODE_FLAGS, script };
  }
  const stamp = join(root, 'dist', '.build-stamp');
  if (!existsSync(script) || !existsSync(stamp)) {
    throw new PhantomaError(ERRORS.CONFIG_INVALID, `the compiled worker ${script} is missing: run scripts/setup.sh (or scripts/build.sh)`);
  }
  if (newestMtime(join(root, 'src')) > statSync(stamp).mtimeMs) {
    throw new PhantomaError(ERRORS.CONFIG_INVALID, 'dist/ is older than src/: run scripts/build.sh so workers run the current code');
  }
  return { exec: process.execPath, flags: WORKER_NODE_FLAGS, script };
}
