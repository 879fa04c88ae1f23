// Shared test helpers: the project's paths, the cached tiny model, and the CLI run as a real process.
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { projectRoot } from '../src/paths.ts';
import { ensureTestModel } from '../src/models/test-models.ts';

export const ROOT = projectRoot();
export const MODEL_CACHE = join(ROOT, '.cache', 'models');

export async function tinyModelPath(): Promise<string> {
  return (await ensureTestModel('tiny', { cacheDir: MODEL_CACHE })).path;
}

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs bin/phantoma with a bounded lifetime; a hung command is killed and reported, not waited on. */
export function runPhantoma(args: string[], opts: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(join(ROOT, 'bin', 'phantoma'), args, { env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}
