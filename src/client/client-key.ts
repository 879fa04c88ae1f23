// A sealed-API client's own Ed25519 key: made on the client machine, kept there (0600, PKCS#8 PEM); only
// its public half goes to the node operator (`phantoma clients add NAME <public key>`).
import { createPublicKey, createPrivateKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { writeFileAtomic } from '../util/atomic-file.ts';
import { ERRORS, PhantomaError, UsageError } from '../errors.ts';

/** The raw 32-byte public key in base64, as `phantoma clients add` takes it. */
export function publicKeyBase64(key: KeyObject): string {
  return Buffer.from(createPublicKey(key).export({ format: 'jwk' }).x!, 'base64url').toString('base64');
}

export function generateClientKey(path: string): KeyObject {
  if (existsSync(path)) throw new PhantomaError(ERRORS.VAULT_EXISTS, `${path} exists; a client key is never overwritten`);
  const { privateKey } = generateKeyPairSync('ed25519');
  writeFileAtomic(path, privateKey.export({ format: 'pem', type: 'pkcs8' }) as string, 0o600);
  return privateKey;
}

export function loadClientKey(path: string): KeyObject {
  let pem: string;
  try {
    pem = readFileSync(path, 'utf8');
  } catch (err) {
    throw new UsageError(ERRORS.CLI_USAGE, `cannot read the client key ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  let key: KeyObject;
  try {
    key = createPrivateKey(pem);
  } catch {
    throw new UsageError(ERRORS.CLI_USAGE, `${path} is not a PEM private key (make one with: phantoma client-key new FILE)`);
  }
  if (key.asymmetricKeyType !== 'ed25519') throw new UsageError(ERRORS.CLI_USAGE, `${path} holds a ${key.asymmetricKeyType} key; a client key is Ed25519`);
  return key;
}
