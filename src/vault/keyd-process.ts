// keyd as a child of the gateway (`phantoma keyd`): started before the warden (which bind-mounts its socket
// into workers), its audit lines relayed into the node's audit log, stopped after the workers. The vault
// credential reaches it the way it reached the gateway (inherited environment or systemd credential
// directory); the gateway then drops PHANTOMA_VAULT_PASSPHRASE from its own environment.
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { ERRORS, PhantomaError } from '../errors.ts';
import { projectRoot } from '../paths.ts';
import type { Logger } from '../logger.ts';
import type { KeydAuditEvent } from './keyd.ts';
import { existsSync } from 'node:fs';
import type { Config } from '../config/schema.ts';
import { certificateFingerprint, type TlsMaterial } from '../gateway/tls.ts';
import { createKeydClient, type KeydClient } from './keyd-client.ts';
import { vaultPathOf } from './settings.ts';

export interface KeydProcess {
  pid: number;
  stop(): Promise<void>;
}

export async function startKeydProcess(o: {
  vaultPath: string;
  socketPath: string;
  gatewayUid: number;
  cgroupName: string;
  workerUids: { from: number; to: number };
  /** Docker backend: worker containers' CgroupParent (keyd then accepts `<parent>/<container id>` callers too). */
  dockerCgroupParent?: string;
  logLevel: string;
  env: NodeJS.ProcessEnv;
  logger: Logger;
  audit: (e: KeydAuditEvent) => void;
  readyTimeoutMs?: number;
}): Promise<KeydProcess> {
  const args = [
    '--disable-warning=ExperimentalWarning',
    join(projectRoot(), 'src', 'cli', 'main.ts'),
    'keyd',
    `--vault.path=${o.vaultPath}`,
    `--vault.keydSocket=${o.socketPath}`,
    `--warden.cgroupName=${o.cgroupName}`,
    `--warden.uidFrom=${o.workerUids.from}`,
    `--warden.uidTo=${o.workerUids.to}`,
    `--logLevel=${o.logLevel}`,
    '--gateway-uid',
    String(o.gatewayUid),
    '--exit-with-parent',
    ...(o.dockerCgroupParent ? ['--docker-cgroup-parent', o.dockerCgroupParent] : []),
  ];
  const log = o.logger.child({ component: 'keyd' });
  const child: ChildProcess = spawn(process.execPath, args, { env: o.env, stdio: ['pipe', 'pipe', 'pipe'] });
  const errLines: string[] = [];
  createInterface({ input: child.stderr! }).on('line', (l) => {
    errLines.push(l);
    if (errLines.length > 20) errLines.shift();
    log.info({ keyd: l.slice(0, 2000) }, 'keyd');
  });
  const ready = Promise.withResolvers<void>();
  createInterface({ input: child.stdout! }).on('line', (l) => {
    let msg: { ready?: boolean; audit?: KeydAuditEvent };
    try {
      msg = JSON.parse(l) as typeof msg;
    } catch {
      return;
    }
    if (msg.ready) ready.resolve();
    else if (msg.audit) o.audit(msg.audit);
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const timer = setTimeout(() => ready.reject(new Error('not ready in time')), o.readyTimeoutMs ?? 60_000);
  void exited.then((code) => ready.reject(new Error(`exited with ${code}`)));
  try {
    await ready.promise;
  } catch (err) {
    child.kill('SIGKILL');
    // keyd's own error line (e.g. "phantoma: ... [vault_passphrase_wrong]") says what went wrong.
    const last = errLines.filter((l) => l.startsWith('phantoma:')).pop() ?? errLines.pop() ?? '';
    const code = /\[([a-z_]+)\]$/.exec(last)?.[1];
    const def = Object.values(ERRORS).find((d) => d.code === code) ?? ERRORS.KEYD_UNAVAILABLE;
    throw new PhantomaError(def, `keyd did not start (${(err as Error).message}): ${last}`, { cause: err });
  } finally {
    clearTimeout(timer);
  }
  return {
    pid: child.pid!,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(t);
    },
  };
}

export interface NodeKeyd {
  client: KeydClient;
  socketPath: string;
  /** TLS material from the vault (the gateway's only private key). */
  tls(): Promise<TlsMaterial>;
  stop(): Promise<void>;
}

/**
 * For startNode: when the configured vault exists, start keyd (or, with vault.keydStart=false, connect to
 * the one its own unit runs) and return a client; without a vault, undefined (the node runs as before
 * issue 7: TLS key in the state directory, no key document).
 */
export async function startNodeKeyd(config: Readonly<Config>, deps: { logger: Logger; env: NodeJS.ProcessEnv; audit: (e: KeydAuditEvent) => void }): Promise<NodeKeyd | undefined> {
  const vaultPath = vaultPathOf(config);
  if (!existsSync(vaultPath)) return undefined;
  const socketPath = config.vault.keydSocket;
  const child = config.vault.keydStart
    ? await startKeydProcess({
        vaultPath,
        socketPath,
        gatewayUid: process.getuid!(),
        cgroupName: config.warden.cgroupName,
        workerUids: { from: config.warden.uidFrom, to: config.warden.uidTo },
        ...(config.workers.backend === 'docker' ? { dockerCgroupParent: config.docker.cgroupParent } : {}),
        logLevel: config.logLevel,
        env: deps.env,
        logger: deps.logger,
        audit: deps.audit,
      })
    : undefined;
  const client = createKeydClient({ socketPath });
  try {
    await client.ping();
  } catch (err) {
    await child?.stop();
    throw err;
  }
  return {
    client,
    socketPath,
    async tls() {
      const { key, cert } = await client.tls();
      return { key, cert, fingerprint: certificateFingerprint(cert), generated: false };
    },
    stop: async () => {
      client.close();
      await child?.stop();
    },
  };
}
