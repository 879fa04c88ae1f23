// The hybrid KEM of a sealed request, shared by the client (encapsulate) and keyd (decapsulate):
// X25519 (classical) plus ML-KEM-768 (post-quantum); the per-request key is
//   HKDF-SHA256(ikm = x25519 secret ‖ ML-KEM secret, salt = "", info = LABEL ‖ SHA-256(eph pub ‖ KEM ct) ‖ transcript hash)
// so the key is safe while either KEM holds, and is bound to the ciphertexts and the request's transcript.
// Pure functions over bytes; no I/O. ML-KEM runs in node:crypto (OpenSSL 3.5, FIPS 203): a decapsulation
// there costs ≈ 30 µs against ≈ 0.7 ms warm — and several ms cold, in a keyd that decapsulates once per
// request — for the pure-JS @noble/post-quantum, which still makes the keys (its 2400-byte expanded
// decapsulation key is what the vault stores; OpenSSL takes it as the PKCS#8 `expandedKey` choice).
import { createPrivateKey, createPublicKey, diffieHellman, generateKeyPairSync, hkdfSync, createHash, encapsulate as kemEncapsulate, decapsulate as kemDecapsulate, type JsonWebKey, type KeyObject } from 'node:crypto';
import { ml_kem768 } from '@noble/post-quantum/ml-kem.js';

export const KEM_LABEL = 'phantoma-kem-combine-v1';
export const X25519_PUBLIC_BYTES = 32;
export const MLKEM768_PUBLIC_BYTES = 1184;
export const MLKEM768_SECRET_BYTES = 2400;
export const MLKEM768_CIPHERTEXT_BYTES = 1088;
export const TRANSCRIPT_HASH_BYTES = 32;
export const REQUEST_KEY_BYTES = 32;

export interface RequestPublicKeys {
  x25519: Uint8Array;
  mlkem: Uint8Array;
}

export interface RequestPrivateKeys {
  /** X25519 private key as PKCS#8 DER. */
  x25519: Uint8Array;
  /** ML-KEM-768 decapsulation key (2400 bytes). */
  mlkem: Uint8Array;
}

export interface KemSecrets {
  ephemeralPublicKey: Uint8Array;
  kemCiphertext: Uint8Array;
  x25519Secret: Uint8Array;
  mlkemSecret: Uint8Array;
}

/** The private keys as key objects, made once per key and reused for every decapsulation. */
export interface PreparedRequestPrivateKeys {
  x25519: KeyObject;
  mlkem: KeyObject;
}

/** DER TLV with a definite length (short or long form up to 65535 bytes). */
function derTlv(tag: number, body: Buffer): Buffer {
  const n = body.length;
  const len = n < 0x80 ? Buffer.from([n]) : n < 0x100 ? Buffer.from([0x81, n]) : Buffer.from([0x82, n >> 8, n & 0xff]);
  return Buffer.concat([Buffer.from([tag]), len, body]);
}

/** id-alg-ml-kem-768, 2.16.840.1.101.3.4.4.2 (NIST CSOR). */
const MLKEM768_OID_DER = Buffer.from('0609608648016503040402', 'hex');

/** OneAsymmetricKey v0 with the ML-KEM-PrivateKey `expandedKey` choice (draft-ietf-lamps-kyber-certificates). */
function mlkemPrivateKeyObject(expanded: Uint8Array): KeyObject {
  if (expanded.length !== MLKEM768_SECRET_BYTES) throw new RangeError(`an ML-KEM-768 decapsulation key is ${MLKEM768_SECRET_BYTES} bytes`);
  const inner = derTlv(0x04, Buffer.from(expanded));
  const pkcs8 = derTlv(0x30, Buffer.concat([Buffer.from('020100', 'hex'), derTlv(0x30, MLKEM768_OID_DER), derTlv(0x04, inner)]));
  try {
    return createPrivateKey({ key: pkcs8, format: 'der', type: 'pkcs8' });
  } finally {
    inner.fill(0);
    pkcs8.fill(0);
  }
}

/** A raw ML-KEM-768 public key (1184 bytes) as a node:crypto key object. */
export function mlkemPublicKeyObject(raw: Uint8Array): KeyObject {
  if (raw.length !== MLKEM768_PUBLIC_BYTES) throw new RangeError(`an ML-KEM-768 public key is ${MLKEM768_PUBLIC_BYTES} bytes`);
  // JWK "AKP" (algorithm key pair) is how node:crypto imports a raw ML-KEM public key.
  return createPublicKey({ key: { kty: 'AKP', alg: 'ML-KEM-768', pub: Buffer.from(raw).toString('base64url') } as unknown as JsonWebKey, format: 'jwk' });
}

/** Imports the stored private keys once (≈ 0.1 ms: OpenSSL checks the expanded key); keyd caches the result. */
export function prepareRequestPrivateKeys(keys: RequestPrivateKeys): PreparedRequestPrivateKeys {
  return { x25519: createPrivateKey({ key: Buffer.from(keys.x25519), format: 'der', type: 'pkcs8' }), mlkem: mlkemPrivateKeyObject(keys.mlkem) };
}

function x25519Public(raw: Uint8Array): KeyObject {
  if (raw.length !== X25519_PUBLIC_BYTES) throw new RangeError(`an X25519 public key is ${X25519_PUBLIC_BYTES} bytes, got ${raw.length}`);
  return createPublicKey({ key: { kty: 'OKP', crv: 'X25519', x: Buffer.from(raw).toString('base64url') }, format: 'jwk' });
}

export function rawX25519Public(key: KeyObject): Uint8Array {
  return Buffer.from(key.export({ format: 'jwk' }).x!, 'base64url');
}

function x25519Shared(privateKey: KeyObject, publicRaw: Uint8Array): Uint8Array {
  const secret = diffieHellman({ privateKey, publicKey: x25519Public(publicRaw) });
  // A low-order peer point gives the all-zero secret: contributory behaviour is required.
  if (secret.every((b) => b === 0)) throw new RangeError('X25519 produced the all-zero secret (low-order public key)');
  return secret;
}

/** A fresh request key pair (what the vault stores). */
export function generateRequestKeyPair(): { publicKeys: RequestPublicKeys; privateKeys: RequestPrivateKeys } {
  const x = generateKeyPairSync('x25519');
  const m = ml_kem768.keygen();
  return {
    publicKeys: { x25519: rawX25519Public(x.publicKey), mlkem: m.publicKey },
    privateKeys: { x25519: x.privateKey.export({ format: 'der', type: 'pkcs8' }), mlkem: m.secretKey },
  };
}

/** Client side: an ephemeral X25519 exchange and an ML-KEM encapsulation to the node's request keys. */
export function encapsulate(node: RequestPublicKeys): KemSecrets {
  const mlkemPublic = mlkemPublicKeyObject(node.mlkem);
  const eph = generateKeyPairSync('x25519');
  const { ciphertext, sharedKey } = kemEncapsulate(mlkemPublic);
  return { ephemeralPublicKey: rawX25519Public(eph.publicKey), kemCiphertext: ciphertext, x25519Secret: x25519Shared(eph.privateKey, node.x25519), mlkemSecret: sharedKey };
}

/** keyd side: recovers both secrets from the envelope's ephemeral public key and KEM ciphertext. */
export function decapsulate(keys: RequestPrivateKeys | PreparedRequestPrivateKeys, ephemeralPublicKey: Uint8Array, kemCiphertext: Uint8Array): KemSecrets {
  if (kemCiphertext.length !== MLKEM768_CIPHERTEXT_BYTES) throw new RangeError(`an ML-KEM-768 ciphertext is ${MLKEM768_CIPHERTEXT_BYTES} bytes`);
  const prepared = keys.mlkem instanceof Uint8Array ? prepareRequestPrivateKeys(keys as RequestPrivateKeys) : (keys as PreparedRequestPrivateKeys);
  return {
    ephemeralPublicKey,
    kemCiphertext,
    x25519Secret: x25519Shared(prepared.x25519, ephemeralPublicKey),
    // ML-KEM decapsulation never fails: a wrong ciphertext yields an unrelated secret (implicit rejection).
    mlkemSecret: kemDecapsulate(prepared.mlkem, Buffer.from(kemCiphertext)),
  };
}

/** Zero-fills the two shared secrets of a key agreement (once it sealed or opened its one request). */
export function wipeKemSecrets(s: Pick<KemSecrets, 'x25519Secret' | 'mlkemSecret'>): void {
  s.x25519Secret.fill(0);
  s.mlkemSecret.fill(0);
}

/** The per-request key: both secrets through HKDF, bound to the ciphertexts and the transcript hash. */
export function combineKem(s: KemSecrets, transcriptHash: Uint8Array): Uint8Array {
  if (transcriptHash.length !== TRANSCRIPT_HASH_BYTES) throw new RangeError(`the transcript hash is ${TRANSCRIPT_HASH_BYTES} bytes`);
  const bound = createHash('sha256').update(s.ephemeralPublicKey).update(s.kemCiphertext).digest();
  const info = Buffer.concat([Buffer.from(KEM_LABEL), bound, transcriptHash]);
  const ikm = Buffer.concat([s.x25519Secret, s.mlkemSecret]);
  try {
    return new Uint8Array(hkdfSync('sha256', ikm, Buffer.alloc(0), info, REQUEST_KEY_BYTES));
  } finally {
    ikm.fill(0);
  }
}
