// The control plane's own Ed25519 key: it signs every lease, and it is also the key of the control plane's
// self-signed TLS certificate, so the one fingerprint a node pins at enrolment (`phantoma enroll --pin`)
// authenticates both the connection and the leases. Sealed at rest with the vault's file format
// (src/vault/format.ts: scrypt or key-file KDF, AES-256-GCM, header checksum), written atomically, 0600.
// The public half sits beside it in clear (`lease-key.pub`) so `phantoma-cp key show` needs no secret.
import { generateKeyPairSync, createPrivateKey, createPublicKey, webcrypto, createHash, type KeyObject } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as x509 from '@peculiar/x509';
import { newSealKeys, openFile, sealFile, type Credential, type ScryptParams } from '../../src/vault/format.ts';
import { writeFileAtomic } from '../../src/util/atomic-file.ts';
import { keyFingerprint, rawPublicKeyOf } from '../../src/control/protocol.ts';
import { CP_ERRORS, CpError } from './errors.ts';

const CONTENT_FORMAT = 'phantoma-cp-lease-key-v1';
export const KEY_FILE = 'lease-key.phv';
export const PUBLIC_FILE = 'lease-key.pub';

export interface LeaseKey {
  privateKey: KeyObject;
  publicKey: KeyObject;
  /** Raw 32-byte public key. */
  raw: Buffer;
  fingerprint: string;
}

function fromPrivate(privateKey: KeyObject): LeaseKey {
  const publicKey = createPublicKey(privateKey);
  const raw = rawPublicKeyOf(publicKey);
  return { privateKey, publicKey, raw, fingerprint: keyFingerprint(raw) };
}

/** Makes a new key and seals it into `<dataDir>/lease-key.phv`; refuses to replace an existing one. */
export function createLeaseKey(dataDir: string, credential: Credential, params: ScryptParams): LeaseKey {
  const path = join(dataDir, KEY_FILE);
  if (existsSync(path)) throw new CpError(CP_ERRORS.KEY_EXISTS, `${path} already exists; it is never overwritten`);
  const { privateKey } = generateKeyPairSync('ed25519');
  const key = fromPrivate(privateKey);
  const plaintext = Buffer.from(JSON.stringify({ format: CONTENT_FORMAT, privateKey: privateKey.export({ format: 'der', type: 'pkcs8' }).toString('base64') }));
  let sealed: Buffer;
  try {
    sealed = sealFile('vault', newSealKeys(credential, params), plaintext);
  } finally {
    plaintext.fill(0);
  }
  writeFileAtomic(path, sealed, 0o600);
  writeFileAtomic(join(dataDir, PUBLIC_FILE), `${key.fingerprint}\n${key.raw.toString('base64url')}\n`, 0o644);
  return key;
}

export function openLeaseKey(dataDir: string, credential: Credential): LeaseKey {
  const path = join(dataDir, KEY_FILE);
  let file: Buffer;
  try {
    file = readFileSync(path);
  } catch (err) {
    throw new CpError(CP_ERRORS.KEY_UNREADABLE, `cannot read the lease key ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message} (phantoma-cp key init makes one)`);
  }
  let plaintext: Buffer;
  try {
    plaintext = openFile(file, 'vault', credential).plaintext;
  } catch (err) {
    throw new CpError(CP_ERRORS.KEY_UNREADABLE, `cannot open the lease key ${path}: ${(err as Error).message}`, { cause: err });
  }
  try {
    const content = JSON.parse(plaintext.toString('utf8')) as { format?: unknown; privateKey?: unknown };
    if (content.format !== CONTENT_FORMAT || typeof content.privateKey !== 'string') throw new Error('not a control-plane lease key');
    const privateKey = createPrivateKey({ key: Buffer.from(content.privateKey, 'base64'), format: 'der', type: 'pkcs8' });
    if (privateKey.asymmetricKeyType !== 'ed25519') throw new Error('not an Ed25519 key');
    return fromPrivate(privateKey);
  } catch (err) {
    throw new CpError(CP_ERRORS.KEY_UNREADABLE, `${path} does not hold a control-plane lease key: ${(err as Error).message}`);
  } finally {
    plaintext.fill(0);
  }
}

/** The fingerprint from `lease-key.pub` (no secret needed). */
export function readLeaseKeyFingerprint(dataDir: string): string {
  try {
    return readFileSync(join(dataDir, PUBLIC_FILE), 'utf8').split('\n')[0]!;
  } catch (err) {
    throw new CpError(CP_ERRORS.KEY_UNREADABLE, `cannot read ${join(dataDir, PUBLIC_FILE)}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/** A self-signed TLS certificate whose key IS the lease key (TLS 1.3 only, so its signatures never meet ours). */
export async function leaseKeyCertificate(key: LeaseKey, opts: { days?: number; now?: Date } = {}): Promise<{ key: string; cert: string }> {
  x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);
  const privateKey = key.privateKey.toCryptoKey({ name: 'Ed25519' }, false, ['sign']);
  const publicKey = key.publicKey.toCryptoKey({ name: 'Ed25519' }, true, ['verify']);
  const notBefore = new Date((opts.now ?? new Date()).getTime() - 60_000);
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: createHash('sha256').update(webcrypto.getRandomValues(new Uint8Array(16))).digest('hex').slice(0, 32).replace(/^[89a-f]/, '7'),
    name: 'CN=phantoma control plane',
    notBefore,
    notAfter: new Date(notBefore.getTime() + (opts.days ?? 3650) * 86_400_000),
    signingAlgorithm: { name: 'Ed25519' },
    keys: { privateKey, publicKey } as unknown as webcrypto.CryptoKeyPair,
    extensions: [new x509.BasicConstraintsExtension(false, undefined, true), new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true)],
  });
  return { key: key.privateKey.export({ format: 'pem', type: 'pkcs8' }) as string, cert: cert.toString('pem') + '\n' };
}
