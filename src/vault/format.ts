// The sealed file format shared by the vault and its backups. Pure: bytes in, bytes out.
//
//   offset size  field
//   0      8     magic "PHANTOMA"
//   8      1     format version (1)
//   9      1     kind: 1 vault, 2 backup (a backup is never opened as a vault, nor the reverse)
//   10     1     KDF: 1 scrypt (passphrase), 2 HKDF-SHA256 (key file, e.g. a systemd credential)
//   11     1     scrypt log2(N)   } zero for the key-file KDF
//   12     1     scrypt r         }
//   13     1     scrypt p         }
//   14     2     reserved, zero
//   16     16    salt
//   32     16    key-check value: tells a wrong passphrase from a damaged body
//   48     12    AEAD nonce (fresh for every write)
//   60     4     body length (ciphertext + 16-byte tag), big-endian
//   64     16    header checksum: SHA-256 of bytes 0..63, first 16 bytes (catches damage before any KDF runs)
//   80     ...   body: AES-256-GCM of the JSON contents, with bytes 0..79 as associated data
//
// Opening checks, in order: length ≥ header → magic → version → kind → checksum → KDF id and bounds →
// exact length → derive → key-check value → AEAD. So every header byte flip is `vault_corrupt` without
// deriving, absurd KDF parameters are refused before deriving, a wrong passphrase is told apart by the
// key-check value, and any body flip fails authentication.
import { createCipheriv, createDecipheriv, createHash, hkdfSync, randomBytes, scryptSync, timingSafeEqual } from 'node:crypto';
import { ERRORS, PhantomaError } from '../errors.ts';

export const MAGIC = Buffer.from('PHANTOMA', 'latin1');
export const FORMAT_VERSION = 1;
export const HEADER_BYTES = 80;
export const TAG_BYTES = 16;
export const MAX_BODY_BYTES = 16 << 20;
export const KIND = { vault: 1, backup: 2 } as const;
export type FileKind = keyof typeof KIND;
export const KDF_SCRYPT = 1;
export const KDF_KEYFILE = 2;

/**
 * What a reader accepts (a tampered header must not make the node spend minutes or gigabytes):
 * log2(N) 10..20, r 1..16, p 1..4, memory 128·N·r ≤ 1 GiB, work N·r·p ≤ 2^24 (8× the default).
 */
export const SCRYPT_BOUNDS = Object.freeze({ log2NMin: 10, log2NMax: 20, rMax: 16, pMax: 4, maxMemBytes: 1 << 30, maxWork: 1 << 24 });
/** Production default: N = 2^17, r = 8, p = 1 — 128 MiB and about 0.6 s on this host's cores. */
export const SCRYPT_DEFAULT = Object.freeze({ log2N: 17, r: 8, p: 1 });
/** Writers refuse less than this unless explicitly allowed (vault.allowWeakKdf, for tests only). */
export const SCRYPT_MIN_STRONG_LOG2N = 15;

export interface ScryptParams {
  log2N: number;
  r: number;
  p: number;
}

export type Credential = { kind: 'passphrase'; secret: Uint8Array } | { kind: 'keyfile'; secret: Uint8Array };

/** The keys derived from a credential for one file (kept by an open vault so writes need no new KDF run). */
export interface SealKeys {
  kdf: number;
  params: ScryptParams;
  salt: Buffer;
  aeadKey: Buffer;
  kcv: Buffer;
}

function corrupt(message: string): PhantomaError {
  return new PhantomaError(ERRORS.VAULT_CORRUPT, message);
}

export function checkScryptParams(p: ScryptParams): string | undefined {
  const b = SCRYPT_BOUNDS;
  if (!Number.isInteger(p.log2N) || p.log2N < b.log2NMin || p.log2N > b.log2NMax) return `scrypt log2(N) ${p.log2N} is outside ${b.log2NMin}..${b.log2NMax}`;
  if (!Number.isInteger(p.r) || p.r < 1 || p.r > b.rMax) return `scrypt r ${p.r} is outside 1..${b.rMax}`;
  if (!Number.isInteger(p.p) || p.p < 1 || p.p > b.pMax) return `scrypt p ${p.p} is outside 1..${b.pMax}`;
  if (128 * 2 ** p.log2N * p.r > b.maxMemBytes) return `scrypt memory 128·N·r = ${128 * 2 ** p.log2N * p.r} bytes exceeds ${b.maxMemBytes}`;
  if (2 ** p.log2N * p.r * p.p > b.maxWork) return `scrypt work N·r·p = ${2 ** p.log2N * p.r * p.p} exceeds ${b.maxWork}`;
  return undefined;
}

function subkeys(master: Buffer, salt: Buffer): { aeadKey: Buffer; kcv: Buffer } {
  const aeadKey = Buffer.from(hkdfSync('sha256', master, salt, 'phantoma vault aead v1', 32));
  const kcv = Buffer.from(hkdfSync('sha256', master, salt, 'phantoma vault key check v1', 16));
  master.fill(0);
  return { aeadKey, kcv };
}

/** Runs the KDF. Parameters must already be within SCRYPT_BOUNDS (checked by the caller or here). */
export function deriveKeys(credential: Credential, salt: Buffer, params: ScryptParams): SealKeys {
  if (credential.secret.length === 0) throw new PhantomaError(ERRORS.VAULT_CREDENTIAL_MISSING, 'the vault passphrase or key file is empty');
  if (credential.kind === 'keyfile') {
    if (credential.secret.length < 32) throw new PhantomaError(ERRORS.VAULT_CREDENTIAL_MISSING, 'a vault key file must hold at least 32 bytes');
    const master = Buffer.from(hkdfSync('sha256', credential.secret, salt, 'phantoma vault key file v1', 32));
    return { kdf: KDF_KEYFILE, params: { log2N: 0, r: 0, p: 0 }, salt, ...subkeys(master, salt) };
  }
  const problem = checkScryptParams(params);
  if (problem) throw new PhantomaError(ERRORS.VAULT_KDF_REFUSED, `refusing KDF parameters: ${problem}`);
  const N = 2 ** params.log2N;
  const master = scryptSync(credential.secret, salt, 32, { N, r: params.r, p: params.p, maxmem: SCRYPT_BOUNDS.maxMemBytes + (1 << 20) });
  return { kdf: KDF_SCRYPT, params, salt, ...subkeys(master, salt) };
}

export function newSealKeys(credential: Credential, params: ScryptParams): SealKeys {
  return deriveKeys(credential, randomBytes(16), params);
}

export function sealFile(kind: FileKind, keys: SealKeys, plaintext: Uint8Array): Buffer {
  if (plaintext.length + TAG_BYTES > MAX_BODY_BYTES) throw new RangeError('the vault contents are too large');
  const header = Buffer.alloc(HEADER_BYTES);
  MAGIC.copy(header, 0);
  header[8] = FORMAT_VERSION;
  header[9] = KIND[kind];
  header[10] = keys.kdf;
  header[11] = keys.params.log2N;
  header[12] = keys.params.r;
  header[13] = keys.params.p;
  keys.salt.copy(header, 16);
  keys.kcv.copy(header, 32);
  const nonce = randomBytes(12);
  nonce.copy(header, 48);
  header.writeUInt32BE(plaintext.length + TAG_BYTES, 60);
  createHash('sha256').update(header.subarray(0, 64)).digest().copy(header, 64, 0, 16);
  const cipher = createCipheriv('aes-256-gcm', keys.aeadKey, nonce);
  cipher.setAAD(header);
  const body = Buffer.concat([cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
  return Buffer.concat([header, body]);
}

export interface ParsedHeader {
  kind: FileKind;
  kdf: number;
  params: ScryptParams;
  salt: Buffer;
  kcv: Buffer;
  nonce: Buffer;
  bodyLength: number;
}

/** Everything that can be checked without a credential; throws vault_corrupt / vault_kdf_refused. */
export function parseHeader(file: Uint8Array, expected: FileKind): ParsedHeader {
  const buf = Buffer.from(file.buffer, file.byteOffset, file.byteLength);
  const what = expected === 'vault' ? 'vault' : 'backup';
  if (buf.length < HEADER_BYTES) throw corrupt(`the ${what} file is truncated (${buf.length} bytes, shorter than its ${HEADER_BYTES}-byte header)`);
  if (!buf.subarray(0, 8).equals(MAGIC)) throw corrupt(`not a Phantoma ${what} file (bad magic)`);
  if (buf[8] !== FORMAT_VERSION) throw corrupt(`unsupported ${what} format version ${buf[8]}`);
  const kindByte = buf[9];
  if (kindByte !== KIND[expected]) throw corrupt(kindByte === KIND.vault || kindByte === KIND.backup ? `this file is a ${kindByte === KIND.vault ? 'vault' : 'backup'}, not a ${what}` : `unknown file kind ${kindByte}`);
  const sum = createHash('sha256').update(buf.subarray(0, 64)).digest().subarray(0, 16);
  if (!timingSafeEqual(sum, buf.subarray(64, 80))) throw corrupt(`the ${what} header is damaged (checksum mismatch)`);
  if (buf[14] !== 0 || buf[15] !== 0) throw corrupt(`the ${what} header has non-zero reserved bytes`);
  const kdf = buf[10]!;
  const params = { log2N: buf[11]!, r: buf[12]!, p: buf[13]! };
  if (kdf === KDF_SCRYPT) {
    const problem = checkScryptParams(params);
    if (problem) throw new PhantomaError(ERRORS.VAULT_KDF_REFUSED, `refusing the ${what}'s KDF parameters before deriving: ${problem}`);
  } else if (kdf === KDF_KEYFILE) {
    if (params.log2N || params.r || params.p) throw corrupt(`the ${what} header has scrypt parameters for the key-file KDF`);
  } else {
    throw corrupt(`unknown KDF id ${kdf}`);
  }
  const bodyLength = buf.readUInt32BE(60);
  if (bodyLength < TAG_BYTES || bodyLength > MAX_BODY_BYTES) throw corrupt(`the ${what} header declares an impossible body length ${bodyLength}`);
  if (buf.length < HEADER_BYTES + bodyLength) throw corrupt(`the ${what} file is truncated (${buf.length - HEADER_BYTES} of ${bodyLength} body bytes)`);
  if (buf.length > HEADER_BYTES + bodyLength) throw corrupt(`the ${what} file has ${buf.length - HEADER_BYTES - bodyLength} unexpected trailing bytes`);
  return { kind: expected, kdf, params, salt: Buffer.from(buf.subarray(16, 32)), kcv: Buffer.from(buf.subarray(32, 48)), nonce: Buffer.from(buf.subarray(48, 60)), bodyLength };
}

/**
 * Opens a sealed file; returns the plaintext and the derived keys (for re-sealing without a KDF run).
 * `with` is a credential, or keys derived before from this file's salt and parameters (keyd re-reading
 * the vault after a rotation; refused as vault_passphrase_wrong if the file was re-keyed since).
 */
export function openFile(file: Uint8Array, expected: FileKind, using: Credential | SealKeys): { plaintext: Buffer; keys: SealKeys } {
  const h = parseHeader(file, expected);
  const want = h.kdf === KDF_SCRYPT ? 'passphrase' : 'keyfile';
  let keys: SealKeys;
  if ('aeadKey' in using) {
    const p = using.params;
    if (using.kdf !== h.kdf || !using.salt.equals(h.salt) || p.log2N !== h.params.log2N || p.r !== h.params.r || p.p !== h.params.p) {
      throw new PhantomaError(ERRORS.VAULT_PASSPHRASE_WRONG, `the ${expected} was re-sealed under another credential since it was opened`);
    }
    keys = using;
  } else {
    if (using.kind !== want) {
      throw new PhantomaError(ERRORS.VAULT_PASSPHRASE_WRONG, `this ${expected} is sealed with a ${want === 'passphrase' ? 'passphrase' : 'key file'}, but a ${using.kind === 'passphrase' ? 'passphrase' : 'key file'} was given`);
    }
    keys = deriveKeys(using, h.salt, h.params);
  }
  if (!timingSafeEqual(keys.kcv, h.kcv)) {
    throw new PhantomaError(ERRORS.VAULT_PASSPHRASE_WRONG, `the ${want === 'passphrase' ? 'passphrase' : 'key file'} does not open this ${expected} (key-check value mismatch); nothing was changed`);
  }
  const buf = Buffer.from(file.buffer, file.byteOffset, file.byteLength);
  const body = buf.subarray(HEADER_BYTES);
  const decipher = createDecipheriv('aes-256-gcm', keys.aeadKey, h.nonce);
  decipher.setAAD(buf.subarray(0, HEADER_BYTES));
  decipher.setAuthTag(body.subarray(body.length - TAG_BYTES));
  try {
    const plaintext = Buffer.concat([decipher.update(body.subarray(0, body.length - TAG_BYTES)), decipher.final()]);
    return { plaintext, keys };
  } catch {
    throw corrupt(`the ${expected} failed authentication (damaged or altered body); it was not changed`);
  }
}
