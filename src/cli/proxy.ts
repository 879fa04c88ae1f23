// phantoma proxy: a local OpenAI-compatible endpoint that seals every request to pinned nodes.
import type { Command } from './main.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { buildProxy, type PinnedNode } from '../client/proxy.ts';
import { loadClientKey } from '../client/client-key.ts';
import { createLogger } from '../logger.ts';
import { intOption } from './options.ts';

/** `URL=IDENTITY_PIN`, e.g. https://node.example:8443=sha256:ab12… */
function parseNode(s: string): PinnedNode {
  const i = s.lastIndexOf('=');
  const url = s.slice(0, i);
  const identityPin = s.slice(i + 1);
  if (i <= 0 || !/^https?:\/\//.test(url) || !/^sha256:[0-9a-f]{64}$/.test(identityPin)) throw new UsageError(ERRORS.CLI_USAGE, `--node takes URL=sha256:<64 hex> (the node's identity fingerprint from 'phantoma keys show'), got "${s.slice(0, 120)}"`);
  return { url, identityPin };
}

export const proxyCommand: Command = {
  summary: 'serve a local OpenAI-compatible endpoint that seals every request to pinned nodes (fails over in order)',
  usage: 'phantoma proxy --node URL=IDENTITY [--node URL=IDENTITY]... --client-name NAME --client-key FILE [--port 8080] [--host 127.0.0.1] [--model NAME]...',
  options: {
    node: { type: 'string', multiple: true },
    'client-name': { type: 'string' },
    'client-key': { type: 'string' },
    port: { type: 'string' },
    host: { type: 'string' },
    model: { type: 'string', multiple: true },
  },
  async run(ctx, { values }) {
    const nodes = ((values.node as unknown as string[] | undefined) ?? []).map(parseNode);
    if (nodes.length === 0 || typeof values['client-name'] !== 'string' || typeof values['client-key'] !== 'string') throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const host = typeof values.host === 'string' ? values.host : '127.0.0.1';
    const port = intOption(values.port, 'port', 8080, 0, 65535);
    const logger = createLogger({ level: 'info' });
    if (host !== '127.0.0.1' && host !== '::1' && host !== 'localhost') logger.warn({ host }, 'the proxy answers anyone who can reach it in the clear: keep it on loopback');
    const app = buildProxy({ nodes, clientName: values['client-name'], clientKey: loadClientKey(values['client-key']), models: (values.model as unknown as string[] | undefined) ?? [], logger });
    const address = await app.listen({ host, port });
    ctx.out(ctx.json ? JSON.stringify({ listening: address }) : `sealing proxy on ${address}/v1 → ${nodes.map((n) => n.url).join(', ')}`);
    await new Promise<void>((resolve) => {
      for (const s of ['SIGINT', 'SIGTERM'] as const) process.once(s, () => resolve());
    });
    await app.close();
    return 0;
  },
};
