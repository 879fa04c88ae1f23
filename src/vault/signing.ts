// What the identity key signs, and how a client checks it. Pure functions.
//
// Every signature is Ed25519 over  "phantoma/<purpose>/v1\n" ‖ payload,  so a signature made for one
// purpose (a receipt, a heartbeat, the key document) can never be passed off as another.
//
// Canonical JSON (the key document's payload): objects with keys sorted by UTF-16 code unit order,
// no whitespace, strings as JSON.stringify writes them, numbers only as safe integers, no null inside
// arrays; i.e. the output of canonicalJson() below. The served document carries exactly these bytes.
import { createHash, sign as edSign, verify as edVerify, type KeyObject } from 'node:crypto';
import { ERRORS, PhantomaError } from '../errors.ts';
import { ed25519PublicKeyObject, identityFingerprint } from './contents.ts';

export const SIGN_PURPOSES = ['receipt', 'heartbeat', 'key-document'] as const;
export type SignPurpose = (typeof SIGN_PURPOSES)[number];

export function signingInput(purpose: SignPurpose, payload: Uint8Array): Buffer {
  return Buffer.concat([Buffer.from(`phantoma/${purpose}/v1\n`), payload]);
}

export function signPayload(identity: KeyObject, purpose: SignPurpose, payload: Uint8Array): Buffer {
  return edSign(null, signingInput(purpose, payload), identity);
}

export function verifyPayload(identityPublic: KeyObject, purpose: SignPurpose, payload: Uint8Array, signature: Uint8Array): boolean {
  return signature.length === 64 && edVerify(null, signingInput(purpose, payload), identityPublic, signature);
}

export function canonicalJson(value: unknown): string {
  if (value === null || typeof value === 'boolean') return JSON.stringify(value);
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'number') {
    if (!Number.isSafeInteger(value)) throw new RangeError('canonical JSON allows safe integers only');
    return String(value);
  }
  if (Array.isArray(value)) return `[${value.map((v) => canonicalJson(v)).join(',')}]`;
  if (typeof value === 'object') {
    const o = value as Record<string, unknown>;
    const keys = Object.keys(o).filter((k) => o[k] !== undefined).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonicalJson(o[k])}`).join(',')}}`;
  }
  throw new TypeError(`canonical JSON cannot encode ${typeof value}`);
}

export interface KeyDocumentRequestKey {
  id: string;
  x25519: string;
  mlkem768: string;
  notBefore: string;
  notAfter: string;
}

export interface KeyDocument {
  type: 'phantoma-key-document';
  version: 1;
  identityPublicKey: string;
  issuedAt: string;
  releaseVersion: string;
  /** SHA-256 of the egress policy; a placeholder until the egress issue fills it in. */
  egressPolicyHash: string;
  /** SHA-256 fingerprint of the TLS certificate (colon hex), or "" when the node serves without TLS. */
  tlsCertificateSha256: string;
  requestKeys: KeyDocumentRequestKey[];
}

/** The exact bytes served at /.well-known/phantoma/keys. */
export function encodeSignedKeyDocument(doc: KeyDocument, signature: Uint8Array): string {
  return `{"document":${canonicalJson(doc)},"signature":${JSON.stringify(Buffer.from(signature).toString('base64'))}}`;
}

const B64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
const ISO = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

/** Strict base64: the only spelling of its bytes (so no two strings decode alike). */
function strictB64(s: unknown, bytes?: number): Buffer | undefined {
  if (typeof s !== 'string' || !B64.test(s)) return undefined;
  const b = Buffer.from(s, 'base64');
  if (b.toString('base64') !== s || (bytes !== undefined && b.length !== bytes)) return undefined;
  return b;
}

/**
 * Client side: checks a served key document against the pinned identity fingerprint and returns it.
 * Throws key_document_invalid for anything else: bad JSON, an unexpected field, a different identity, a
 * signature that does not verify over the canonical bytes.
 */
export function verifyKeyDocument(served: string | Uint8Array, pinnedIdentity: string): KeyDocument {
  const bad = (why: string): PhantomaError => new PhantomaError(ERRORS.KEY_DOCUMENT_INVALID, `the key document does not verify: ${why}`);
  let parsed: unknown;
  try {
    parsed = JSON.parse(typeof served === 'string' ? served : Buffer.from(served).toString('utf8'));
  } catch {
    throw bad('not JSON');
  }
  const outer = parsed as { document?: unknown; signature?: unknown };
  if (!outer || typeof outer !== 'object' || Object.keys(outer).sort().join() !== 'document,signature') throw bad('not {document, signature}');
  const d = outer.document as KeyDocument;
  const fields = 'egressPolicyHash,identityPublicKey,issuedAt,releaseVersion,requestKeys,tlsCertificateSha256,type,version';
  if (!d || typeof d !== 'object' || Object.keys(d).sort().join() !== fields) throw bad('unexpected fields');
  if (d.type !== 'phantoma-key-document' || d.version !== 1) throw bad('unknown type or version');
  if (typeof d.issuedAt !== 'string' || !ISO.test(d.issuedAt) || typeof d.releaseVersion !== 'string' || typeof d.egressPolicyHash !== 'string' || typeof d.tlsCertificateSha256 !== 'string') throw bad('a field has the wrong type');
  if (!Array.isArray(d.requestKeys) || d.requestKeys.length === 0) throw bad('no request keys');
  for (const k of d.requestKeys) {
    if (!k || typeof k !== 'object' || Object.keys(k).sort().join() !== 'id,mlkem768,notAfter,notBefore,x25519') throw bad('a request key has unexpected fields');
    if (!/^[0-9a-f]{16}$/.test(k.id) || !strictB64(k.x25519, 32) || !strictB64(k.mlkem768, 1184) || !ISO.test(k.notBefore) || !ISO.test(k.notAfter)) throw bad(`request key ${String(k.id).slice(0, 16)} is malformed`);
  }
  const idRaw = strictB64(d.identityPublicKey, 32);
  if (!idRaw) throw bad('the identity key is malformed');
  if (identityFingerprint(idRaw) !== pinnedIdentity) throw bad('signed by a different identity than the pinned one');
  const sig = strictB64(outer.signature, 64);
  if (!sig || !verifyPayload(ed25519PublicKeyObject(idRaw), 'key-document', Buffer.from(canonicalJson(d)), sig)) throw bad('the signature does not verify');
  return d;
}

/** SHA-256 hex of bytes; the placeholder egress policy hash is this over the empty string. */
export function sha256Hex(b: Uint8Array | string): string {
  return createHash('sha256').update(b).digest('hex');
}
