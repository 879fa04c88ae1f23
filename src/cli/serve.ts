// phantoma serve: run a node (gateway + warm worker pools) until SIGTERM/SIGINT, then drain and stop.
import type { Command } from './main.ts';
import { createLogger } from '../logger.ts';
import { startNode } from '../main.ts';
import { setDumpable } from '../native/addon.ts';

export const serveCommand: Command = {
  summary: 'run the node: the HTTPS OpenAI-compatible API with warm one-shot workers',
  usage: 'phantoma serve [--config FILE] [--gateway.port=N] [--pool.size=N] ...',
  async run(ctx) {
    const config = ctx.config();
    // The gateway holds plaintext prompts on the plaintext path: no core dumps, no same-uid ptrace.
    setDumpable(false);
    const logger = createLogger({ level: config.logLevel });
    const node = await startNode(config, { logger });
    // keyd (started by startNode when a vault exists) has the vault passphrase now; the gateway drops its copy.
    delete process.env.PHANTOMA_VAULT_PASSPHRASE;
    // One plain line for operators and scripts: where to connect and what to pin.
    ctx.out(ctx.json ? JSON.stringify({ url: node.url, tlsFingerprint: node.tls?.fingerprint ?? null, metrics: node.metricsUrl }) : `phantoma: serving ${node.url}${node.tls ? ` (TLS SHA-256 ${node.tls.fingerprint})` : ''}`);
    const stopped = Promise.withResolvers<void>();
    const stop = (signal: string): void => {
      logger.info({ signal }, 'stopping: draining requests in flight');
      void node.close().then(() => stopped.resolve());
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
    await stopped.promise;
    logger.info('stopped');
    return 0;
  },
};
