// The node's side of the protocol: enrol once, then heartbeat. Each exchange is recorded in the ledger
// exactly as sent and as received; a lease is used only after it verifies against the pinned control plane
// key and matches this node, enrolment and counter. Signing goes through an injected signer (keyd on a
// running node; the vault's identity key opened by the CLI for `phantoma enroll`), never a key in here.
import { createPublicKey, sign as edSign, type KeyObject } from 'node:crypto';
import { PhantomaError, ERRORS } from '../errors.ts';
import {
  DOMAIN,
  PROTOCOL_VERSION,
  checkSignedLease,
  schemaProblem,
  sha256Hex,
  canonicalBytes,
  verifySignature,
  rawPublicKeyOf,
  normalisePin,
  type EnrolClaim,
  type HeartbeatBody,
  type SignedLease,
} from './protocol.ts';
import { createControlPlaneClient, type ControlPlaneClient, type ControlPlaneReply } from './client.ts';
import { createLedger, ledgerDirOf, type Ledger } from './ledger.ts';
import { readControlState, writeControlState, type ControlState } from './state.ts';

/**
 * The node identity key's signing capability: keyd on a running node (`keyd.sign('heartbeat', payload)`), or
 * the vault's key in the `phantoma enroll` process. `sign` signs  "phantoma/heartbeat/v1\n" ‖ payload.
 */
export interface NodeSigner {
  /** Raw 32-byte Ed25519 public key (needed for enrolment only). */
  publicKey: Buffer;
  sign(payload: Buffer): Promise<Buffer>;
}

export function signerFromPrivateKey(privateKey: KeyObject): NodeSigner {
  const publicKey = rawPublicKeyOf(createPublicKey(privateKey));
  const prefix = Buffer.from(`${DOMAIN.heartbeat}\n`);
  return { publicKey, sign: async (payload) => edSign(null, Buffer.concat([prefix, payload]), privateKey) };
}

/** keyd as the signer (the running gateway): the identity key stays in keyd. */
export function keydSigner(keyd: { sign(purpose: 'heartbeat', payload: Uint8Array): Promise<Buffer> }, publicKey: Buffer = Buffer.alloc(0)): NodeSigner {
  return { publicKey, sign: (payload) => keyd.sign('heartbeat', payload) };
}

export interface Snapshot {
  counters: HeartbeatBody['counters'];
  pool: HeartbeatBody['pool'];
  auditHead?: HeartbeatBody['auditHead'];
  update?: HeartbeatBody['update'];
}

export interface ExchangeDeps {
  stateDir: string;
  signer: NodeSigner;
  version: string;
  clock?: () => number;
  ledger?: Ledger;
  /** Replaces the HTTPS client (tests of lease verification). */
  client?: ControlPlaneClient;
}

/** Checks a lease: shape, signature by `controlPlaneKey`, and that it answers this node, enrolment and counter. */
export function verifyLease(value: unknown, controlPlaneKey: Buffer, expect: { node?: string; enrolment?: string; counter: number }, nowMs: number): SignedLease {
  const invalid = (why: string): PhantomaError => new PhantomaError(ERRORS.LEASE_INVALID, `the control plane's lease is refused: ${why}`);
  const problem = schemaProblem(checkSignedLease, value);
  if (problem) throw invalid(problem);
  const signed = value as SignedLease;
  if (!verifySignature(controlPlaneKey, DOMAIN.lease, signed.lease, signed.signature)) throw invalid('it is not signed by the pinned control plane key');
  const l = signed.lease;
  if (expect.node !== undefined && l.node !== expect.node) throw invalid(`it is for node ${l.node}, not ${expect.node}`);
  if (expect.enrolment !== undefined && l.enrolment !== expect.enrolment) throw invalid('it is for another enrolment');
  if (l.counter !== expect.counter) throw invalid(`it answers counter ${l.counter}, not ${expect.counter}`);
  if (Date.parse(l.notBefore) > nowMs + l.maxClockSkewSeconds * 1000) throw invalid(`it is not valid before ${l.notBefore} (check this node's clock)`);
  return signed;
}

function refused(reply: ControlPlaneReply): PhantomaError {
  let cpCode = 'unknown';
  let message = `HTTP ${reply.status}`;
  try {
    const e = (JSON.parse(reply.body) as { error?: { code?: unknown; message?: unknown } }).error;
    if (typeof e?.code === 'string' && /^[a-z0-9_]{1,64}$/.test(e.code)) cpCode = e.code;
    if (typeof e?.message === 'string') message = e.message.slice(0, 300);
  } catch {
    /* not JSON: the status says enough */
  }
  return new PhantomaError(ERRORS.CONTROL_PLANE_REFUSED, `the control plane refused: ${message} [${cpCode}]`, { details: { cpCode, status: reply.status } });
}

async function exchange(ledger: Ledger, client: ControlPlaneClient, url: string, kind: 'enrol' | 'heartbeat', body: string, recorded: string): Promise<ControlPlaneReply> {
  ledger.record([{ type: kind === 'enrol' ? 'enrol_sent' : 'heartbeat_sent', url, body: recorded }]);
  let reply: ControlPlaneReply;
  try {
    reply = await client.post(kind === 'enrol' ? '/v1/enrol' : '/v1/heartbeat', body);
  } catch (err) {
    ledger.record([{ type: 'exchange_failed', url, code: (err as PhantomaError).code ?? ERRORS.INTERNAL.code }]);
    throw err;
  }
  ledger.record([{ type: kind === 'enrol' ? 'enrol_received' : 'heartbeat_received', url, status: reply.status, body: reply.body }]);
  return reply;
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    throw new PhantomaError(ERRORS.LEASE_INVALID, "the control plane's answer is not JSON");
  }
}

/** `phantoma enroll`: sends the token (never stored) and the identity public key; stores the signed lease. */
export async function enrolNode(opts: ExchangeDeps & { url: string; pin: string; token: string }): Promise<ControlState> {
  const clock = opts.clock ?? Date.now;
  const url = new URL(opts.url).origin;
  const pin = normalisePin(opts.pin);
  const client = opts.client ?? createControlPlaneClient({ url, pin });
  const ledger = opts.ledger ?? createLedger({ dir: ledgerDirOf(opts.stateDir) });
  const token = opts.token.trim();
  if (!/^phcp_[A-Za-z0-9_-]{43}$/.test(token)) throw new PhantomaError(ERRORS.CLI_USAGE, 'that is not an enrolment token (phantoma-cp tokens create prints one: phcp_…)');
  const claim: EnrolClaim = { v: PROTOCOL_VERSION, tokenSha256: sha256Hex(token), publicKey: opts.signer.publicKey.toString('base64url'), time: new Date(clock()).toISOString(), version: opts.version };
  const signature = (await opts.signer.sign(canonicalBytes(claim))).toString('base64url');
  // The ledger gets the request without the token (its hash is in the claim): the token is never written down.
  const reply = await exchange(ledger, client, url, 'enrol', JSON.stringify({ token, claim, signature }), JSON.stringify({ claim, signature }));
  if (reply.status !== 200) throw refused(reply);
  const signed = verifyLease((parseJson(reply.body) as { lease?: unknown }).lease, reply.publicKey, { counter: 0 }, clock());
  if (signed.lease.status !== 'active') throw new PhantomaError(ERRORS.LEASE_INVALID, 'the enrolment answer is not an active lease');
  const state: ControlState = { format: 1, url, pin, node: signed.lease.node, enrolment: signed.lease.enrolment, counter: 0, lease: signed, leaseReceivedAt: new Date(clock()).toISOString() };
  writeControlState(opts.stateDir, state, reply.publicKey);
  return state;
}

/** One heartbeat: counter saved first, signed body sent, lease verified and stored. Throws with a code otherwise. */
export async function heartbeatOnce(opts: ExchangeDeps & { snapshot: () => Snapshot }): Promise<ControlState> {
  const clock = opts.clock ?? Date.now;
  const current = readControlState(opts.stateDir);
  if (!current) throw new PhantomaError(ERRORS.NOT_ENROLLED, 'this node is not enrolled: run phantoma enroll');
  const { controlPlaneKey, ...state } = current;
  const client = opts.client ?? createControlPlaneClient({ url: state.url, pin: state.pin });
  const ledger = opts.ledger ?? createLedger({ dir: ledgerDirOf(opts.stateDir) });
  const counter = state.counter + 1;
  // Saved before sending: a crash after sending must not make the next heartbeat reuse this counter.
  writeControlState(opts.stateDir, { ...state, counter }, controlPlaneKey);
  const snap = opts.snapshot();
  const heartbeat: HeartbeatBody = {
    v: PROTOCOL_VERSION,
    node: state.node,
    enrolment: state.enrolment,
    counter,
    time: new Date(clock()).toISOString(),
    version: opts.version,
    counters: snap.counters,
    pool: snap.pool,
    ...(snap.auditHead ? { auditHead: snap.auditHead } : {}),
    ...(snap.update ? { update: snap.update } : {}),
  };
  const signature = (await opts.signer.sign(canonicalBytes(heartbeat))).toString('base64url');
  const body = JSON.stringify({ heartbeat, signature });
  const reply = await exchange(ledger, client, state.url, 'heartbeat', body, body);
  const expect = { node: state.node, enrolment: state.enrolment, counter };
  if (reply.status === 200) {
    const signed = verifyLease((parseJson(reply.body) as { lease?: unknown }).lease, controlPlaneKey, expect, clock());
    if (signed.lease.status !== 'active') throw new PhantomaError(ERRORS.LEASE_INVALID, 'a successful heartbeat answer must carry an active lease');
    const next: ControlState = { ...state, counter, lease: signed, leaseReceivedAt: new Date(clock()).toISOString() };
    writeControlState(opts.stateDir, next, controlPlaneKey);
    return next;
  }
  const err = refused(reply);
  if (err.details?.cpCode === 'cp_node_revoked') {
    // A revocation is acted on only when it is signed by the pinned key and names this node and counter.
    const signed = verifyLease((parseJson(reply.body) as { lease?: unknown }).lease, controlPlaneKey, expect, clock());
    if (signed.lease.status === 'revoked') {
      writeControlState(opts.stateDir, { ...state, counter, lease: signed, leaseReceivedAt: new Date(clock()).toISOString() }, controlPlaneKey);
      throw new PhantomaError(ERRORS.LICENSE_REVOKED, `the control plane revoked node ${state.node}`);
    }
  }
  throw err;
}
