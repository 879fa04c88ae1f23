// The sealed-request envelope (protocol version 1, docs/protocol.md): its binary layout, the client's
// signature over it, and the checks the gateway makes before a worker ever sees it. Pure functions over
// bytes; the gateway never opens the body (it has no key), it only parses the clear fields.
//
//   off  size   field
//   0    4      magic "PHSE"
//   4    1      version (1)
//   5    1      flags: bit 0 = stream; the other bits must be 0
//   6    8      request key id (the node's key document names it)
//   14   1+n    client name (1..64 bytes, [A-Za-z0-9][A-Za-z0-9._-]*)
//   .    1+n    model name (1..64 bytes, [A-Za-z0-9][A-Za-z0-9._:-]*)
//   .    8      timestamp, ms since the Unix epoch (u64 BE)
//   .    16     nonce
//   .    32     client's ephemeral X25519 public key
//   .    1088   ML-KEM-768 ciphertext
//   .    4+n    body ciphertext (AES-256-GCM, tag included), n >= 16
//   end  64     Ed25519 signature by the client over SIGNATURE_CONTEXT ‖ every byte above
import { createHash, sign as edSign, verify as edVerify, type KeyObject } from 'node:crypto';
import { ERRORS, PhantomaError } from '../errors.ts';
import { MLKEM768_CIPHERTEXT_BYTES, X25519_PUBLIC_BYTES } from './kem.ts';

export const ENVELOPE_MAGIC = Buffer.from('PHSE', 'ascii');
export const ENVELOPE_VERSION = 1;
export const KEY_ID_BYTES = 8;
export const NONCE_BYTES = 16;
export const SIGNATURE_BYTES = 64;
export const GCM_TAG_BYTES = 16;
export const SIGNATURE_CONTEXT = Buffer.from('phantoma-envelope-signature-v1\0', 'ascii');
export const TRANSCRIPT_CONTEXT = Buffer.from('phantoma-envelope-transcript-v1\0', 'ascii');
const FLAG_STREAM = 0x01;
const CLIENT_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const MODEL_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$/;

/** The smallest possible envelope: every fixed field, 1-byte names and an empty (tag-only) body. */
export const MIN_ENVELOPE_BYTES = 4 + 1 + 1 + KEY_ID_BYTES + 2 + 2 + 8 + NONCE_BYTES + X25519_PUBLIC_BYTES + MLKEM768_CIPHERTEXT_BYTES + 4 + GCM_TAG_BYTES + SIGNATURE_BYTES;

export interface EnvelopeFields {
  version: number;
  stream: boolean;
  /** 16 lowercase hex. */
  keyId: string;
  clientName: string;
  model: string;
  timestampMs: number;
  nonce: Uint8Array;
  ephemeralPublicKey: Uint8Array;
  kemCiphertext: Uint8Array;
  ciphertext: Uint8Array;
}

export interface Envelope extends EnvelopeFields {
  /** The bytes the signature covers (everything before it). */
  signed: Uint8Array;
  signature: Uint8Array;
  /** SHA-256(TRANSCRIPT_CONTEXT ‖ magic … KEM ciphertext): binds the request key to every clear field. */
  transcriptHash: Uint8Array;
}

function malformed(why: string): PhantomaError {
  return new PhantomaError(ERRORS.SEALED_ENVELOPE_MALFORMED, `the sealed envelope is malformed: ${why}`);
}

function encodeName(name: string, re: RegExp, what: string): Buffer {
  if (!re.test(name)) throw new RangeError(`invalid ${what} "${name}"`);
  const b = Buffer.from(name, 'ascii');
  return Buffer.concat([Buffer.from([b.length]), b]);
}

/** The bytes the transcript hash covers: magic through the KEM ciphertext, i.e. every clear field. */
export function encodeHeader(f: Omit<EnvelopeFields, 'ciphertext'>): Buffer {
  if (f.version < 0 || f.version > 255) throw new RangeError('version is one byte');
  if (!/^[0-9a-f]{16}$/.test(f.keyId)) throw new RangeError('keyId is 16 lowercase hex digits');
  if (f.nonce.length !== NONCE_BYTES) throw new RangeError(`the nonce is ${NONCE_BYTES} bytes`);
  if (f.ephemeralPublicKey.length !== X25519_PUBLIC_BYTES) throw new RangeError(`the ephemeral key is ${X25519_PUBLIC_BYTES} bytes`);
  if (f.kemCiphertext.length !== MLKEM768_CIPHERTEXT_BYTES) throw new RangeError(`the KEM ciphertext is ${MLKEM768_CIPHERTEXT_BYTES} bytes`);
  if (!Number.isSafeInteger(f.timestampMs) || f.timestampMs < 0) throw new RangeError('timestampMs is a non-negative integer');
  const ts = Buffer.alloc(8);
  ts.writeBigUInt64BE(BigInt(f.timestampMs));
  return Buffer.concat([
    ENVELOPE_MAGIC,
    Buffer.from([f.version, f.stream ? FLAG_STREAM : 0]),
    Buffer.from(f.keyId, 'hex'),
    encodeName(f.clientName, CLIENT_NAME_RE, 'client name'),
    encodeName(f.model, MODEL_NAME_RE, 'model name'),
    ts,
    f.nonce,
    f.ephemeralPublicKey,
    f.kemCiphertext,
  ]);
}

export function transcriptHashOf(header: Uint8Array): Buffer {
  return createHash('sha256').update(TRANSCRIPT_CONTEXT).update(header).digest();
}

/** Client side: the complete signed envelope. */
export function encodeEnvelope(f: EnvelopeFields, clientKey: KeyObject): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(f.ciphertext.length);
  const signed = Buffer.concat([encodeHeader(f), len, f.ciphertext]);
  const signature = edSign(null, Buffer.concat([SIGNATURE_CONTEXT, signed]), clientKey);
  return Buffer.concat([signed, signature]);
}

/**
 * Parses an envelope's layout, every length and value range checked, nothing trusted yet (the
 * signature is checked by verifySignature). Throws sealed_envelope_too_large or sealed_envelope_malformed,
 * or sealed_version_unsupported for a well-framed envelope of another version.
 */
export function parseEnvelope(bytes: Uint8Array, maxBytes: number): Envelope {
  if (bytes.length > maxBytes) throw new PhantomaError(ERRORS.SEALED_ENVELOPE_TOO_LARGE, `the sealed envelope is ${bytes.length} bytes; at most ${maxBytes} are accepted`);
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
  if (b.length < 6) throw malformed(`${b.length} bytes is shorter than any envelope`);
  if (!b.subarray(0, 4).equals(ENVELOPE_MAGIC)) throw malformed('wrong magic (not a Phantoma sealed envelope)');
  const version = b[4]!;
  if (version !== ENVELOPE_VERSION) throw new PhantomaError(ERRORS.SEALED_VERSION_UNSUPPORTED, `sealed envelope version ${version} is not supported (this node speaks ${ENVELOPE_VERSION})`);
  if (b.length < MIN_ENVELOPE_BYTES) throw malformed(`${b.length} bytes is shorter than the smallest envelope (${MIN_ENVELOPE_BYTES})`);
  const flags = b[5]!;
  if (flags & ~FLAG_STREAM) throw malformed(`unknown flag bits 0x${flags.toString(16)}`);
  let off = 6;
  const take = (n: number, what: string): Buffer => {
    if (off + n > b.length) throw malformed(`truncated in ${what}`);
    const out = b.subarray(off, off + n);
    off += n;
    return out;
  };
  const name = (re: RegExp, what: string): string => {
    const n = take(1, what)[0]!;
    const s = take(n, what).toString('latin1');
    if (!re.test(s)) throw malformed(`invalid ${what}`);
    return s;
  };
  const keyId = take(KEY_ID_BYTES, 'key id').toString('hex');
  const clientName = name(CLIENT_NAME_RE, 'client name');
  const model = name(MODEL_NAME_RE, 'model name');
  const ts = take(8, 'timestamp').readBigUInt64BE();
  if (ts > BigInt(Number.MAX_SAFE_INTEGER)) throw malformed('timestamp out of range');
  const nonce = take(NONCE_BYTES, 'nonce');
  const ephemeralPublicKey = take(X25519_PUBLIC_BYTES, 'ephemeral key');
  const kemCiphertext = take(MLKEM768_CIPHERTEXT_BYTES, 'KEM ciphertext');
  const headerEnd = off;
  const ctLen = take(4, 'body length').readUInt32BE();
  if (ctLen < GCM_TAG_BYTES) throw malformed('the body is shorter than its authentication tag');
  if (off + ctLen + SIGNATURE_BYTES !== b.length) throw malformed(off + ctLen + SIGNATURE_BYTES > b.length ? 'truncated in body or signature' : 'trailing bytes after the signature');
  const ciphertext = take(ctLen, 'body');
  const signed = b.subarray(0, off);
  const signature = take(SIGNATURE_BYTES, 'signature');
  return {
    version,
    stream: (flags & FLAG_STREAM) !== 0,
    keyId,
    clientName,
    model,
    timestampMs: Number(ts),
    nonce,
    ephemeralPublicKey,
    kemCiphertext,
    ciphertext,
    signed,
    signature,
    transcriptHash: transcriptHashOf(b.subarray(0, headerEnd)),
  };
}

export function verifySignature(env: Envelope, clientPublicKey: KeyObject): boolean {
  return edVerify(null, Buffer.concat([SIGNATURE_CONTEXT, env.signed]), clientPublicKey, env.signature);
}

// ---- the gateway's checks, in the design's order ----

export interface KnownClient {
  publicKey: KeyObject;
  revoked: boolean;
}

export interface KnownRequestKey {
  notBeforeMs: number;
  notAfterMs: number;
}

export interface EnvelopeCheckContext {
  maxEnvelopeBytes: number;
  lookupClient(name: string): KnownClient | undefined;
  lookupKey(keyId: string): KnownRequestKey | undefined;
  nowMs: number;
  /** Envelopes stamped before this process started are refused (its nonce memory starts empty then). */
  processStartMs: number;
  /** Allowed distance between the envelope's timestamp and now, either way. */
  windowMs: number;
  nonces: NonceCache;
}

/**
 * Size caps → layout and version → client known and not revoked → signature → request key id and validity
 * → timestamp within the window and not before this process started → nonce unseen (then remembered).
 * The nonce is recorded last, so a refused envelope cannot burn a valid request's nonce.
 */
export function checkEnvelope(bytes: Uint8Array, ctx: EnvelopeCheckContext): Envelope {
  const env = parseEnvelope(bytes, ctx.maxEnvelopeBytes);
  const client = ctx.lookupClient(env.clientName);
  if (!client) throw new PhantomaError(ERRORS.SEALED_UNKNOWN_CLIENT, 'the envelope names a client this node does not know');
  if (client.revoked) throw new PhantomaError(ERRORS.SEALED_CLIENT_REVOKED, 'the client that signed this envelope has been revoked');
  if (!verifySignature(env, client.publicKey)) throw new PhantomaError(ERRORS.SEALED_BAD_SIGNATURE, "the envelope's signature does not verify against the client's key");
  const key = ctx.lookupKey(env.keyId);
  if (!key || ctx.nowMs < key.notBeforeMs || ctx.nowMs >= key.notAfterMs) {
    throw new PhantomaError(ERRORS.SEALED_UNKNOWN_KEY, `request key ${env.keyId} is not one this node opens requests with now; fetch the key document again`);
  }
  if (Math.abs(ctx.nowMs - env.timestampMs) > ctx.windowMs || env.timestampMs < ctx.processStartMs - ctx.windowMs / 2) {
    throw new PhantomaError(ERRORS.SEALED_TIMESTAMP_INVALID, `the envelope's timestamp is outside the accepted window of ±${ctx.windowMs} ms (or older than this node process)`);
  }
  if (!ctx.nonces.remember(env.nonce, env.timestampMs, ctx.nowMs)) {
    throw new PhantomaError(ERRORS.SEALED_REPLAY, 'this envelope (its nonce) was already received');
  }
  return env;
}

// ---- replay memory ----

export interface NonceCache {
  /** Records the nonce; false if it was already seen within the window. */
  remember(nonce: Uint8Array, timestampMs: number, nowMs: number): boolean;
  readonly size: number;
}

/**
 * Nonces are kept until their envelope's timestamp has left the window (after that the timestamp check
 * refuses a replay anyway). Bounded: past maxEntries new envelopes are refused as replays would be,
 * rather than forgetting a nonce early (which would reopen a replay window).
 */
export function createNonceCache(opts: { windowMs: number; maxEntries: number }): NonceCache {
  const seen = new Map<string, number>(); // nonce hex → forget after (ms)
  let nextSweep = 0;
  return {
    remember(nonce, timestampMs, nowMs) {
      if (nowMs >= nextSweep) {
        for (const [k, until] of seen) if (until <= nowMs) seen.delete(k);
        nextSweep = nowMs + Math.max(1000, opts.windowMs / 8);
      }
      const k = Buffer.from(nonce).toString('hex');
      const until = seen.get(k);
      if (until !== undefined && until > nowMs) return false;
      if (seen.size >= opts.maxEntries) {
        throw new PhantomaError(ERRORS.SEALED_REPLAY_MEMORY_FULL, 'too many sealed requests within the replay window; try again shortly');
      }
      seen.set(k, timestampMs + opts.windowMs + 1);
      return true;
    },
    get size() {
      return seen.size;
    },
  };
}
