// phantoma clients add|list|revoke: the registry of clients allowed to send sealed requests (name →
// Ed25519 public key), kept in the vault. Revoking keeps the entry with its time, so it stays refused.
import type { Command } from './main.ts';
import { ERRORS, UsageError } from '../errors.ts';
import { addClient, revokeClient } from '../vault/contents.ts';
import { readVault, updateVault } from '../vault/store.ts';
import { vaultPathOf } from '../vault/settings.ts';
import { CREDENTIAL_OPTIONS, vaultCredential } from './vault.ts';

function decodePublicKey(s: string): Buffer {
  if (!/^[A-Za-z0-9+/_-]{43}={0,1}$/.test(s)) throw new UsageError(ERRORS.CLI_USAGE, 'the client public key must be a raw 32-byte Ed25519 key in base64 or base64url (43 characters)');
  return Buffer.from(s.replace(/-/g, '+').replace(/_/g, '/'), 'base64');
}

export const clientsCommand: Command = {
  summary: 'register, list and revoke the clients that may send sealed requests',
  usage: 'phantoma clients add NAME PUBLIC_KEY | list | revoke NAME  [--passphrase-file F | --key-file F] [--json]',
  options: { ...CREDENTIAL_OPTIONS },
  async run(ctx, { values, positionals }) {
    const [verb, ...args] = positionals;
    const config = ctx.config();
    const path = vaultPathOf(config);
    if (verb === 'add' && args.length === 2) {
      const [name, key] = args as [string, string];
      const publicKey = decodePublicKey(key);
      updateVault(path, vaultCredential(config, values), (c) => addClient(c, name, publicKey, new Date()));
      ctx.out(ctx.json ? JSON.stringify({ added: name }) : `client ${name} added`);
      return 0;
    }
    if (verb === 'revoke' && args.length === 1) {
      const name = args[0]!;
      updateVault(path, vaultCredential(config, values), (c) => revokeClient(c, name, new Date()));
      ctx.out(ctx.json ? JSON.stringify({ revoked: name }) : `client ${name} revoked`);
      return 0;
    }
    if (verb === 'list' && args.length === 0) {
      const { contents } = readVault(path, vaultCredential(config, values));
      if (ctx.json) ctx.out(JSON.stringify(contents.clients));
      else if (contents.clients.length === 0) ctx.out('no clients');
      else for (const c of contents.clients) ctx.out(`${c.name.padEnd(24)} ${c.publicKey}  added ${c.createdAt}${c.revokedAt ? `  REVOKED ${c.revokedAt}` : ''}`);
      return 0;
    }
    throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
  },
};
