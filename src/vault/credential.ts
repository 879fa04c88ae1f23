// Where the vault's credential comes from — never a command-line argument value (it would be visible in
// /proc/<pid>/cmdline and shell history). In order:
//   1. --passphrase-file PATH   a passphrase in a file (one trailing newline is dropped)
//   2. --key-file PATH          a key file (≥ 32 random bytes)
//   3. PHANTOMA_VAULT_PASSPHRASE
//   4. $CREDENTIALS_DIRECTORY/<vault.credentialName>   a systemd credential (LoadCredential= /
//      LoadCredentialEncrypted=, which systemd-creds can bind to the host key or a TPM), used as a key file
// The backup passphrase of `vault export|import` comes from --backup-passphrase-file or
// PHANTOMA_BACKUP_PASSPHRASE. Only the CLI edge reads the environment; it passes it in here.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ERRORS, PhantomaError } from '../errors.ts';
import type { Credential } from './format.ts';

export interface CredentialSources {
  passphraseFile?: string | undefined;
  keyFile?: string | undefined;
  env: Readonly<Record<string, string | undefined>>;
  credentialName: string;
}

function readSecretFile(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new PhantomaError(ERRORS.VAULT_CREDENTIAL_MISSING, `cannot read the ${what} ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

function passphrase(bytes: Buffer, what: string): Credential {
  const trimmed = bytes.length && bytes[bytes.length - 1] === 0x0a ? bytes.subarray(0, bytes.length - 1) : bytes;
  if (trimmed.length === 0) throw new PhantomaError(ERRORS.VAULT_CREDENTIAL_MISSING, `the ${what} is empty`);
  return { kind: 'passphrase', secret: trimmed };
}

export function resolveVaultCredential(s: CredentialSources): Credential {
  if (s.passphraseFile) return passphrase(readSecretFile(s.passphraseFile, 'passphrase file'), 'passphrase file');
  if (s.keyFile) return { kind: 'keyfile', secret: readSecretFile(s.keyFile, 'key file') };
  const env = s.env.PHANTOMA_VAULT_PASSPHRASE;
  if (env !== undefined) return passphrase(Buffer.from(env), 'PHANTOMA_VAULT_PASSPHRASE');
  const dir = s.env.CREDENTIALS_DIRECTORY;
  if (dir) return { kind: 'keyfile', secret: readSecretFile(join(dir, s.credentialName), 'systemd credential') };
  throw new PhantomaError(
    ERRORS.VAULT_CREDENTIAL_MISSING,
    `no vault credential: set PHANTOMA_VAULT_PASSPHRASE, pass --passphrase-file or --key-file, or provide the systemd credential "${s.credentialName}"`,
  );
}

export function resolveBackupCredential(s: { passphraseFile?: string | undefined; env: Readonly<Record<string, string | undefined>> }): Credential {
  if (s.passphraseFile) return passphrase(readSecretFile(s.passphraseFile, 'backup passphrase file'), 'backup passphrase file');
  const env = s.env.PHANTOMA_BACKUP_PASSPHRASE;
  if (env !== undefined) return passphrase(Buffer.from(env), 'PHANTOMA_BACKUP_PASSPHRASE');
  throw new PhantomaError(ERRORS.VAULT_CREDENTIAL_MISSING, 'no backup passphrase: set PHANTOMA_BACKUP_PASSPHRASE or pass --backup-passphrase-file (it should differ from the vault passphrase)');
}
