#!/usr/bin/env node
// phantoma-cp: the control plane's command line.
//   key init | key show          make the sealed lease key / print its fingerprint (what nodes pin)
//   serve                        run the service (HTTPS API, loopback metrics, admin socket)
//   migrate                      apply the SQL migrations and exit
//   tokens create --node N --ttl 10m      a one-time enrolment token (printed once, stored as a hash)
//   nodes list | show N | revoke N
// tokens/nodes talk to a running instance over its admin socket (<dataDir>/admin.sock).
// The key's passphrase: --passphrase-file, PHANTOMA_CP_PASSPHRASE, or the systemd credential
// $CREDENTIALS_DIRECTORY/<key.credentialName> (a key file) — never an argument value.
import { parseArgs } from 'node:util';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import http from 'node:http';
import { createLogger } from '../../src/logger.ts';
import type { Credential } from '../../src/vault/format.ts';
import { loadCpConfig, type CpConfig } from './config.ts';
import { CP_ERRORS, CpError, isCpError } from './errors.ts';
import { createLeaseKey, readLeaseKeyFingerprint } from './lease-key.ts';
import { openDb, migrate } from './db.ts';
import { startControlPlane } from './server.ts';
import { createNotifier } from '../../src/service/notify.ts';

export interface Io {
  out: (s: string) => void;
  err: (s: string) => void;
  env: Readonly<Record<string, string | undefined>>;
}

const USAGE = `usage: phantoma-cp <command> [--config FILE] [--json]
  key init [--passphrase-file F]     make the sealed lease key (refuses to replace one)
  key show                           print the lease key fingerprint nodes pin
  serve [--passphrase-file F]        run the control plane
  migrate                            apply the database migrations
  tokens create --node NAME [--ttl 10m]
  nodes list | nodes show NAME | nodes revoke NAME`;

export function resolveCpCredential(passphraseFile: string | undefined, env: Io['env'], credentialName: string): Credential {
  const trim = (b: Buffer): Buffer => (b.length && b[b.length - 1] === 0x0a ? b.subarray(0, b.length - 1) : b);
  try {
    if (passphraseFile) return { kind: 'passphrase', secret: trim(readFileSync(passphraseFile)) };
    if (env.PHANTOMA_CP_PASSPHRASE !== undefined) return { kind: 'passphrase', secret: Buffer.from(env.PHANTOMA_CP_PASSPHRASE) };
    if (env.CREDENTIALS_DIRECTORY) return { kind: 'keyfile', secret: readFileSync(join(env.CREDENTIALS_DIRECTORY, credentialName)) };
  } catch (err) {
    throw new CpError(CP_ERRORS.KEY_UNREADABLE, `cannot read the lease key credential: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  throw new CpError(CP_ERRORS.KEY_UNREADABLE, `no lease key credential: pass --passphrase-file, set PHANTOMA_CP_PASSPHRASE, or provide the systemd credential "${credentialName}"`);
}

/** Parses "90s", "10m", "2h", "7d" (or plain seconds). */
export function parseDuration(text: string): number {
  const m = /^(\d{1,7})([smhd]?)$/.exec(text);
  if (!m) throw new CpError(CP_ERRORS.USAGE, `"${text.slice(0, 16)}" is not a duration like 90s, 10m, 2h or 7d`);
  return Number(m[1]) * { '': 1, s: 1, m: 60, h: 3600, d: 86400 }[m[2] as '' | 's' | 'm' | 'h' | 'd'];
}

async function admin(config: Readonly<CpConfig>, method: 'GET' | 'POST', path: string, body?: unknown): Promise<unknown> {
  const socketPath = join(config.dataDir, 'admin.sock');
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = http.request(
      { socketPath, method, path, headers: payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}, timeout: 30_000 },
      (res) => {
        const parts: Buffer[] = [];
        res.on('data', (c: Buffer) => parts.push(c));
        res.on('end', () => {
          let parsed: { error?: { code: string; message: string } };
          try {
            parsed = JSON.parse(Buffer.concat(parts).toString('utf8'));
          } catch {
            reject(new CpError(CP_ERRORS.ADMIN_UNREACHABLE, 'the admin socket answered with something that is not JSON'));
            return;
          }
          if (parsed.error) {
            const d = Object.values(CP_ERRORS).find((e) => e.code === parsed.error!.code) ?? CP_ERRORS.INTERNAL;
            reject(new CpError(d, parsed.error.message));
          } else resolve(parsed);
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', (err: NodeJS.ErrnoException) =>
      reject(new CpError(CP_ERRORS.ADMIN_UNREACHABLE, `no control plane is running on ${socketPath} (${err.code ?? err.message}); start phantoma-cp serve`)),
    );
    req.end(payload);
  });
}

export async function runCpCli(argv: string[], io: Io): Promise<number> {
  try {
    let parsed;
    try {
      parsed = parseArgs({
        args: argv,
        allowPositionals: true,
        strict: true,
        options: {
          config: { type: 'string' },
          json: { type: 'boolean' },
          help: { type: 'boolean', short: 'h' },
          'passphrase-file': { type: 'string' },
          node: { type: 'string' },
          ttl: { type: 'string' },
          port: { type: 'string' },
          host: { type: 'string' },
          database: { type: 'string' },
          'data-dir': { type: 'string' },
        },
      });
    } catch (err) {
      throw new CpError(CP_ERRORS.USAGE, `${(err as Error).message}\n${USAGE}`);
    }
    const v = parsed.values;
    const [cmd, sub, arg] = parsed.positionals;
    if (v.help || cmd === undefined) {
      io.out(USAGE);
      return cmd === undefined && !v.help ? 2 : 0;
    }
    const overrides: Record<string, unknown> = {};
    if (v.port !== undefined) overrides.port = Number(v.port);
    if (v.host !== undefined) overrides.host = v.host;
    if (v.database !== undefined) overrides.database = v.database;
    if (v['data-dir'] !== undefined) overrides.dataDir = v['data-dir'];
    const config = loadCpConfig(v.config, overrides);
    const print = (human: string, data: unknown): void => io.out(v.json ? JSON.stringify(data) : human);
    const credential = (): Credential => resolveCpCredential(v['passphrase-file'], io.env, config.key.credentialName);

    if (cmd === 'key' && sub === 'init') {
      const key = createLeaseKey(config.dataDir, credential(), { log2N: config.key.kdfLog2N, r: config.key.kdfR, p: config.key.kdfP });
      print(`made the lease key; nodes pin ${key.fingerprint}`, { fingerprint: key.fingerprint });
      return 0;
    }
    if (cmd === 'key' && sub === 'show') {
      const fingerprint = readLeaseKeyFingerprint(config.dataDir);
      print(fingerprint, { fingerprint });
      return 0;
    }
    if (cmd === 'migrate') {
      const db = await openDb(config.database, config.dataDir);
      try {
        const applied = await migrate(db);
        print(applied.length ? `applied ${applied.join(', ')}` : 'the database is up to date', { applied });
      } finally {
        await db.close();
      }
      return 0;
    }
    if (cmd === 'serve') {
      const logger = createLogger({ level: config.logLevel });
      // Under systemd (Type=notify): READY=1 once it listens with its database migrated; WATCHDOG=1 while
      // the event loop runs and the database answers; otherwise nothing is sent (a no-op by hand, in tests).
      // The environment is the process's own at the entry point: the notify variables leave it here.
      const notifier = createNotifier(io.env as NodeJS.ProcessEnv, (err) => logger.warn({ err: err.message }, 'sd_notify failed'));
      const cp = await startControlPlane(config, { logger, credential: credential() });
      print(`phantoma-cp: serving ${cp.url} (lease key ${cp.fingerprint})`, { url: cp.url, fingerprint: cp.fingerprint, metrics: cp.metricsUrl, admin: cp.adminSocket });
      notifier.ready(`serving ${cp.url}`);
      const watchdog = notifier.watchdogMs === undefined ? undefined : setInterval(() => void pingDatabase(cp.db, notifier), Math.max(500, Math.floor(notifier.watchdogMs / 2)));
      const stopped = Promise.withResolvers<void>();
      const stop = (): void => {
        clearInterval(watchdog);
        notifier.stopping('stopping: closing connections');
        void cp.close().then(() => stopped.resolve());
      };
      process.once('SIGTERM', stop);
      process.once('SIGINT', stop);
      await stopped.promise;
      return 0;
    }
    if (cmd === 'tokens' && sub === 'create') {
      if (typeof v.node !== 'string') throw new CpError(CP_ERRORS.USAGE, 'tokens create needs --node NAME');
      const r = (await admin(config, 'POST', '/tokens', { node: v.node, ttlSeconds: parseDuration(v.ttl ?? '10m') })) as { token: string; expiresAt: string };
      // The token goes to stdout alone (pipe it into `phantoma enroll`); it is shown once and stored only as a hash.
      print(r.token, r);
      return 0;
    }
    if (cmd === 'nodes' && sub === 'list') {
      const r = (await admin(config, 'GET', '/nodes')) as { nodes: Array<Record<string, unknown>> };
      print(
        r.nodes.length === 0
          ? 'no nodes'
          : r.nodes.map((n) => `${String(n.name).padEnd(24)} ${String(n.status).padEnd(8)} lease ${String(n.leaseState).padEnd(8)} last ${n.lastSeenAt ?? 'never'} #${n.lastCounter} ${n.lastVersion ?? ''}`).join('\n'),
        r,
      );
      return 0;
    }
    if (cmd === 'nodes' && (sub === 'show' || sub === 'revoke') && arg !== undefined) {
      const r = await admin(config, sub === 'show' ? 'GET' : 'POST', `/nodes/${encodeURIComponent(arg)}${sub === 'revoke' ? '/revoke' : ''}`);
      print(JSON.stringify(r, null, 2), r);
      return 0;
    }
    throw new CpError(CP_ERRORS.USAGE, USAGE);
  } catch (err) {
    const e = isCpError(err) ? err : new CpError(CP_ERRORS.INTERNAL, (err as Error)?.stack ?? String(err));
    if (argv.includes('--json')) io.err(JSON.stringify({ error: { code: e.code, message: e.message } }));
    else io.err(`phantoma-cp: ${e.message} [${e.code}]`);
    return e.exit;
  }
}

/** WATCHDOG=1 only when the database answers within a second; a blocked event loop sends nothing at all. */
async function pingDatabase(db: { query(sql: string): Promise<unknown> }, notifier: ReturnType<typeof createNotifier>): Promise<void> {
  const timeout = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 1000).unref());
  const answer = await Promise.race([db.query('select 1').then(() => 'ok' as const, () => 'error' as const), timeout]);
  if (answer === 'ok') notifier.watchdog();
  else notifier.status(`degraded: the database did not answer (${answer})`);
}

if (import.meta.main) {
  process.exitCode = await runCpCli(process.argv.slice(2), {
    out: (s) => process.stdout.write(s + '\n'),
    err: (s) => process.stderr.write(s + '\n'),
    env: process.env,
  });
}
