// The node ↔ control-plane wire protocol, imported by both sides (the node in src/control/, the service in
// control-plane/src/). Pure: schemas, canonical signing bytes, Ed25519 sign/verify. docs/licensing.md
// describes the messages; every schema is closed (no unknown fields) and every string and number bounded.
//
// Signatures: Ed25519 over  `<domain>\n` ‖ canonicalJson(object)  where canonicalJson is the audit log's
// encoding (object keys sorted at every level, no whitespace, JSON.stringify for scalars, UTF-8). The
// node's domain is keyd's heartbeat purpose, `phantoma/heartbeat/v1` (src/vault/signing.ts), so keyd signs
// heartbeats without knowing their shape; the enrolment claim is signed under the same purpose and is kept
// apart from a heartbeat by its closed schema (no object satisfies both). Leases use `phantoma/lease/v1`.
import { createHash, createPublicKey, sign as edSign, verify as edVerify, type KeyObject } from 'node:crypto';
import { Type, type Static, type TSchema } from '@sinclair/typebox';
import { TypeCompiler, type TypeCheck } from '@sinclair/typebox/compiler';
import { canonicalJson } from '../audit/audit-log.ts';

export { canonicalJson };

export const PROTOCOL_VERSION = 1;
export const DOMAIN = Object.freeze({
  heartbeat: 'phantoma/heartbeat/v1',
  enrol: 'phantoma/heartbeat/v1',
  lease: 'phantoma/lease/v1',
});
/** Largest request body the control plane reads (enrolment or heartbeat); the default body limit. */
export const MAX_REQUEST_BYTES = 4096;
/** Largest response body the node reads from the control plane. */
export const MAX_RESPONSE_BYTES = 16384;

const B64URL_32 = '^[A-Za-z0-9_-]{43}$';
const B64URL_64 = '^[A-Za-z0-9_-]{86}$';
export const NODE_NAME_PATTERN = '^[a-z0-9][a-z0-9-]{0,62}$';
export const NODE_NAME_RE = new RegExp(NODE_NAME_PATTERN);
const ISO_TIME = '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,3})?Z$';
const Count = Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER });
const Time = Type.String({ pattern: ISO_TIME, maxLength: 24 });
const NodeName = Type.String({ pattern: NODE_NAME_PATTERN });
const EnrolmentId = Type.String({ pattern: '^[A-Za-z0-9_-]{22}$' });
const Version = Type.String({ pattern: '^[0-9A-Za-z.+-]{1,32}$' });
const Signature = Type.String({ pattern: B64URL_64 });
export const TOKEN_PATTERN = '^phcp_[A-Za-z0-9_-]{43}$';

/** What a node reports: coarse counters only — never a prompt, an answer, a client identity or address. */
export const HeartbeatBody = Type.Object(
  {
    v: Type.Literal(PROTOCOL_VERSION),
    node: NodeName,
    enrolment: EnrolmentId,
    counter: Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER }),
    time: Time,
    version: Version,
    counters: Type.Object(
      { requests: Count, refusals: Count, wipes: Count, wipeFailures: Count, egressDenials: Count },
      { additionalProperties: false },
    ),
    pool: Type.Object(
      { workers: Type.Integer({ minimum: 0, maximum: 4096 }), busy: Type.Integer({ minimum: 0, maximum: 4096 }), ready: Type.Boolean() },
      { additionalProperties: false },
    ),
    /** The audit log's chain head, so the vendor can later prove a log was not truncated (src/audit/README.md). */
    auditHead: Type.Optional(Type.Object({ seq: Count, hash: Type.String({ pattern: '^[0-9a-f]{64}$' }) }, { additionalProperties: false })),
    /** The last signed-update outcome (issue 12, src/updates/slots.ts): a result, a version, a code — nothing else. */
    update: Type.Optional(
      Type.Object(
        {
          result: Type.Union([Type.Literal('installed'), Type.Literal('rolled_back'), Type.Literal('refused'), Type.Literal('manual_rollback')]),
          version: Version,
          code: Type.Optional(Type.String({ pattern: '^[a-z][a-z0-9_]{1,63}$' })),
          at: Time,
        },
        { additionalProperties: false },
      ),
    ),
  },
  { additionalProperties: false },
);
export type HeartbeatBody = Static<typeof HeartbeatBody>;

export const HeartbeatRequest = Type.Object({ heartbeat: HeartbeatBody, signature: Signature }, { additionalProperties: false });
export type HeartbeatRequest = Static<typeof HeartbeatRequest>;

/** Signed by the node's identity key: proves it holds the key it enrols. The token itself is sent beside it. */
export const EnrolClaim = Type.Object(
  {
    v: Type.Literal(PROTOCOL_VERSION),
    tokenSha256: Type.String({ pattern: '^[0-9a-f]{64}$' }),
    publicKey: Type.String({ pattern: B64URL_32 }),
    time: Time,
    version: Version,
  },
  { additionalProperties: false },
);
export type EnrolClaim = Static<typeof EnrolClaim>;

export const EnrolRequest = Type.Object(
  { token: Type.String({ pattern: TOKEN_PATTERN }), claim: EnrolClaim, signature: Signature },
  { additionalProperties: false },
);
export type EnrolRequest = Static<typeof EnrolRequest>;

export const Plan = Type.Object(
  {
    name: Type.String({ pattern: '^[A-Za-z0-9._-]{1,32}$' }),
    maxModels: Type.Integer({ minimum: 0, maximum: 1024 }),
    maxWorkers: Type.Integer({ minimum: 0, maximum: 65536 }),
  },
  { additionalProperties: false },
);

/** The control plane's answer, signed with its lease key (the key the node pinned at enrolment). */
export const Lease = Type.Object(
  {
    v: Type.Literal(PROTOCOL_VERSION),
    node: NodeName,
    enrolment: EnrolmentId,
    status: Type.Union([Type.Literal('active'), Type.Literal('revoked')]),
    /** The heartbeat counter this lease answers (0 at enrolment): binds the answer to the request. */
    counter: Count,
    issuedAt: Time,
    notBefore: Time,
    expiresAt: Time,
    graceSeconds: Type.Integer({ minimum: 0, maximum: 90 * 86400 }),
    maxClockSkewSeconds: Type.Integer({ minimum: 0, maximum: 3600 }),
    heartbeatIntervalSeconds: Type.Integer({ minimum: 10, maximum: 86400 }),
    plan: Plan,
    newestRelease: Version,
  },
  { additionalProperties: false },
);
export type Lease = Static<typeof Lease>;

export const SignedLease = Type.Object({ lease: Lease, signature: Signature }, { additionalProperties: false });
export type SignedLease = Static<typeof SignedLease>;

/** Success body of POST /v1/enrol and POST /v1/heartbeat; a refused revoked node gets `lease` in its error body. */
export const LeaseResponse = Type.Object({ lease: SignedLease }, { additionalProperties: false });

function compiled<T extends TSchema>(schema: T): TypeCheck<T> {
  return TypeCompiler.Compile(schema);
}
export const checkHeartbeatRequest = compiled(HeartbeatRequest);
export const checkEnrolRequest = compiled(EnrolRequest);
export const checkSignedLease = compiled(SignedLease);

/** The first schema problem as a dotted path and a short reason; never echoes the value. */
export function schemaProblem<T extends TSchema>(check: TypeCheck<T>, value: unknown): string | undefined {
  const first = check.Errors(value).First();
  if (!first) return undefined;
  const path = first.path.replace(/^\//, '').replaceAll('/', '.') || 'body';
  return /additional/i.test(first.message) ? `${path}: unknown field (the schema is closed)` : `${path}: ${first.message}`;
}

/** What a node signer is handed: the canonical JSON; the signer prefixes its purpose (keyd's `sign`). */
export function canonicalBytes(value: unknown): Buffer {
  return Buffer.from(canonicalJson(value), 'utf8');
}

export function signingBytes(domain: string, value: unknown): Buffer {
  return Buffer.from(`${domain}\n${canonicalJson(value)}`, 'utf8');
}

export function sha256Hex(data: string | Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** "sha256:" + hex SHA-256 of a raw 32-byte Ed25519 public key (the same form as a node's identity fingerprint). */
export function keyFingerprint(rawPublicKey: Uint8Array): string {
  return 'sha256:' + sha256Hex(rawPublicKey);
}

export function normalisePin(pin: string): string {
  const hex = pin.trim().toLowerCase().replace(/^sha256:/, '').replace(/[^0-9a-f]/g, '');
  return `sha256:${hex}`;
}

export function ed25519PublicKey(raw: Uint8Array): KeyObject {
  if (raw.length !== 32) throw new RangeError(`an Ed25519 public key is 32 bytes, got ${raw.length}`);
  return createPublicKey({ key: { kty: 'OKP', crv: 'Ed25519', x: Buffer.from(raw).toString('base64url') }, format: 'jwk' });
}

export function rawPublicKeyOf(key: KeyObject): Buffer {
  return Buffer.from(key.export({ format: 'jwk' }).x!, 'base64url');
}

export function signWith(privateKey: KeyObject, domain: string, value: unknown): string {
  return edSign(null, signingBytes(domain, value), privateKey).toString('base64url');
}

export function verifySignature(publicKey: KeyObject | Uint8Array, domain: string, value: unknown, signature: string): boolean {
  const key = publicKey instanceof Uint8Array ? ed25519PublicKey(publicKey) : publicKey;
  const sig = Buffer.from(signature, 'base64url');
  if (sig.length !== 64) return false;
  try {
    return edVerify(null, signingBytes(domain, value), key, sig);
  } catch {
    return false;
  }
}
