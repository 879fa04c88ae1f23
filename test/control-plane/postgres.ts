// A real PostgreSQL server for tests (Debian's postgresql package): initdb and postgres run as the
// unprivileged user nobody (via setpriv, which execs, so the pid we signal is postgres itself), in a temp
// dir, on a loopback port, fsync off. stop() ends it (fast shutdown, then SIGKILL) and removes the dir.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chownSync, mkdtempSync, rmSync, existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const PG_BIN = '/usr/lib/postgresql/15/bin';
const NOBODY = 65534;

export interface PgServer {
  /** TCP on 127.0.0.1. */
  url: string;
  /** The same server over its unix socket (what a control plane on the database's host would use). */
  socketUrl: string;
  port: number;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

const asNobody = (cmd: string, args: string[]): [string, string[]] => ['setpriv', ['--reuid', String(NOBODY), '--regid', String(NOBODY), '--clear-groups', '--', cmd, ...args]];

export async function startPostgres(): Promise<PgServer> {
  if (!existsSync(join(PG_BIN, 'postgres'))) throw new Error(`PostgreSQL server binaries are missing in ${PG_BIN}: scripts/setup.sh installs the postgresql package`);
  const dir = mkdtempSync(join(tmpdir(), 'phantoma-pg-'));
  chownSync(dir, NOBODY, NOBODY);
  const data = join(dir, 'data');
  const [c1, a1] = asNobody(join(PG_BIN, 'initdb'), ['-D', data, '-U', 'phantoma', '--auth=trust', '-E', 'UTF8', '--no-sync', '--no-instructions']);
  const init = spawnSync(c1, a1, { encoding: 'utf8', timeout: 60_000, cwd: dir });
  if (init.status !== 0) {
    rmSync(dir, { recursive: true, force: true });
    throw new Error(`initdb failed: ${init.stderr || init.error?.message}`);
  }
  const port = await freePort();
  const [c2, a2] = asNobody(join(PG_BIN, 'postgres'), ['-D', data, '-h', '127.0.0.1', '-p', String(port), '-k', dir, '-c', 'fsync=off', '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off', '-c', 'max_connections=50']);
  const child: ChildProcess = spawn(c2, a2, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (c: Buffer) => (stderr = (stderr + c.toString()).slice(-4000)));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const url = `postgres://phantoma@127.0.0.1:${port}/postgres`;
  const stop = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGINT');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    }
    rmSync(dir, { recursive: true, force: true });
  };
  const { default: pg } = await import('pg');
  for (let i = 0; ; i++) {
    const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 1000 });
    try {
      await client.connect();
      await client.end();
      break;
    } catch {
      await client.end().catch(() => {});
      if (i >= 100 || child.exitCode !== null) {
        await stop();
        throw new Error(`postgres did not start: ${stderr}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  return { url, socketUrl: `postgresql:///postgres?host=${encodeURIComponent(dir)}&port=${port}&user=phantoma`, port, stop };
}
