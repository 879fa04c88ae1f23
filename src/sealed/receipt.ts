// The receipt of a sealed request: after the worker's end, keyd signs what happened to it with the node's
// identity key (purpose "receipt", src/vault/signing.ts), and the gateway sends it as the final event.
// The client verifies it against the identity it pinned, and that it names the envelope it sent.
import { createHash, type KeyObject } from 'node:crypto';
import { canonicalJson, verifyPayload } from '../vault/signing.ts';
import { ERRORS, PhantomaError } from '../errors.ts';

export interface Receipt {
  type: 'phantoma-receipt';
  version: 1;
  /** SHA-256 of the exact envelope bytes the client sent, hex. */
  envelopeSha256: string;
  requestId: string;
  /** ok, error (the sealed answer ended in an error event), timeout, client_closed, worker_failed, out_of_memory. */
  outcome: string;
  /** The worker process was killed (always true once a receipt exists: it is written after the end). */
  workerEnded: true;
  /** The warden verified the end: cgroup killed, empty and removed (with it the tmpfs and namespaces). */
  wipeVerified: boolean;
  /** How long the end and its verification took, in microseconds (integers only in canonical JSON). */
  wipeMicros: number;
  egressPolicyHash: string;
  releaseVersion: string;
  /** ISO time the receipt was made. */
  time: string;
}

export interface SignedReceipt {
  receipt: Receipt;
  /** Ed25519 by the identity key over the canonical JSON of `receipt`, base64. */
  signature: string;
}

export function envelopeSha256(envelope: Uint8Array): string {
  return createHash('sha256').update(envelope).digest('hex');
}

export function receiptPayload(r: Receipt): Buffer {
  return Buffer.from(canonicalJson(r), 'utf8');
}

/** Client side: the receipt is the node's (pinned identity) and about this envelope; throws receipt_invalid. */
export function verifyReceipt(signed: unknown, identity: KeyObject, envelope: Uint8Array): Receipt {
  const s = signed as Partial<SignedReceipt> | null;
  const r = s?.receipt;
  const bad = (why: string): never => {
    throw new PhantomaError(ERRORS.RECEIPT_INVALID, `the receipt is not valid: ${why}`);
  };
  if (!r || typeof r !== 'object' || typeof s?.signature !== 'string') return bad('missing receipt or signature');
  if (r.type !== 'phantoma-receipt' || r.version !== 1) return bad('unknown receipt type or version');
  let payload: Buffer;
  try {
    payload = receiptPayload(r);
  } catch {
    return bad('not canonical JSON');
  }
  if (!verifyPayload(identity, 'receipt', payload, Buffer.from(s.signature, 'base64'))) return bad("the signature does not verify against the node's identity key");
  if (r.envelopeSha256 !== envelopeSha256(envelope)) return bad('it names another envelope');
  return r;
}
