// Maintainer, root, snapshot and timestamp keys: ECDSA P-256 (TUF scheme `ecdsa-sha2-nistp256`), stored as
// small JSON files. A key's id is TUF's: sha256 of the canonical JSON of its public form, so the same id
// names the key in root.json, in a signature and as the Sigstore bundle's public-key hint.
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { chmodSync, readFileSync, writeFileSync } from 'node:fs';
import { Key, Signature } from '@tufjs/models';
import { createRequire } from 'node:module';
import { PhantomaError, ERRORS } from '../errors.ts';

export const KEY_TYPE = 'ecdsa';
export const KEY_SCHEME = 'ecdsa-sha2-nistp256';
// TUF's canonical JSON (OLPC), the encoding every TUF signature and key id is over; a dependency of
// @tufjs/models without its own types.
export const canonicalize = createRequire(import.meta.url)('@tufjs/canonical-json').canonicalize as (v: unknown) => string;

/** Largest key file we read (a P-256 key pair in PEM is ≈ 600 bytes). */
const MAX_KEY_FILE_BYTES = 8192;

export interface PublicKeyFile {
  keyid: string;
  name: string;
  keytype: typeof KEY_TYPE;
  scheme: typeof KEY_SCHEME;
  public: string;
}
export interface PrivateKeyFile extends PublicKeyFile {
  private: string;
}

export function keyIdOf(publicPem: string): string {
  const body = { keytype: KEY_TYPE, scheme: KEY_SCHEME, keyval: { public: publicPem } };
  return createHash('sha256').update(canonicalize(body)).digest('hex');
}

export function generateKey(name: string): PrivateKeyFile {
  const { publicKey, privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const pub = publicKey.export({ type: 'spki', format: 'pem' }).toString();
  return { keyid: keyIdOf(pub), name, keytype: KEY_TYPE, scheme: KEY_SCHEME, public: pub, private: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString() };
}

export function publicPart(k: PublicKeyFile): PublicKeyFile {
  return { keyid: k.keyid, name: k.name, keytype: k.keytype, scheme: k.scheme, public: k.public };
}

function invalid(path: string, why: string): PhantomaError {
  return new PhantomaError(ERRORS.RELEASE_KEY_INVALID, `${path}: ${why}`);
}

function readJson(path: string): Record<string, unknown> {
  let text: string;
  try {
    const buf = readFileSync(path);
    if (buf.length > MAX_KEY_FILE_BYTES) throw invalid(path, `larger than ${MAX_KEY_FILE_BYTES} bytes`);
    text = buf.toString('utf8');
  } catch (err) {
    if (err instanceof PhantomaError) throw err;
    throw invalid(path, `cannot read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  try {
    const v = JSON.parse(text) as unknown;
    if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new Error('not an object');
    return v as Record<string, unknown>;
  } catch {
    throw invalid(path, 'not a JSON key file');
  }
}

export function parsePublicKey(v: Record<string, unknown>, where: string): PublicKeyFile {
  if (v.keytype !== KEY_TYPE || v.scheme !== KEY_SCHEME || typeof v.public !== 'string') throw invalid(where, `not an ${KEY_SCHEME} key`);
  let k: KeyObject;
  try {
    k = createPublicKey(v.public);
  } catch {
    throw invalid(where, 'the public key does not parse');
  }
  if (k.asymmetricKeyType !== 'ec' || k.asymmetricKeyDetails?.namedCurve !== 'prime256v1') throw invalid(where, 'not a P-256 key');
  const keyid = keyIdOf(v.public);
  if (v.keyid !== undefined && v.keyid !== keyid) throw invalid(where, 'its keyid does not match its public key');
  return { keyid, name: typeof v.name === 'string' ? v.name.slice(0, 64) : keyid.slice(0, 12), keytype: KEY_TYPE, scheme: KEY_SCHEME, public: v.public };
}

export function readPublicKey(path: string): PublicKeyFile {
  return parsePublicKey(readJson(path), path);
}

export function readPrivateKey(path: string): PrivateKeyFile {
  const v = readJson(path);
  const pub = parsePublicKey(v, path);
  if (typeof v.private !== 'string') throw invalid(path, 'has no private key (a .pub.json file?)');
  let priv: KeyObject;
  try {
    priv = createPrivateKey(v.private);
  } catch {
    throw invalid(path, 'the private key does not parse');
  }
  const derived = createPublicKey(priv).export({ type: 'spki', format: 'pem' }).toString();
  if (derived !== pub.public) throw invalid(path, 'the private key does not belong to the public key');
  return { ...pub, private: v.private };
}

export function writeKeyFiles(base: string, key: PrivateKeyFile): { privatePath: string; publicPath: string } {
  const privatePath = `${base}.key.json`;
  const publicPath = `${base}.pub.json`;
  writeFileSync(privatePath, JSON.stringify(key, null, 2) + '\n', { mode: 0o600, flag: 'wx' });
  chmodSync(privatePath, 0o600);
  writeFileSync(publicPath, JSON.stringify(publicPart(key), null, 2) + '\n', { mode: 0o644, flag: 'wx' });
  return { privatePath, publicPath };
}

export function tufKey(k: PublicKeyFile): Key {
  return new Key({ keyID: k.keyid, keyType: KEY_TYPE, scheme: KEY_SCHEME, keyVal: { public: k.public } });
}

/** A signer for @tufjs/models' Metadata.sign: ECDSA P-256 over the canonical bytes, hex DER signature. */
export function tufSigner(k: PrivateKeyFile): (data: Buffer) => Signature {
  const priv = createPrivateKey(k.private);
  return (data) => new Signature({ keyID: k.keyid, sig: cryptoSign('sha256', data, priv).toString('hex') });
}

export function signBytes(k: PrivateKeyFile, data: Buffer): Buffer {
  return cryptoSign('sha256', data, createPrivateKey(k.private));
}
