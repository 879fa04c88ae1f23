// phantoma serve: run a node (gateway + warm worker pools) until SIGTERM/SIGINT, then drain and stop.
import type { Command } from './main.ts';
import { createLogger } from '../logger.ts';
import { startNode } from '../main.ts';
import { setDumpable } from '../native/addon.ts';
import { createNotifier } from '../service/notify.ts';
import { startServiceReadiness } from '../service/readiness.ts';

export const serveCommand: Command = {
  summary: 'run the node: the HTTPS OpenAI-compatible API with warm one-shot workers',
  usage: 'phantoma serve [--config FILE] [--gateway.port=N] [--pool.size=N] ...',
  async run(ctx) {
    const config = ctx.config();
    // The gateway holds plaintext prompts on the plaintext path: no core dumps, no same-uid ptrace.
    setDumpable(false);
    const logger = createLogger({ level: config.logLevel });
    // Under a Type=notify unit (issue 13): STATUS= while starting, READY=1 only when every part is verified,
    // WATCHDOG=1 while healthy, STOPPING=1 on drain. A no-op without $NOTIFY_SOCKET.
    const notifier = createNotifier(process.env, (err) => logger.warn({ err: err.message }, 'sd_notify failed'));
    const node = await startNode(config, { logger, status: notifier.status });
    const readiness = startServiceReadiness({
      notifier,
      logger,
      sources: { pools: () => node.models.map((m) => m.pool), egress: node.egress, keydPing: node.keydPing },
    });
    // keyd (started by startNode when a vault exists) has the vault passphrase now; the gateway drops its copy.
    delete process.env.PHANTOMA_VAULT_PASSPHRASE;
    // One plain line for operators and scripts: where to connect and what to pin.
    ctx.out(ctx.json ? JSON.stringify({ url: node.url, tlsFingerprint: node.tls?.fingerprint ?? null, metrics: node.metricsUrl }) : `phantoma: serving ${node.url}${node.tls ? ` (TLS SHA-256 ${node.tls.fingerprint})` : ''}`);
    const stopped = Promise.withResolvers<void>();
    const stop = (signal: string): void => {
      logger.info({ signal }, 'stopping: draining requests in flight');
      readiness.stop();
      notifier.stopping('stopping: draining requests in flight');
      void node.close().then(() => stopped.resolve());
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
    await stopped.promise;
    logger.info('stopped');
    return 0;
  },
};
