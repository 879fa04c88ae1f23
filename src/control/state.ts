// The node's control-plane state: where the control plane is, the key it pinned, this node's enrolment,
// the last heartbeat counter used and the last lease received (re-verified on every read).
// `<stateDir>/control/state.json`, replaced atomically. A node restored without it re-enrols with a new token.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Type, type Static } from '@sinclair/typebox';
import { TypeCompiler } from '@sinclair/typebox/compiler';
import { writeFileAtomic } from '../util/atomic-file.ts';
import { PhantomaError, ERRORS } from '../errors.ts';
import { SignedLease, DOMAIN, verifySignature, keyFingerprint, schemaProblem } from './protocol.ts';

export const ControlState = Type.Object(
  {
    format: Type.Literal(1),
    url: Type.String({ pattern: '^https://', maxLength: 300 }),
    pin: Type.String({ pattern: '^sha256:[0-9a-f]{64}$' }),
    node: Type.String({ maxLength: 63 }),
    enrolment: Type.String({ maxLength: 64 }),
    /** The last counter put into a heartbeat (saved before it is sent, so none is ever reused). */
    counter: Type.Integer({ minimum: 0 }),
    lease: SignedLease,
    leaseReceivedAt: Type.String({ maxLength: 32 }),
  },
  { additionalProperties: false },
);
export type ControlState = Static<typeof ControlState>;
const checkState = TypeCompiler.Compile(ControlState);

export function controlDirOf(stateDir: string): string {
  return join(stateDir, 'control');
}

export function statePathOf(stateDir: string): string {
  return join(controlDirOf(stateDir), 'state.json');
}

/** The pinned key's raw bytes are not stored: the pin is its hash, and a lease is checked against both. */
export function leaseSignedByPin(state: Pick<ControlState, 'lease' | 'pin'>, controlPlaneKey: Buffer): boolean {
  return keyFingerprint(controlPlaneKey) === state.pin && verifySignature(controlPlaneKey, DOMAIN.lease, state.lease.lease, state.lease.signature);
}

export interface StoredState extends ControlState {
  /** Raw lease key of the control plane, kept beside the state (public). */
  controlPlaneKey: string;
}

/** Reads and re-verifies the state; undefined when the node was never enrolled. */
export function readControlState(stateDir: string): (ControlState & { controlPlaneKey: Buffer }) | undefined {
  const path = statePathOf(stateDir);
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new PhantomaError(ERRORS.STATE_FILE_INVALID, `cannot read ${path}: ${(err as NodeJS.ErrnoException).code}`);
  }
  let value: Record<string, unknown>;
  try {
    value = JSON.parse(text) as Record<string, unknown>;
  } catch {
    throw new PhantomaError(ERRORS.STATE_FILE_INVALID, `${path} is not valid JSON`);
  }
  const { controlPlaneKey, ...rest } = value;
  const problem = schemaProblem(checkState, rest);
  const key = typeof controlPlaneKey === 'string' ? Buffer.from(controlPlaneKey, 'base64url') : Buffer.alloc(0);
  if (problem || key.length !== 32) throw new PhantomaError(ERRORS.STATE_FILE_INVALID, `${path} is damaged: ${problem ?? 'controlPlaneKey is missing'}`);
  const state = rest as ControlState;
  if (!leaseSignedByPin(state, key)) throw new PhantomaError(ERRORS.STATE_FILE_INVALID, `${path}: the stored lease is not signed by the pinned control plane key`);
  return { ...state, controlPlaneKey: key };
}

export function writeControlState(stateDir: string, state: ControlState, controlPlaneKey: Buffer): void {
  const stored: StoredState = { ...state, controlPlaneKey: controlPlaneKey.toString('base64url') };
  writeFileAtomic(statePathOf(stateDir), JSON.stringify(stored, null, 2) + '\n', 0o600);
}
