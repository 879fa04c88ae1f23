// A sealed request end to end, protocol version 1: the client seals (KEM to the node's request keys,
// envelope, signature); keyd turns the envelope's KEM fields into the per-request key; the worker opens the
// body with it and seals its answer. The gateway is not here: it only runs envelope.ts's checks.
import { randomBytes, type KeyObject } from 'node:crypto';
import { combineKem, decapsulate, encapsulate, wipeKemSecrets, type KemSecrets, type PreparedRequestPrivateKeys, type RequestPrivateKeys, type RequestPublicKeys } from './kem.ts';
import { ENVELOPE_VERSION, GCM_TAG_BYTES, NONCE_BYTES, SIGNATURE_BYTES, encodeEnvelope, encodeHeader, transcriptHashOf, type Envelope } from './envelope.ts';
import { BODY_BUCKETS, deriveSessionKeys, openBody, paddedSize, sealBody, type SessionKeys } from './seal.ts';

export interface NodeRequestKey {
  keyId: string;
  publicKeys: RequestPublicKeys;
}

export interface SealRequestInput {
  node: NodeRequestKey;
  clientName: string;
  clientKey: KeyObject;
  model: string;
  stream: boolean;
  /** The OpenAI-shaped request body (messages, max_tokens, ...), serialised as JSON inside the seal. */
  body: unknown;
  nowMs: number;
  /** Fixed values for test vectors only; fresh randomness otherwise. */
  nonce?: Uint8Array;
  /**
   * The key agreement, made ahead of time for this node key (src/client/kem-spare.ts) or fixed for a test
   * vector; made now when absent. Each set of secrets seals one request only.
   */
  kem?: KemSecrets;
}

export interface SealedRequest {
  envelope: Buffer;
  /** The client keeps these to open the answer. */
  keys: SessionKeys;
}

export function sealRequest(input: SealRequestInput): SealedRequest {
  return planSealedRequest(input).seal();
}

/**
 * A sealed request in two steps: its exact envelope length first (the header and the padded body's bucket
 * are known before any crypto on the body), then the sealing — so a client can send its HTTP headers while
 * it seals (src/client/http.ts). The body is serialised in the first step, once.
 */
export function planSealedRequest(input: SealRequestInput): { length: number; seal(): SealedRequest } {
  const kem = input.kem ?? encapsulate(input.node.publicKeys);
  const fields = {
    version: ENVELOPE_VERSION,
    stream: input.stream,
    keyId: input.node.keyId,
    clientName: input.clientName,
    model: input.model,
    timestampMs: input.nowMs,
    nonce: input.nonce ?? randomBytes(NONCE_BYTES),
    ephemeralPublicKey: kem.ephemeralPublicKey,
    kemCiphertext: kem.kemCiphertext,
  };
  const header = encodeHeader(fields);
  const json = Buffer.from(JSON.stringify(input.body), 'utf8');
  const length = header.length + 4 + paddedSize(json.length, BODY_BUCKETS) + GCM_TAG_BYTES + SIGNATURE_BYTES;
  return {
    length,
    seal() {
      const transcriptHash = transcriptHashOf(header);
      const requestKey = combineKem(kem, transcriptHash);
      const keys = deriveSessionKeys(requestKey);
      requestKey.fill(0);
      const ciphertext = sealBody(keys.bodyKey, transcriptHash, json);
      json.fill(0);
      return { envelope: encodeEnvelope({ ...fields, ciphertext }, input.clientKey), keys };
    },
  };
}

/** keyd: the per-request key for an envelope's KEM fields and transcript (one call per worker). */
export function requestKeyFor(privateKeys: RequestPrivateKeys | PreparedRequestPrivateKeys, env: Pick<Envelope, 'ephemeralPublicKey' | 'kemCiphertext' | 'transcriptHash'>): Uint8Array {
  const secrets = decapsulate(privateKeys, env.ephemeralPublicKey, env.kemCiphertext);
  try {
    return combineKem(secrets, env.transcriptHash);
  } finally {
    wipeKemSecrets(secrets);
  }
}

/** Worker: the body's JSON bytes and the key that seals the answer. Throws sealed_open_failed. */
export function openRequest(env: Pick<Envelope, 'ciphertext' | 'transcriptHash'>, requestKey: Uint8Array): { json: Buffer; keys: SessionKeys } {
  const keys = deriveSessionKeys(requestKey);
  const json = openBody(keys.bodyKey, env.transcriptHash, env.ciphertext);
  return { json, keys };
}
