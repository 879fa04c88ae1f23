// phantoma vault init|export|import: make the node's keys on the node, back them up under a separate
// passphrase, restore them onto a rebuilt node (clients' identity pins survive). Credentials come from
// files, the environment or a systemd credential, never from an argument value (src/vault/credential.ts).
import { existsSync, readFileSync, unlinkSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Command, CommandContext } from './main.ts';
import type { Config } from '../config/schema.ts';
import { ERRORS, UsageError, PhantomaError } from '../errors.ts';
import { resolveFromRoot } from '../paths.ts';
import { makeSelfSignedCertificate, certificateFingerprint } from '../gateway/tls.ts';
import { makeVaultContents, identityFingerprint } from '../vault/contents.ts';
import { createVault, createSealed, readVault, describeKdf } from '../vault/store.ts';
import { newSealKeys, type Credential } from '../vault/format.ts';
import { resolveBackupCredential, resolveVaultCredential } from '../vault/credential.ts';
import { vaultPathOf, scryptParamsOf, keyTimingOf } from '../vault/settings.ts';
import { fsyncDir } from '../util/atomic-file.ts';

export const CREDENTIAL_OPTIONS = {
  'passphrase-file': { type: 'string' },
  'key-file': { type: 'string' },
} as const;

type Values = Record<string, string | boolean | undefined>;

export function vaultCredential(config: Readonly<Config>, values: Values): Credential {
  const str = (k: string): string | undefined => (typeof values[k] === 'string' ? (values[k] as string) : undefined);
  return resolveVaultCredential({ passphraseFile: str('passphrase-file'), keyFile: str('key-file'), env: process.env, credentialName: config.vault.credentialName });
}

/** The node's existing plaintext TLS key (gateway issue) if any, so moving it into the vault keeps the pin. */
function existingTls(config: Readonly<Config>): { key: string; cert: string; keyPath: string } | undefined {
  const dir = resolveFromRoot(config.stateDir);
  const keyPath = join(dir, 'tls-key.pem');
  const certPath = join(dir, 'tls-cert.pem');
  if (config.gateway.tls !== 'self-signed' || !existsSync(keyPath) || !existsSync(certPath)) return undefined;
  return { key: readFileSync(keyPath, 'utf8'), cert: readFileSync(certPath, 'utf8'), keyPath };
}

async function init(ctx: CommandContext, values: Values): Promise<number> {
  const config = ctx.config();
  const path = vaultPathOf(config);
  if (existsSync(path)) throw new PhantomaError(ERRORS.VAULT_EXISTS, `a vault already exists at ${path}; it is never overwritten`);
  const credential = vaultCredential(config, values);
  const params = scryptParamsOf(config);
  const moved = existingTls(config);
  const tls = moved ? { key: moved.key, cert: moved.cert } : await makeSelfSignedCertificate({ commonName: 'phantoma node', dnsNames: ['localhost'], ips: ['127.0.0.1', '::1'], days: 3650 });
  const contents = makeVaultContents({ now: new Date(), requestKeyValidityMs: keyTimingOf(config).validityMs, tls });
  const keys = createVault(path, credential, params, contents);
  // The TLS key now lives only in the vault: remove the plaintext copy (the certificate stays, it is public).
  if (moved) {
    unlinkSync(moved.keyPath);
    fsyncDir(resolveFromRoot(config.stateDir));
  }
  const fp = identityFingerprint(Buffer.from(contents.identity.publicKey, 'base64'));
  const tlsFp = certificateFingerprint(tls.cert);
  if (ctx.json) ctx.out(JSON.stringify({ path, identityFingerprint: fp, tlsFingerprint: tlsFp, requestKeyIds: contents.requestKeys.map((k) => k.id), kdf: describeKdf(keys), tlsMoved: !!moved }));
  else ctx.out(`vault created at ${path} (${describeKdf(keys)})\nidentity ${fp}\nTLS certificate SHA-256: ${tlsFp}${moved ? ' (moved into the vault)' : ''}`);
  return 0;
}

async function exportBackup(ctx: CommandContext, values: Values, file: string): Promise<number> {
  const config = ctx.config();
  const backupCredential = resolveBackupCredential({ passphraseFile: typeof values['backup-passphrase-file'] === 'string' ? values['backup-passphrase-file'] : undefined, env: process.env });
  const credential = vaultCredential(config, values);
  // A backup under the vault's own passphrase would make the two one secret.
  if (credential.kind === 'passphrase' && Buffer.from(credential.secret).equals(Buffer.from(backupCredential.secret))) {
    throw new UsageError(ERRORS.CLI_USAGE, 'the backup passphrase must differ from the vault passphrase');
  }
  const opened = readVault(vaultPathOf(config), credential);
  const keys = newSealKeys(backupCredential, scryptParamsOf(config));
  createSealed(resolve(file), 'backup', keys, opened.contents);
  const fp = identityFingerprint(Buffer.from(opened.contents.identity.publicKey, 'base64'));
  ctx.out(ctx.json ? JSON.stringify({ file: resolve(file), identityFingerprint: fp, clients: opened.contents.clients.length }) : `backup written to ${resolve(file)} (identity ${fp}, ${opened.contents.clients.length} clients)`);
  return 0;
}

async function importBackup(ctx: CommandContext, values: Values, file: string): Promise<number> {
  const config = ctx.config();
  const path = vaultPathOf(config);
  if (existsSync(path)) throw new PhantomaError(ERRORS.VAULT_EXISTS, `a vault already exists at ${path}; move it away first (import never overwrites)`);
  const backupCredential = resolveBackupCredential({ passphraseFile: typeof values['backup-passphrase-file'] === 'string' ? values['backup-passphrase-file'] : undefined, env: process.env });
  const credential = vaultCredential(config, values);
  const restored = readVault(resolve(file), backupCredential, 'backup');
  const keys = createVault(path, credential, scryptParamsOf(config), restored.contents);
  const fp = identityFingerprint(Buffer.from(restored.contents.identity.publicKey, 'base64'));
  ctx.out(ctx.json ? JSON.stringify({ path, identityFingerprint: fp, clients: restored.contents.clients.length, kdf: describeKdf(keys) }) : `vault restored at ${path} (identity ${fp}, ${restored.contents.clients.length} clients)`);
  return 0;
}

export const vaultCommand: Command = {
  summary: "make, back up and restore the node's sealed key vault",
  usage:
    'phantoma vault init | export FILE | import FILE  [--passphrase-file F | --key-file F] [--backup-passphrase-file F] [--json]\n' +
    '  vault credential: --passphrase-file, --key-file, PHANTOMA_VAULT_PASSPHRASE, or the systemd credential vault.credentialName\n' +
    '  backup passphrase: --backup-passphrase-file or PHANTOMA_BACKUP_PASSPHRASE',
  options: { ...CREDENTIAL_OPTIONS, 'backup-passphrase-file': { type: 'string' } },
  async run(ctx, { values, positionals }) {
    const [verb, file, ...extra] = positionals;
    if (extra.length === 0 && verb === 'init' && file === undefined) return init(ctx, values);
    if (extra.length === 0 && verb === 'export' && file) return exportBackup(ctx, values, file);
    if (extra.length === 0 && verb === 'import' && file) return importBackup(ctx, values, file);
    throw new UsageError(ERRORS.CLI_USAGE, `usage: ${this.usage}`);
  },
};
