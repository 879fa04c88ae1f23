// The control plane's composition root: opens the database (and migrates it), unseals the lease key, builds
// the apps and listens. `phantoma-cp serve` and the tests call startControlPlane.
import { chmodSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from '../../src/logger.ts';
import type { Credential } from '../../src/vault/format.ts';
import type { CpConfig } from './config.ts';
import { openDb, migrate, type Db } from './db.ts';
import { openLeaseKey, leaseKeyCertificate, type LeaseKey } from './lease-key.ts';
import { createControlPlaneService, type ControlPlaneService } from './service.ts';
import { buildControlPlaneApps } from './app.ts';
import { createTimestampResigner } from './updates.ts';

export interface RunningControlPlane {
  url: string;
  metricsUrl: string;
  adminSocket: string;
  fingerprint: string;
  service: ControlPlaneService;
  db: Db;
  close(): Promise<void>;
}

export interface ControlPlaneStartDeps {
  logger: Logger;
  credential: Credential;
  clock?: () => number;
  /** Use an already open database (tests share one PGlite between instances of a file). */
  db?: Db;
  /** Plain HTTP (tests of the HTTP layer only); nodes always use HTTPS. */
  insecureHttp?: boolean;
}

const PRUNE_EVERY_MS = 3_600_000;

function hostForUrl(host: string): string {
  return host.includes(':') ? `[${host}]` : host === '0.0.0.0' ? '127.0.0.1' : host;
}

export async function startControlPlane(config: Readonly<CpConfig>, deps: ControlPlaneStartDeps): Promise<RunningControlPlane> {
  const log = deps.logger;
  mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
  const key: LeaseKey = openLeaseKey(config.dataDir, deps.credential);
  const db = deps.db ?? (await openDb(config.database, config.dataDir));
  const ownDb = deps.db === undefined;
  try {
    const applied = await migrate(db);
    if (applied.length) log.info({ applied }, 'database migrated');
  } catch (err) {
    if (ownDb) await db.close();
    throw err;
  }
  const service = createControlPlaneService({ db, key, config, ...(deps.clock ? { clock: deps.clock } : {}) });
  const tls = deps.insecureHttp ? undefined : await leaseKeyCertificate(key);
  const repoDir = config.updates.repoDir;
  const { app, metricsApp, adminApp } = await buildControlPlaneApps({ service, config, logger: log, ...(tls ? { tls } : {}), ...(repoDir ? { updates: { repoDir, db } } : {}) });
  const resigner =
    repoDir && config.updates.timestampKeyFile
      ? createTimestampResigner({
          db,
          repoDir,
          key: config.updates.timestampKeyFile,
          everyMs: config.updates.resignEverySeconds * 1000,
          expiresInMs: config.updates.timestampExpirySeconds * 1000,
          renewBeforeMs: config.updates.renewBeforeSeconds * 1000,
          onError: (err) => log.warn({ err: err.message }, 'timestamp re-signing failed'),
        })
      : undefined;
  const adminSocket = join(config.dataDir, 'admin.sock');
  const prune = (): void => {
    service.prune().then(
      (r) => (r.heartbeats || r.tokens ? log.info(r, 'pruned history') : undefined),
      (err: Error) => log.warn({ err: err.message }, 'prune failed'),
    );
  };
  const pruneTimer = setInterval(prune, PRUNE_EVERY_MS);
  pruneTimer.unref();
  let closing: Promise<void> | undefined;
  const closeAll = async (): Promise<void> => {
    clearInterval(pruneTimer);
    resigner?.stop();
    await app.close();
    await metricsApp.close();
    await adminApp.close();
    if (ownDb) await db.close();
  };
  try {
    await app.listen({ host: config.host, port: config.port });
    await metricsApp.listen({ host: config.metricsHost, port: config.metricsPort });
    rmSync(adminSocket, { force: true });
    await adminApp.listen({ path: adminSocket });
    chmodSync(adminSocket, 0o600);
  } catch (err) {
    await closeAll();
    throw err;
  }
  prune();
  resigner?.start();
  const port = (app.server.address() as { port: number }).port;
  const metricsPort = (metricsApp.server.address() as { port: number }).port;
  const url = `${tls ? 'https' : 'http'}://${hostForUrl(config.host)}:${port}`;
  log.info({ url, fingerprint: key.fingerprint, database: db.kind }, 'control plane listening');
  return {
    url,
    metricsUrl: `http://${hostForUrl(config.metricsHost)}:${metricsPort}/metrics`,
    adminSocket,
    fingerprint: key.fingerprint,
    service,
    db,
    close: () => (closing ??= closeAll()),
  };
}
