// Deterministic keys and a sealed request for protocol tests and the published test vector
// (docs/protocol.md): every input comes from a fixed seed, so the envelope's bytes are fixed too.
import { createHash, createPrivateKey, createPublicKey, diffieHellman, type KeyObject } from 'node:crypto';
import { ml_kem768 } from '@noble/post-quantum/ml-kem.js';
import { rawX25519Public, type KemSecrets, type RequestPrivateKeys, type RequestPublicKeys } from '../../src/sealed/kem.ts';

/** 32 bytes from a label: SHA-256("phantoma-test-vector:" ‖ label). */
export function seed(label: string, bytes = 32): Buffer {
  const out = Buffer.alloc(bytes);
  for (let i = 0; i * 32 < bytes; i++) createHash('sha256').update(`phantoma-test-vector:${label}:${i}`).digest().copy(out, i * 32);
  return out;
}

// PKCS#8 prefixes for a raw 32-byte X25519 / Ed25519 private key (RFC 8410).
const X25519_PKCS8 = Buffer.from('302e020100300506032b656e04220420', 'hex');
const ED25519_PKCS8 = Buffer.from('302e020100300506032b657004220420', 'hex');

export function x25519FromSeed(s: Buffer): KeyObject {
  return createPrivateKey({ key: Buffer.concat([X25519_PKCS8, s]), format: 'der', type: 'pkcs8' });
}

export function ed25519FromSeed(s: Buffer): KeyObject {
  return createPrivateKey({ key: Buffer.concat([ED25519_PKCS8, s]), format: 'der', type: 'pkcs8' });
}

export interface VectorKeys {
  nodePublic: RequestPublicKeys;
  nodePrivate: RequestPrivateKeys;
  keyId: string;
  clientKey: KeyObject;
  clientPublic: KeyObject;
}

export function vectorKeys(): VectorKeys {
  const x = x25519FromSeed(seed('node-x25519'));
  const m = ml_kem768.keygen(seed('node-mlkem', 64));
  const nodePublic = { x25519: rawX25519Public(createPublicKey(x)), mlkem: m.publicKey };
  const keyId = createHash('sha256').update(nodePublic.x25519).update(nodePublic.mlkem).digest('hex').slice(0, 16);
  const clientKey = ed25519FromSeed(seed('client-ed25519'));
  return {
    nodePublic,
    nodePrivate: { x25519: x.export({ format: 'der', type: 'pkcs8' }), mlkem: m.secretKey },
    keyId,
    clientKey,
    clientPublic: createPublicKey(clientKey),
  };
}

/** The client's KEM step with fixed randomness (the ephemeral key and ML-KEM's message). */
export function vectorKem(node: RequestPublicKeys): KemSecrets {
  const eph = x25519FromSeed(seed('client-ephemeral-x25519'));
  const nodeX = createPublicKey({ key: { kty: 'OKP', crv: 'X25519', x: Buffer.from(node.x25519).toString('base64url') }, format: 'jwk' });
  const { cipherText, sharedSecret } = ml_kem768.encapsulate(node.mlkem, seed('client-mlkem-message'));
  return { ephemeralPublicKey: rawX25519Public(createPublicKey(eph)), kemCiphertext: cipherText, x25519Secret: diffieHellman({ privateKey: eph, publicKey: nodeX }), mlkemSecret: sharedSecret };
}

export const VECTOR_TIMESTAMP_MS = 1_795_000_000_000;
export const VECTOR_BODY = { messages: [{ role: 'user', content: 'Hello, sealed world.' }], max_tokens: 16, temperature: 0 };
