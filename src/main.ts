// The composition root: reads nothing itself, builds every part from a validated config and wires them.
// `phantoma serve` calls startNode; tests call it too, on port 0.
import { mkdirSync, existsSync, readFileSync } from 'node:fs';
import { PhantomaError, ERRORS } from './errors.ts';
import { join, dirname } from 'node:path';
import type { Config } from './config/schema.ts';
import type { Logger } from './logger.ts';
import { resolveFromRoot, projectRoot } from './paths.ts';
import { markGoodIfOnTrial } from './updates/slots.ts';
import { installedVersion } from './version.ts';
import { createModelRegistry } from './models/registry.ts';
import { readGgufSummary } from './models/gguf-reader.ts';
import { checkMemoryBudget } from './models/memory.ts';
import { modelPoolSettings } from './models/pool-settings.ts';
import { createProcessBackend } from './ephemeral/process-backend.ts';
import { createWardenClient } from './ephemeral/warden-client.ts';
import { createWardenBackend } from './ephemeral/warden-backend.ts';
import { connectDockerBackend } from './ephemeral/docker-connect.ts';
import { startWardenProcess, type WardenProcess, type WardenProcessOptions } from './ephemeral/warden-process.ts';
import { workerCommand } from './ephemeral/worker-command.ts';
import type { WorkerBackend } from './ephemeral/backend.ts';
import { createWorkerPool } from './ephemeral/pool.ts';
import { createGatewayMetrics } from './gateway/metrics.ts';
import { createApiKeyStore, type ApiKeyStore } from './gateway/api-keys.ts';
import { ensureSelfSignedTls, loadProvidedTls, type TlsMaterial } from './gateway/tls.ts';
import { buildGateway, type ServedModel } from './gateway/app.ts';
import { createNodeControl, type NodeControl } from './control/node-control.ts';
import { keydSigner, type NodeSigner } from './control/node.ts';
import { createAuditLog, auditDirOf, type AuditLog } from './audit/audit-log.ts';
import { drainPendingAudit } from './audit/pending.ts';
import { parseCgroupMounts } from './doctor/checks.ts';
import type { AuditEvent } from './audit/audit-events.ts';
import type { PoolObserver } from './ephemeral/pool.ts';
import { swapPolicy, type SwapDevice } from './doctor/checks.ts';
import { probeSwaps } from './doctor/probe.ts';
import { setupNodeEgress } from './egress/node.ts';
import type { Envelope } from './sealed/envelope.ts';
import { startWindowKeeper } from './egress/window.ts';
import { createEgressClient } from './egress/warden-egress.ts';
import { modelDirOf, writeServed } from './models/store.ts';
import { watchModelDir } from './models/watch.ts';
import type { EgressMonitor } from './egress/monitor.ts';
import { startNodeKeyd } from './vault/keyd-process.ts';
import { createSealedRegistry } from './gateway/sealed-registry.ts';
import { KEYD_SOCKET_IN_WORKER } from './ephemeral/docker-backend.ts';
import { createKeyDocumentSource } from './gateway/key-document.ts';

export interface RunningNode {
  url: string;
  metricsUrl: string;
  tls: TlsMaterial | undefined;
  models: readonly ServedModel[];
  apiKeys: ApiKeyStore | undefined;
  audit: AuditLog;
  /** The egress monitor (warden-backed nodes), and the egress policy hash for key documents and receipts. */
  egress: EgressMonitor | undefined;
  egressPolicyHash(): string;
  /** keyd's ping, when the node has a vault (the systemd readiness and watchdog checks, src/service/). */
  keydPing?: () => Promise<unknown>;
  /** Stops accepting, lets requests in flight finish (bounded by shutdownGraceMs), then ends every worker. */
  close(): Promise<void>;
}

export interface NodeDeps {
  logger: Logger;
  /** Reads the host's swap devices (default: /proc/swaps and /sys); undefined when unreadable. */
  probeSwaps?: () => SwapDevice[] | undefined;
  /** Defaults to plain child processes; the warden backend replaces it (issue 5). */
  backend?: WorkerBackend;
  /** Where keyd finds the vault credential (PHANTOMA_VAULT_PASSPHRASE, CREDENTIALS_DIRECTORY); default process.env. */
  vaultEnv?: NodeJS.ProcessEnv;
  /** Signs heartbeats to the control plane (issue 11); default: keyd, when the node has a vault. */
  heartbeatSigner?: NodeSigner;
  /** The clock licensing and heartbeats use (tests move it past a lease's expiry). */
  controlClock?: () => number;
  /** Start-up progress, one short line per stage (systemd STATUS= under `phantoma serve`, src/service/). */
  status?: (line: string) => void;
}

/** The LD_PRELOAD library built by scripts/setup.sh; refusing to start without it beats a silent slowdown. */
export function threadpoolShimPath(): string {
  const path = join(projectRoot(), 'native', 'threadpool', 'build', 'libphantoma_threadpool.so');
  if (!existsSync(path)) {
    throw new PhantomaError(ERRORS.CONFIG_INVALID, `inference.persistentThreadpool is on but ${path} is missing: run scripts/setup.sh (or make -C native/threadpool)`);
  }
  return path;
}

/** Worker backends whose workers live in the warden's workers/ cgroup, under its egress filter. */
function filteredByWarden(config: Readonly<Config>): boolean {
  return config.workers.backend === 'warden' || config.workers.backend === 'docker';
}

async function startWardenIfConfigured(config: Readonly<Config>, log: Logger, modelPaths: readonly string[], keydSocket?: string): Promise<WardenProcess | undefined> {
  // With the Docker backend the warden spawns no worker; it owns workers/ and its egress filter.
  if (!filteredByWarden(config) || !config.warden.start) return undefined;
  return startWardenProcess(wardenProcessOptions(config, log, modelPaths, keydSocket));
}

/** How `phantoma serve` with warden.start runs the warden for this configuration (also what tests run). */
export function wardenProcessOptions(config: Readonly<Config>, log: Logger, modelPaths: readonly string[], keydSocket?: string): WardenProcessOptions {
  const cmd = workerCommand();
  // The project (runtime, compiled worker, native parts, model cache) and every model's directory stay
  // visible to workers even when they lie under a path the worker's view masks (a checkout in /tmp).
  const expose = [...new Set([projectRoot(), ...modelPaths.map((p) => dirname(p)), modelDirOf(resolveFromRoot(config.stateDir))])];
  return {
    socketPath: config.warden.socket,
    clientUid: process.getuid!(),
    cgroupName: config.warden.cgroupName,
    workerExec: cmd.exec,
    workerScript: cmd.script,
    // --disable-warning is for the process backend; under the warden stderr goes nowhere anyway.
    workerArgs: cmd.flags.filter((f) => !f.startsWith('--disable-warning')),
    ...(config.inference.persistentThreadpool ? { preload: threadpoolShimPath() } : {}),
    uidRange: { from: config.warden.uidFrom, to: config.warden.uidTo },
    memoryMaxBytes: config.workers.memoryMaxBytes,
    pidsMax: config.workers.pidsMax,
    tmpfsBytes: config.workers.tmpfsBytes,
    expose,
    egress: config.egress.mode,
    ...(keydSocket ? { keydSocket } : {}),
    // issue 10: model pulls run as this fixed helper in download/ (the compiled script, like the worker's)
    download: { script: join(dirname(cmd.script), '..', 'models', 'download-helper.js'), uid: config.warden.downloadUid },
    logger: log,
  };
}

async function createBackend(config: Readonly<Config>, stateDir: string, log: Logger): Promise<WorkerBackend> {
  const cmd = workerCommand();
  if (config.workers.backend === 'process') {
    log.warn('workers.backend is "process": workers are NOT isolated (same uid as the gateway, host network and filesystem)');
    return createProcessBackend({ command: cmd, cwd: stateDir, preload: config.inference.persistentThreadpool ? [threadpoolShimPath()] : [] });
  }
  if (config.workers.backend === 'docker') {
    const docker = await connectDockerBackend(config, log, { preloadThreadpool: config.inference.persistentThreadpool });
    if (config.egress.mode === 'enforce') await checkDockerUnderWarden(config, log);
    return docker;
  }
  const client = createWardenClient({ socketPath: config.warden.socket });
  try {
    const status = await client.ping();
    log.info({ wardenPid: status.pid, memory: status.memory, pids: status.pids, noswap: status.noswap }, 'warden reachable');
  } catch (err) {
    throw new PhantomaError(ERRORS.NOT_READY, `the warden is not reachable at ${config.warden.socket}: ${(err as Error).message}`, { cause: err });
  }
  return createWardenBackend({ client, workerExec: cmd.exec, workerScript: cmd.script, uidRange: { from: config.warden.uidFrom, to: config.warden.uidTo }, logger: log });
}

/**
 * Containers run under the egress filter only if their CgroupParent is the warden's workers/ (as a path in
 * the cgroup2 hierarchy, where runc also places them on a hybrid host): refused otherwise, before any starts.
 */
async function checkDockerUnderWarden(config: Readonly<Config>, log: Logger): Promise<void> {
  let workersDir: string;
  try {
    workersDir = (await createWardenClient({ socketPath: config.warden.socket }).ping()).cgroup;
  } catch (err) {
    throw new PhantomaError(ERRORS.NOT_READY, `the warden, whose egress filter worker containers run under, is not reachable at ${config.warden.socket}: ${(err as Error).message} (egress.mode "off" is for development only)`, { cause: err });
  }
  const v2 = parseCgroupMounts(readFileSync('/proc/self/mountinfo', 'utf8')).find((m) => m.version === 2);
  const rel = v2 && workersDir.startsWith(v2.mountPoint + '/') ? workersDir.slice(v2.mountPoint.length) : undefined;
  if (rel !== config.docker.cgroupParent) {
    throw new PhantomaError(ERRORS.CONFIG_INVALID, `docker.cgroupParent ${config.docker.cgroupParent} is not the warden's workers/ cgroup (${rel ?? workersDir}): worker containers would run outside the egress filter`);
  }
  log.info({ cgroupParent: rel }, "worker containers go under the warden's workers/ cgroup");
}

function hostForUrl(host: string): string {
  return host.includes(':') ? `[${host}]` : host === '0.0.0.0' ? '127.0.0.1' : host;
}

export function apiKeyStorePath(config: Readonly<Config>): string {
  return join(resolveFromRoot(config.stateDir), 'api-keys.json');
}

export async function startNode(config: Readonly<Config>, deps: NodeDeps): Promise<RunningNode> {
  const log = deps.logger;
  const status = deps.status ?? (() => undefined);
  status('starting: checking the models');
  const stateDir = resolveFromRoot(config.stateDir);
  mkdirSync(stateDir, { recursive: true, mode: 0o700 });
  const modelDir = modelDirOf(stateDir);
  mkdirSync(modelDir, { recursive: true, mode: 0o755 });

  const registry = createModelRegistry({ models: config.models, cacheDir: resolveFromRoot(config.cacheDir) });
  // Resolved once: for a built-in model this verifies the whole cached file against its digest.
  const resolvedModels = [];
  for (const name of registry.names()) resolvedModels.push(await registry.resolve(name));
  // Memory budgeting (issue 15): refused before anything starts when every pool, warm at once, cannot fit.
  checkMemoryBudget(
    resolvedModels.map((m) => {
      const summary = readGgufSummary(m.path);
      const s = modelPoolSettings(config, m.name, summary);
      return { name: m.name, path: m.path, summary, contextSize: s.contextSize, workers: s.size };
    }),
    config.inference.memoryBudgetBytes,
  );
  // keyd first when there is a vault (issue 7): the warden binds its socket into every worker it spawns.
  const keydAudit: { to?: (e: AuditEvent) => void } = {};
  status('starting: keyd');
  const keyd = await startNodeKeyd(config, { logger: log, env: deps.vaultEnv ?? process.env, audit: (e) => keydAudit.to?.(e) });
  let warden: WardenProcess | undefined;
  let backend: WorkerBackend;
  status('starting: connecting to the warden');
  try {
    warden = deps.backend ? undefined : await startWardenIfConfigured(config, log, resolvedModels.map((m) => m.path), keyd?.socketPath);
    backend = deps.backend ?? (await createBackend(config, stateDir, log));
  } catch (err) {
    await warden?.stop();
    await keyd?.stop();
    throw err;
  }
  const metrics = createGatewayMetrics();
  const audit = createAuditLog({ dir: auditDirOf(config), maxFileBytes: config.audit.maxFileBytes, maxFiles: config.audit.maxFiles });
  // An audit write that fails (disk full) must not take a request down with it; it is logged loudly.
  const record = (event: AuditEvent): void => {
    control.observe(event);
    try {
      audit.append(event);
    } catch (err) {
      log.error({ code: (err as { code?: string }).code, type: event.type }, 'audit append failed');
    }
  };
  // Licensing and heartbeats (issue 11): outbound only, to the control plane the node enrolled with.
  const models: ServedModel[] = [];
  const control: NodeControl = createNodeControl({
    config,
    stateDir,
    logger: log,
    version: installedVersion(),
    signer: deps.heartbeatSigner ?? (keyd ? keydSigner(keyd.client) : undefined),
    pools: () => models.map((m) => m.pool),
    auditHead: () => audit.head(),
    ...(deps.controlClock ? { clock: deps.controlClock } : {}),
  });
  record({ type: 'node_started', version: installedVersion(), pid: process.pid });
  // What `phantoma update …` and systemd's trial-boot units recorded while this node was not the writer.
  const pending = drainPendingAudit(auditDirOf(config), record);
  if (pending.recorded > 0 || pending.skipped > 0) log.info({ recorded: pending.recorded, skipped: pending.skipped }, 'pending audit events recorded');
  if (pending.skipped > 0) log.warn({ skipped: pending.skipped }, 'pending audit lines that were not valid events were dropped');
  keydAudit.to = record;
  // Maintenance windows (issue 10): an expired window is closed (and stray download allowlist entries
  // removed) before anything else; then the keeper closes the open window at its deadline.
  const windowKeeper = !deps.backend && filteredByWarden(config) && config.egress.mode === 'enforce'
    ? await startWindowKeeper({ egress: createEgressClient({ socketPath: config.warden.socket }), stateDir, audit: record, log })
    : undefined;
  // Egress filter (issue 9): verified by the kernel's word (and a live probe) before any worker starts;
  // while it is not, no worker starts, running ones end, and /readyz says why (src/egress/gate.ts).
  status('starting: verifying the egress filter');
  const egress = await setupNodeEgress({ config, backend, wardenBackend: !deps.backend && filteredByWarden(config), logger: log, audit: record, registry: metrics.registry });
  backend = egress.backend;
  const observer: PoolObserver = {
    workerStarted(model, ms, workerId) {
      metrics.poolObserver.workerStarted?.(model, ms, workerId);
      record({ type: 'worker_spawned', workerId, model, backend: backend.name });
    },
    workerStartFailed: (model, code) => metrics.poolObserver.workerStartFailed?.(model, code),
    workerEnded(model, outcome, workerId, endMs, verified, detail) {
      metrics.poolObserver.workerEnded?.(model, outcome, workerId, endMs, verified);
      // The process backend sees the pid gone; the warden verifies the cgroup killed, empty and removed.
      const ms = Math.round(endMs * 1000) / 1000;
      record({ type: 'worker_ended', workerId, outcome, verified, endMs: ms });
      record({ type: 'end_verification', workerId, verified, ms, ...(detail ? { detail } : {}) });
    },
  };
  // Swap policy: worker memory holds prompts; unencrypted swap could write it to disk. Fail closed.
  const swaps = (deps.probeSwaps ?? probeSwaps)();
  const policy = swaps === undefined ? { allowed: false, warning: 'cannot read /proc/swaps' } : swapPolicy(swaps, config.pool.allowUnencryptedSwap);
  const blocked = policy.allowed ? undefined : new PhantomaError(ERRORS.UNENCRYPTED_SWAP, `workers are not started: ${policy.warning ?? 'unencrypted swap is on'}; turn swap off or encrypt it, or set pool.allowUnencryptedSwap`);
  if (blocked) log.error({ code: blocked.code }, blocked.message);
  else if (policy.warning) log.warn({ code: ERRORS.UNENCRYPTED_SWAP.code }, policy.warning);
  const workerKeydSocket = !keyd ? undefined : deps.backend || config.workers.backend === 'process' ? keyd.socketPath : config.workers.backend === 'docker' && !config.docker.keydSocket ? undefined : KEYD_SOCKET_IN_WORKER;
  const serveModel = (resolved: { name: string; path: string; sha256?: string }): ServedModel => {
    const name = resolved.name;
    const summary = readGgufSummary(resolved.path);
    // Per-model pool settings (issue 15), falling back to pool.* and inference.*.
    const settings = modelPoolSettings(config, name, summary);
    const contextLength = settings.contextSize;
    const pool = egress.wrapPool(createWorkerPool({
      backend,
      spec: {
        modelName: name,
        modelPath: resolved.path,
        ...(resolved.sha256 ? { sha256: resolved.sha256 } : {}),
        contextSize: contextLength,
        threads: settings.threads,
        batchSize: settings.batchSize,
        logLevel: config.logLevel === 'info' ? 'warn' : config.logLevel,
        // Sealed requests (issue 8): where keyd's socket is in the worker's view — the warden and Docker
        // bind it at a fixed path; a plain process worker sees the host path.
        ...(workerKeydSocket ? { keydSocket: workerKeydSocket } : {}),
        maxEnvelopeBytes: config.sealed.maxEnvelopeBytes,
      },
      size: settings.size,
      maxActive: settings.maxActive,
      maxQueue: config.gateway.maxQueue,
      logger: log,
      observer,
      ...(blocked ? { blocked } : {}),
      lazy: settings.lazy,
      ...(settings.idleMs !== undefined ? { idleMs: settings.idleMs } : {}),
    }));
    const width = Number(summary.metadata.get(`${String(summary.metadata.get('general.architecture'))}.embedding_length`));
    return { name, contextLength, pool, ...(Number.isFinite(width) && width > 0 ? { embeddingLength: width } : {}) };
  };
  for (const resolved of resolvedModels) models.push(serveModel(resolved));
  metrics.watchPools(models.map((m) => m.pool));

  const g = config.gateway;
  const processStartMs = Date.now();
  // The sealed API (issue 8): checks against keyd's public registry, receipts signed by keyd.
  const sealedApi = (client: NonNullable<typeof keyd>['client']) => {
    const registry = createSealedRegistry({ fetch: () => client.registry() });
    // prepare's connection, opened before the first sealed request (which would otherwise open it).
    client.holdPrepareConnection().catch((err: unknown) => log.warn({ err: (err as Error).message }, 'keyd: no connection for prepare yet; the first sealed request opens it'));
    return {
      maxEnvelopeBytes: config.sealed.maxEnvelopeBytes,
      windowMs: config.sealed.windowMs,
      processStartMs,
      maxRememberedNonces: config.sealed.maxRememberedNonces,
      refresh: registry.refresh,
      lookupClient: registry.lookupClient,
      lookupKey: registry.lookupKey,
      signReceipt: (payload: Buffer) => client.sign('receipt', payload),
      // keyd decapsulates for the worker while the job travels to it (the key goes to that worker only).
      prepareKey: (workerId: string, env: Envelope) => client.prepare(workerId, env),
      egressPolicyHash: egress.policyHash,
      releaseVersion: installedVersion(),
    };
  };
  // With a vault the TLS key lives there and comes from keyd; without one, in the state directory as before.
  const tls = g.tls === 'self-signed' ? await (keyd ? keyd.tls() : ensureSelfSignedTls(stateDir)) : g.tls === 'provided' ? loadProvidedTls(g.tlsCertPath!, g.tlsKeyPath!) : undefined;
  if (tls?.generated) log.info({ fingerprint: tls.fingerprint }, 'made a new TLS key and self-signed certificate');
  if (g.auth === 'none') log.warn({ host: g.host }, 'API authentication is OFF (allowed on loopback only): any local process can use this node');
  if (g.tls === 'off') log.warn({ host: g.host }, 'TLS is OFF (allowed on loopback only)');
  const apiKeys = g.auth === 'api-keys' ? createApiKeyStore({ path: apiKeyStorePath(config) }) : undefined;

  const { app, metricsApp } = await buildGateway({ config: g, models, apiKeys, logger: log, metrics, audit: record, license: () => control.license(), ...(tls ? { tls } : {}),
    ...(keyd ? { keyDocument: createKeyDocumentSource({ keyd: keyd.client, egressPolicyHash: egress.policyHash, tlsFingerprint: tls?.fingerprint }) } : {}),
    ...(keyd ? { sealed: sealedApi(keyd.client) } : {}) });
  for (const m of models) m.pool.start();
  // Pulled models (issue 10): served from the model directory as they appear or go, without a restart
  // (`models` is the gateway's live list: /v1/models and routing see a new entry at once).
  const configured = new Set(models.map((m) => m.name));
  const pulledNames = (): string[] => models.filter((m) => !configured.has(m.name)).map((m) => m.name);
  const modelWatch = watchModelDir({
    dir: modelDir,
    onAdd: (m) => {
      if (configured.has(m.name)) return log.warn({ model: m.name }, 'a pulled model has the name of a configured one; not served');
      const served = serveModel({ name: m.name, path: join(modelDir, m.file), sha256: m.sha256 });
      models.push(served);
      served.pool.start();
      writeServed(modelDir, pulledNames());
      record({ type: 'model_added', model: m.name, sha256: m.sha256, bytes: m.bytes });
      log.info({ model: m.name, sha256: m.sha256 }, 'serving a pulled model');
    },
    onRemove: async (name) => {
      const i = models.findIndex((x) => x.name === name && !configured.has(name));
      if (i < 0) return;
      const [gone] = models.splice(i, 1);
      writeServed(modelDir, pulledNames());
      record({ type: 'model_removed', model: name });
      await gone!.pool.close();
    },
    onError: (err) => log.warn({ err: (err as Error).message }, 'model directory scan failed'),
  });
  try {
    await modelWatch.scan();
  } catch (err) {
    log.error({ err: (err as Error).message }, 'model directory scan failed');
  }
  control.start();
  let closing: Promise<void> | undefined;
  const closeAll = async (): Promise<void> => {
    modelWatch.close();
    windowKeeper?.close();
    const graceful = app.close();
    const inTime = await Promise.race([graceful.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), g.shutdownGraceMs).unref())]);
    if (!inTime) log.warn({ graceMs: g.shutdownGraceMs }, 'requests still in flight after the grace period; ending their workers');
    await Promise.all(models.map((m) => m.pool.close()));
    await graceful;
    await metricsApp.close();
    await control.stop();
    egress.close();
    await warden?.stop();
    await keyd?.stop();
    record({ type: 'node_stopped', reason: 'shutdown' });
    audit.close();
  };
  status('starting: opening the gateway');
  try {
    await app.listen({ host: g.host, port: g.port });
    await metricsApp.listen({ host: g.metricsHost, port: g.metricsPort });
  } catch (err) {
    await closeAll();
    throw err;
  }
  const port = (app.server.address() as { port: number }).port;
  const metricsPort = (metricsApp.server.address() as { port: number }).port;
  const url = `${tls ? 'https' : 'http'}://${hostForUrl(g.host)}:${port}`;
  log.info({ url, metrics: `http://${hostForUrl(g.metricsHost)}:${metricsPort}/metrics`, ...(tls ? { tlsFingerprint: tls.fingerprint } : {}) }, 'gateway listening');
  // Signed updates (issue 12): a release on its trial boot marks itself good once it serves.
  try {
    const marked = markGoodIfOnTrial(resolveFromRoot(config.updates.root));
    if (marked) log.info({ version: marked }, 'trial boot: marked this release good');
  } catch (err) {
    log.warn({ err: (err as Error).message }, 'could not read the update state');
  }
  return {
    url,
    metricsUrl: `http://${hostForUrl(g.metricsHost)}:${metricsPort}/metrics`,
    tls,
    models,
    apiKeys,
    audit,
    egress: egress.monitor,
    egressPolicyHash: egress.policyHash,
    ...(keyd ? { keydPing: () => keyd.client.ping() } : {}),
    close: () => (closing ??= closeAll()),
  };
}
