// phantoma keys show|rotate. show: what a client pins — the identity fingerprint (with a vault), the
// request key ids and windows, and the TLS certificate fingerprint. rotate: a new request key; the
// previous ones keep opening requests for vault.rotationOverlapSeconds, then are dropped from the vault.
// Without a vault (a node from before issue 7) show prints the TLS fingerprint only, as before.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from './main.ts';
import { ERRORS, UsageError, PhantomaError } from '../errors.ts';
import { resolveFromRoot } from '../paths.ts';
import { certificateFingerprint } from '../gateway/tls.ts';
import { identityFingerprint, rotateRequestKeys } from '../vault/contents.ts';
import { readVault, updateVault } from '../vault/store.ts';
import { vaultPathOf, keyTimingOf } from '../vault/settings.ts';
import { CREDENTIAL_OPTIONS, vaultCredential } from './vault.ts';

export const keysCommand: Command = {
  summary: "show the node's identity and TLS fingerprints (what clients pin), or rotate its request keys",
  usage: 'phantoma keys show | rotate  [--passphrase-file F | --key-file F] [--json]',
  options: { ...CREDENTIAL_OPTIONS },
  async run(ctx, { values, positionals }) {
    const verb = positionals[0];
    if ((verb !== 'show' && verb !== 'rotate') || positionals.length !== 1) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const config = ctx.config();
    const vaultPath = vaultPathOf(config);
    if (verb === 'rotate') {
      const { contents } = updateVault(vaultPath, vaultCredential(config, values), (c) => rotateRequestKeys(c, new Date(), keyTimingOf(config)));
      const keys = contents.requestKeys.map((k) => ({ id: k.id, notBefore: k.notBefore, notAfter: k.notAfter }));
      ctx.out(ctx.json ? JSON.stringify({ requestKeys: keys }) : `request keys rotated; now:\n${keys.map((k) => `  ${k.id}  ${k.notBefore} .. ${k.notAfter}`).join('\n')}`);
      return 0;
    }
    if (existsSync(vaultPath)) {
      const { contents } = readVault(vaultPath, vaultCredential(config, values));
      const identity = identityFingerprint(Buffer.from(contents.identity.publicKey, 'base64'));
      const tlsCert = config.gateway.tls === 'provided' ? readFileSync(config.gateway.tlsCertPath!, 'utf8') : contents.tls?.cert;
      const tlsFingerprint = config.gateway.tls === 'off' || !tlsCert ? undefined : certificateFingerprint(tlsCert);
      const keys = contents.requestKeys.map((k) => ({ id: k.id, notBefore: k.notBefore, notAfter: k.notAfter }));
      if (ctx.json) ctx.out(JSON.stringify({ identityFingerprint: identity, identityPublicKey: contents.identity.publicKey, requestKeys: keys, ...(tlsFingerprint ? { tlsFingerprint } : {}) }));
      else ctx.out(`identity ${identity}\n${keys.map((k) => `request key ${k.id}  ${k.notBefore} .. ${k.notAfter}`).join('\n')}${tlsFingerprint ? `\nTLS certificate SHA-256: ${tlsFingerprint}` : ''}`);
      return 0;
    }
    const certPath = config.gateway.tls === 'provided' ? config.gateway.tlsCertPath! : join(resolveFromRoot(config.stateDir), 'tls-cert.pem');
    if (config.gateway.tls === 'off' || !existsSync(certPath)) {
      throw new PhantomaError(ERRORS.TLS_SETUP_FAILED, config.gateway.tls === 'off' ? 'TLS is off in this configuration' : `no certificate yet at ${certPath}: start the node once (phantoma serve)`);
    }
    const fingerprint = certificateFingerprint(readFileSync(certPath, 'utf8'));
    ctx.out(ctx.json ? JSON.stringify({ tlsFingerprint: fingerprint }) : `TLS certificate SHA-256: ${fingerprint}`);
    return 0;
  },
};
