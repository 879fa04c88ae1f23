// Sealing and opening a request body and the response chunks of protocol version 1 (docs/protocol.md).
// Pure functions over bytes, shared by the client SDK (seal the body, open the chunks) and the worker
// (open the body, seal the chunks).
//
// AEAD: AES-256-GCM from node:crypto. Every key is used for one request only and nonces are counters, so
// GCM's nonce-reuse weakness cannot arise; AES-NI makes it the fastest AEAD Node offers here, and it needs
// no extra dependency. Padding: a body or chunk is `u32 length ‖ payload ‖ zeros` up to the next size
// bucket, so ciphertext sizes reveal only the bucket, not the prompt's or a token's length.
import { createCipheriv, createDecipheriv, hkdfSync } from 'node:crypto';
import { ERRORS, PhantomaError } from '../errors.ts';
import { GCM_TAG_BYTES } from './envelope.ts';

export const BODY_KEY_INFO = 'phantoma-body-key-v1';
export const RESPONSE_KEY_INFO = 'phantoma-response-key-v1';
const CHUNK_AAD = Buffer.from('phantoma-chunk-v1\0', 'ascii');

/** Body sizes (bytes, before the tag): 1 KiB doubling up to 4 MiB. */
export const BODY_BUCKETS: readonly number[] = Array.from({ length: 13 }, (_, i) => 1024 << i);
/** Chunk sizes: a token's text, an error, or the final usage all fit the first buckets. */
export const CHUNK_BUCKETS: readonly number[] = [128, 512, 2048, 8192, 32768];

export interface SessionKeys {
  /** Opens the request body (client → worker). */
  bodyKey: Buffer;
  /** Seals the response chunks (worker → client). */
  responseKey: Buffer;
}

/** Two one-way keys from the per-request key, so the two directions never share a key and nonce. */
export function deriveSessionKeys(requestKey: Uint8Array): SessionKeys {
  const k = (info: string): Buffer => Buffer.from(hkdfSync('sha256', requestKey, Buffer.alloc(0), Buffer.from(info, 'ascii'), 32));
  return { bodyKey: k(BODY_KEY_INFO), responseKey: k(RESPONSE_KEY_INFO) };
}

/** The padded size of a payload of `n` bytes: the smallest bucket that holds it and its 4-byte length. */
export function paddedSize(n: number, buckets: readonly number[]): number {
  const size = buckets.find((b) => b >= n + 4);
  if (size === undefined) throw new RangeError(`${n} bytes is more than the largest bucket (${buckets.at(-1)! - 4})`);
  return size;
}

export function pad(payload: Uint8Array, buckets: readonly number[]): Buffer {
  const size = paddedSize(payload.length, buckets);
  const out = Buffer.alloc(size);
  out.writeUInt32BE(payload.length, 0);
  out.set(payload, 4);
  return out;
}

/** The payload of a padded block; anything but a bucket size, an in-range length and zero padding is refused. */
export function unpad(block: Buffer, buckets: readonly number[]): Buffer {
  if (!buckets.includes(block.length)) return failOpen('the block is not a bucket size');
  const n = block.readUInt32BE(0);
  if (n > block.length - 4) return failOpen('the length prefix overruns the block');
  for (let i = 4 + n; i < block.length; i++) if (block[i] !== 0) return failOpen('non-zero padding');
  return block.subarray(4, 4 + n);
}

function failOpen(why: string): never {
  throw new PhantomaError(ERRORS.SEALED_OPEN_FAILED, `the sealed data could not be opened: ${why}`);
}

function gcmSeal(key: Buffer, nonce: Buffer, aad: Buffer, plaintext: Buffer): Buffer {
  const c = createCipheriv('aes-256-gcm', key, nonce);
  c.setAAD(aad);
  const out = Buffer.concat([c.update(plaintext), c.final(), c.getAuthTag()]);
  return out;
}

function gcmOpen(key: Buffer, nonce: Buffer, aad: Buffer, sealed: Uint8Array): Buffer {
  if (sealed.length < GCM_TAG_BYTES) return failOpen('shorter than its tag');
  const body = Buffer.from(sealed.buffer, sealed.byteOffset, sealed.length);
  const d = createDecipheriv('aes-256-gcm', key, nonce);
  d.setAAD(aad);
  d.setAuthTag(body.subarray(body.length - GCM_TAG_BYTES));
  const plain = d.update(body.subarray(0, body.length - GCM_TAG_BYTES));
  try {
    return Buffer.concat([plain, d.final()]);
  } catch {
    plain.fill(0);
    return failOpen('authentication failed (wrong key, or the bytes were altered)');
  }
}

const BODY_NONCE = Buffer.alloc(12); // the body key seals exactly one message

/** Client: the body (UTF-8 JSON) padded and sealed, bound to the envelope's transcript. */
export function sealBody(bodyKey: Buffer, transcriptHash: Uint8Array, json: Uint8Array): Buffer {
  const block = pad(json, BODY_BUCKETS);
  try {
    return gcmSeal(bodyKey, BODY_NONCE, Buffer.from(transcriptHash), block);
  } finally {
    block.fill(0);
  }
}

/** Worker: the body's JSON bytes (the caller zero-fills them when done). */
export function openBody(bodyKey: Buffer, transcriptHash: Uint8Array, ciphertext: Uint8Array): Buffer {
  const block = gcmOpen(bodyKey, BODY_NONCE, Buffer.from(transcriptHash), ciphertext);
  return Buffer.from(unpad(block, BODY_BUCKETS));
}

// ---- response chunks ----

function chunkNonce(counter: number): Buffer {
  const n = Buffer.alloc(12);
  n.writeUInt32BE(1, 0);
  n.writeBigUInt64BE(BigInt(counter), 4);
  return n;
}

function chunkAad(counter: number, final: boolean): Buffer {
  const a = Buffer.alloc(CHUNK_AAD.length + 9);
  CHUNK_AAD.copy(a);
  a.writeBigUInt64BE(BigInt(counter), CHUNK_AAD.length);
  a[CHUNK_AAD.length + 8] = final ? 1 : 0;
  return a;
}

/**
 * A sealed chunk on the wire: `u8 final ‖ AES-256-GCM(padded payload)`. The counter is implicit (the
 * order of arrival) and authenticated, so a reordered, dropped or replayed chunk fails to open, and a
 * stream that ends without a final chunk is known to be truncated.
 */
export function createChunkSealer(responseKey: Buffer): { seal(payload: Uint8Array, final: boolean): Buffer; readonly count: number } {
  let counter = 0;
  let finished = false;
  return {
    seal(payload, final) {
      if (finished) throw new Error('the final chunk was already sealed');
      const block = pad(payload, CHUNK_BUCKETS);
      try {
        const sealed = gcmSeal(responseKey, chunkNonce(counter), chunkAad(counter, final), block);
        counter++;
        finished = final;
        return Buffer.concat([Buffer.from([final ? 1 : 0]), sealed]);
      } finally {
        block.fill(0);
      }
    },
    get count() {
      return counter;
    },
  };
}

export function createChunkOpener(responseKey: Buffer): { open(chunk: Uint8Array): Buffer; readonly finished: boolean } {
  let counter = 0;
  let finished = false;
  return {
    open(chunk) {
      if (finished) return failOpen('a chunk after the final one');
      if (chunk.length < 1 + GCM_TAG_BYTES) return failOpen('a chunk shorter than its tag');
      const flag = chunk[0]!;
      if (flag > 1) return failOpen('bad chunk flag');
      const final = flag === 1;
      const block = gcmOpen(responseKey, chunkNonce(counter), chunkAad(counter, final), chunk.subarray(1));
      const payload = Buffer.from(unpad(block, CHUNK_BUCKETS));
      block.fill(0);
      counter++;
      finished = final;
      return payload;
    },
    get finished() {
      return finished;
    },
  };
}
