// What the vault holds, and the pure operations on it (make, rotate, prune, clients). No I/O: store.ts
// seals and writes, keyd.ts serves. Keys are bytes in base64 inside the sealed JSON body.
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { generateRequestKeyPair, type RequestPrivateKeys, type RequestPublicKeys } from '../sealed/kem.ts';
import { ERRORS, PhantomaError } from '../errors.ts';

export interface RequestKeyEntry {
  /** 16 hex: the first 8 bytes of SHA-256(X25519 public ‖ ML-KEM public). */
  id: string;
  /** ISO times: the key opens requests from notBefore until notAfter (rotation shortens notAfter to now + overlap). */
  notBefore: string;
  notAfter: string;
  x25519Public: string;
  x25519Private: string;
  mlkemPublic: string;
  mlkemSecret: string;
}

export interface ClientEntry {
  name: string;
  /** Raw Ed25519 public key, base64. */
  publicKey: string;
  createdAt: string;
  revokedAt?: string;
}

export interface VaultContents {
  format: 1;
  createdAt: string;
  identity: { privateKey: string; publicKey: string };
  requestKeys: RequestKeyEntry[];
  tls?: { key: string; cert: string };
  clients: ClientEntry[];
}

export const CLIENT_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

const b64 = (b: Uint8Array): string => Buffer.from(b).toString('base64');
const unb64 = (s: string): Buffer => Buffer.from(s, 'base64');

export function requestKeyId(pub: RequestPublicKeys): string {
  return createHash('sha256').update(pub.x25519).update(pub.mlkem).digest('hex').slice(0, 16);
}

export function makeRequestKey(now: Date, validityMs: number): RequestKeyEntry {
  const { publicKeys, privateKeys } = generateRequestKeyPair();
  return {
    id: requestKeyId(publicKeys),
    notBefore: now.toISOString(),
    notAfter: new Date(now.getTime() + validityMs).toISOString(),
    x25519Public: b64(publicKeys.x25519),
    x25519Private: b64(privateKeys.x25519),
    mlkemPublic: b64(publicKeys.mlkem),
    mlkemSecret: b64(privateKeys.mlkem),
  };
}

export function makeVaultContents(opts: { now: Date; requestKeyValidityMs: number; tls?: { key: string; cert: string } }): VaultContents {
  const id = generateKeyPairSync('ed25519');
  return {
    format: 1,
    createdAt: opts.now.toISOString(),
    identity: { privateKey: b64(id.privateKey.export({ format: 'der', type: 'pkcs8' })), publicKey: b64(rawEd25519Public(id.publicKey)) },
    requestKeys: [makeRequestKey(opts.now, opts.requestKeyValidityMs)],
    ...(opts.tls ? { tls: opts.tls } : {}),
    clients: [],
  };
}

export function rawEd25519Public(key: KeyObject): Buffer {
  return Buffer.from(key.export({ format: 'jwk' }).x!, 'base64url');
}

export function ed25519PublicKeyObject(raw: Uint8Array): KeyObject {
  if (raw.length !== 32) throw new RangeError(`an Ed25519 public key is 32 bytes, got ${raw.length}`);
  return createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: Buffer.from(raw).toString('base64url') }, format: 'jwk' });
}

export function identityPrivateKey(c: VaultContents): KeyObject {
  return createPrivateKey({ key: unb64(c.identity.privateKey), format: 'der', type: 'pkcs8' });
}

/** What clients pin: "sha256:" + hex SHA-256 of the raw 32-byte Ed25519 identity public key. */
export function identityFingerprint(publicKey: Uint8Array): string {
  return 'sha256:' + createHash('sha256').update(publicKey).digest('hex');
}

export function isKeyUsable(k: RequestKeyEntry, now: Date): boolean {
  const t = now.getTime();
  return t >= Date.parse(k.notBefore) - 60_000 && t < Date.parse(k.notAfter);
}

/**
 * Rotation: a new request key; every current key's window is cut to now + overlap (so requests sealed to
 * it keep opening until then); keys already past their window are dropped from the vault.
 */
export function rotateRequestKeys(c: VaultContents, now: Date, opts: { overlapMs: number; validityMs: number }): VaultContents {
  const cut = new Date(now.getTime() + opts.overlapMs).toISOString();
  const kept = pruneExpiredKeys(c, now).requestKeys.map((k) => (Date.parse(k.notAfter) > Date.parse(cut) ? { ...k, notAfter: cut } : k));
  return { ...c, requestKeys: [...kept, makeRequestKey(now, opts.validityMs)] };
}

export function pruneExpiredKeys(c: VaultContents, now: Date): VaultContents {
  return { ...c, requestKeys: c.requestKeys.filter((k) => Date.parse(k.notAfter) > now.getTime()) };
}

export function requestPrivateKeys(k: RequestKeyEntry): RequestPrivateKeys {
  return { x25519: unb64(k.x25519Private), mlkem: unb64(k.mlkemSecret) };
}

export function addClient(c: VaultContents, name: string, publicKey: Uint8Array, now: Date): VaultContents {
  if (!CLIENT_NAME_RE.test(name)) throw new PhantomaError(ERRORS.CLI_USAGE, `a client name is 1-64 characters of [A-Za-z0-9._-], starting with a letter or digit`);
  if (publicKey.length !== 32) throw new PhantomaError(ERRORS.CLI_USAGE, `a client public key is a raw 32-byte Ed25519 key (base64 or base64url), got ${publicKey.length} bytes`);
  ed25519PublicKeyObject(publicKey);
  if (c.clients.some((x) => x.name === name)) throw new PhantomaError(ERRORS.CLIENT_EXISTS, `client "${name}" is already registered`);
  return { ...c, clients: [...c.clients, { name, publicKey: b64(publicKey), createdAt: now.toISOString() }] };
}

export function revokeClient(c: VaultContents, name: string, now: Date): VaultContents {
  const found = c.clients.find((x) => x.name === name);
  if (!found) throw new PhantomaError(ERRORS.CLIENT_NOT_FOUND, `no client named "${name}"`);
  if (found.revokedAt) return c;
  return { ...c, clients: c.clients.map((x) => (x.name === name ? { ...x, revokedAt: now.toISOString() } : x)) };
}

const ISO = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/;
const B64 = /^[A-Za-z0-9+/]*={0,2}$/;

/** Checks a decrypted body's shape; an authenticated but malformed body is still `vault_corrupt`. */
export function parseVaultContents(plaintext: Uint8Array): VaultContents {
  const bad = (why: string): PhantomaError => new PhantomaError(ERRORS.VAULT_CORRUPT, `the vault contents are malformed: ${why}`);
  let v: unknown;
  try {
    v = JSON.parse(Buffer.from(plaintext).toString('utf8'));
  } catch {
    throw bad('not JSON');
  }
  const o = v as Partial<VaultContents>;
  if (!o || typeof o !== 'object' || o.format !== 1) throw bad('unknown contents format');
  const str = (x: unknown, re: RegExp): boolean => typeof x === 'string' && re.test(x);
  if (!str(o.createdAt, ISO) || !o.identity || !str(o.identity.privateKey, B64) || !str(o.identity.publicKey, B64)) throw bad('identity');
  if (!Array.isArray(o.requestKeys) || !Array.isArray(o.clients)) throw bad('key or client lists');
  for (const k of o.requestKeys) {
    if (!k || !str(k.id, /^[0-9a-f]{16}$/) || !str(k.notBefore, ISO) || !str(k.notAfter, ISO)) throw bad('a request key');
    for (const f of ['x25519Public', 'x25519Private', 'mlkemPublic', 'mlkemSecret'] as const) if (!str(k[f], B64)) throw bad(`request key ${k.id}`);
  }
  for (const cl of o.clients) if (!cl || !str(cl.name, CLIENT_NAME_RE) || !str(cl.publicKey, B64) || !str(cl.createdAt, ISO) || (cl.revokedAt !== undefined && !str(cl.revokedAt, ISO))) throw bad('a client entry');
  if (o.tls !== undefined && (typeof o.tls.key !== 'string' || typeof o.tls.cert !== 'string')) throw bad('TLS material');
  return o as VaultContents;
}

export function serializeVaultContents(c: VaultContents): Buffer {
  return Buffer.from(JSON.stringify(c));
}
