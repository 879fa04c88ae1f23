// phantoma keys show: what a client pins. For now the TLS certificate fingerprint; the vault issue adds
// the identity key and request keys.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from './main.ts';
import { ERRORS, UsageError, PhantomaError } from '../errors.ts';
import { resolveFromRoot } from '../paths.ts';
import { certificateFingerprint } from '../gateway/tls.ts';

export const keysCommand: Command = {
  summary: "show the node's TLS certificate fingerprint (what clients pin)",
  usage: 'phantoma keys show [--json]',
  async run(ctx, { positionals }) {
    if (positionals[0] !== 'show' || positionals.length !== 1) throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
    const config = ctx.config();
    const certPath = config.gateway.tls === 'provided' ? config.gateway.tlsCertPath! : join(resolveFromRoot(config.stateDir), 'tls-cert.pem');
    if (config.gateway.tls === 'off' || !existsSync(certPath)) {
      throw new PhantomaError(ERRORS.TLS_SETUP_FAILED, config.gateway.tls === 'off' ? 'TLS is off in this configuration' : `no certificate yet at ${certPath}: start the node once (phantoma serve)`);
    }
    const fingerprint = certificateFingerprint(readFileSync(certPath, 'utf8'));
    ctx.out(ctx.json ? JSON.stringify({ tlsFingerprint: fingerprint }) : `TLS certificate SHA-256: ${fingerprint}`);
    return 0;
  },
};
