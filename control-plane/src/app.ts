// buildControlPlaneApps(deps): the node-facing HTTPS API (POST /v1/enrol, POST /v1/heartbeat), a loopback
// metrics app (Prometheus) and an admin app for a unix socket (tokens, nodes). None listens here; main.ts
// and tests decide where. The control plane only ever answers: it has no client, no outbound connection
// to a node, and nothing here opens one.
import Fastify, { LogController, type FastifyInstance, type FastifyError } from 'fastify';
import { Registry, Counter, Gauge, Histogram } from 'prom-client';
import type { Logger } from '../../src/logger.ts';
import type { CpConfig } from './config.ts';
import type { ControlPlaneService, LeaseState } from './service.ts';
import { CP_ERRORS, CpError, isCpError } from './errors.ts';
import { registerUpdateRepository } from './updates.ts';
import type { Db } from './db.ts';

export interface ControlPlaneAppDeps {
  service: ControlPlaneService;
  config: Readonly<CpConfig>;
  logger: Logger;
  tls?: { key: string; cert: string };
  /** Serve a TUF update repository (issue 12); its timestamp is read from this database. */
  updates?: { repoDir: string; db: Pick<Db, 'query'> };
}

export interface ControlPlaneApps {
  app: FastifyInstance;
  metricsApp: FastifyInstance;
  adminApp: FastifyInstance;
}

export function toCpError(err: unknown): CpError {
  if (isCpError(err)) return err;
  const e = err as FastifyError;
  switch (e?.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new CpError(CP_ERRORS.BODY_TOO_LARGE, 'the request body is too large');
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return new CpError(CP_ERRORS.UNSUPPORTED_MEDIA_TYPE, 'the request body must be application/json');
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return new CpError(CP_ERRORS.INVALID_JSON, 'the request body is not valid JSON');
  }
  if (err instanceof SyntaxError || e?.statusCode === 400) return new CpError(CP_ERRORS.INVALID_JSON, 'the request body is not valid JSON');
  return new CpError(CP_ERRORS.INTERNAL, 'internal error', { cause: err });
}

function errorBody(e: CpError): { error: { code: string; message: string }; lease?: unknown } {
  const lease = e.details?.lease;
  return { error: { code: e.code, message: e.message }, ...(lease ? { lease } : {}) };
}

function installErrors(app: FastifyInstance, log: Logger, onError?: (code: string, url: string) => void): void {
  app.setErrorHandler((err, request, reply) => {
    const e = toCpError(err);
    if (e.status >= 500) log.error({ code: e.code, err: (e.cause as Error | undefined)?.message ?? e.message }, 'request failed');
    onError?.(e.code, request.url);
    void reply.code(e.status).send(errorBody(e));
  });
  app.setNotFoundHandler((_request, reply) => {
    void reply.code(404).send(errorBody(new CpError(CP_ERRORS.NOT_FOUND, 'no such route')));
  });
}

export async function buildControlPlaneApps(deps: ControlPlaneAppDeps): Promise<ControlPlaneApps> {
  const { service, config, logger } = deps;
  const log = logger.child({ component: 'control-plane' });

  const registry = new Registry();
  const heartbeats = new Counter({ name: 'phantoma_cp_heartbeats_total', help: 'Heartbeats by outcome (ok or the refusal code)', labelNames: ['outcome'] as const, registers: [registry] });
  const enrolments = new Counter({ name: 'phantoma_cp_enrolments_total', help: 'Enrolments by outcome (ok or the refusal code)', labelNames: ['outcome'] as const, registers: [registry] });
  const latency = new Histogram({ name: 'phantoma_cp_heartbeat_seconds', help: 'Heartbeat handling time (validation, signature, database, lease)', buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25], registers: [registry] });
  new Gauge({
    name: 'phantoma_cp_nodes',
    help: 'Nodes by lease state (read from the database at scrape time, so every instance reports the fleet)',
    labelNames: ['state'] as const,
    registers: [registry],
    async collect() {
      const states = await service.nodeStates();
      for (const [state, n] of Object.entries(states) as Array<[LeaseState, number]>) this.set({ state }, n);
    },
  });

  const app = Fastify({
    loggerInstance: log,
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: config.bodyLimitBytes,
    requestIdHeader: false,
    return503OnClosing: true,
    // TLS 1.3 only: the certificate's key is the lease key, and TLS 1.3 signs a context string that no
    // lease, heartbeat or enrolment signature can collide with.
    ...(deps.tls ? { https: { key: deps.tls.key, cert: deps.tls.cert, minVersion: 'TLSv1.3' as const } } : {}),
  }) as unknown as FastifyInstance;
  app.removeContentTypeParser('text/plain');
  installErrors(app, log, (code, url) => {
    if (url === '/v1/heartbeat') heartbeats.inc({ outcome: code });
    else if (url === '/v1/enrol') enrolments.inc({ outcome: code });
  });

  app.get('/healthz', async () => ({ status: 'ok' }));
  if (deps.updates) registerUpdateRepository(app, deps.updates);
  app.post('/v1/enrol', async (request) => {
    const lease = await service.enrol(request.body);
    enrolments.inc({ outcome: 'ok' });
    log.info({ node: lease.lease.node }, 'node enrolled');
    return { lease };
  });
  app.post('/v1/heartbeat', async (request) => {
    const end = latency.startTimer();
    const lease = await service.heartbeat(request.body);
    end();
    heartbeats.inc({ outcome: 'ok' });
    return { lease };
  });

  const metricsApp = Fastify({ logger: false });
  metricsApp.get('/metrics', async (_request, reply) => {
    void reply.header('content-type', registry.contentType);
    return registry.metrics();
  });

  // Administration over a unix socket in the data directory (0600): what `phantoma-cp tokens|nodes` use, so
  // the embedded PGlite database (one process at a time) is never opened by a second process.
  const adminApp = Fastify({ logger: false, bodyLimit: 4096 });
  installErrors(adminApp, log);
  adminApp.post('/tokens', async (request) => {
    const b = (request.body ?? {}) as { node?: unknown; ttlSeconds?: unknown };
    if (typeof b.node !== 'string' || typeof b.ttlSeconds !== 'number') throw new CpError(CP_ERRORS.USAGE, 'expected {node, ttlSeconds}');
    return service.createToken(b.node, b.ttlSeconds);
  });
  adminApp.get('/nodes', async () => ({ nodes: await service.listNodes() }));
  adminApp.get('/nodes/:name', async (request) => service.showNode((request.params as { name: string }).name));
  adminApp.post('/nodes/:name/revoke', async (request) => service.revoke((request.params as { name: string }).name));
  adminApp.post('/prune', async () => service.prune());

  return { app, metricsApp, adminApp };
}
