// phantoma apikeys create|list|revoke — the store holds hashes only; a key is shown once, at creation.
import type { Command } from './main.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { createApiKeyStore } from '../gateway/api-keys.ts';
import { apiKeyStorePath } from '../main.ts';

export const apikeysCommand: Command = {
  summary: 'create, list or revoke API keys for the plaintext API',
  usage: 'phantoma apikeys create NAME [--json] | apikeys list [--json] | apikeys revoke ID',
  async run(ctx, { positionals }) {
    const [sub, arg, ...extra] = positionals;
    const store = createApiKeyStore({ path: apiKeyStorePath(ctx.config()) });
    if (sub === 'create' && arg && extra.length === 0) {
      if (!/^[A-Za-z0-9._@-]{1,64}$/.test(arg)) throw new UsageError(ERRORS.CLI_USAGE, 'a key name is 1-64 letters, digits or ._@-');
      const made = store.create(arg);
      ctx.out(ctx.json ? JSON.stringify({ id: made.id, name: arg, key: made.key }) : `created API key ${made.id} (${arg}); it is shown only now:\n${made.key}`);
      return 0;
    }
    if (sub === 'list' && !arg) {
      const keys = store.list();
      ctx.out(ctx.json ? JSON.stringify(keys) : keys.length === 0 ? 'no API keys' : keys.map((k) => `${k.id}  ${k.name.padEnd(20)} created ${k.createdAt}${k.revokedAt ? `  REVOKED ${k.revokedAt}` : ''}`).join('\n'));
      return 0;
    }
    if (sub === 'revoke' && arg && extra.length === 0) {
      store.revoke(arg);
      ctx.out(ctx.json ? JSON.stringify({ id: arg, revoked: true }) : `revoked API key ${arg}`);
      return 0;
    }
    throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
  },
};
