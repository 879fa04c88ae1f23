// The closed set of audit events and their fields. This table is the whole vocabulary of the audit log:
// `append` refuses a type that is not here, a field that is not listed for its type, and a value that does
// not fit its kind. There is deliberately no free-text kind — ids, codes, counts, durations and outcomes
// only — so no caller can put a prompt, an answer or a header into the log by accident. Adding an event or
// a field is a reviewed change to this file (and to src/audit/README.md).

/**
 * - `id`: a short token of letters, digits and `_.:-` (`_` because error codes are snake_case), 1..max chars
 * - `route`: like `id` but may contain `/`; pass the route *template* (`/v1/chat/completions`), never the
 *   URL a client asked for
 * - `int`: a non-negative safe integer;  `number`: a finite non-negative number;  `boolean`
 */
export type FieldKind = 'id' | 'route' | 'int' | 'number' | 'boolean';

export interface FieldSpec {
  readonly kind: FieldKind;
  readonly optional?: boolean;
  /** Maximum string length (id and route kinds). */
  readonly max?: number;
}

export const ID_MAX = 128;

const id = { kind: 'id' } as const;
const int = { kind: 'int' } as const;
const num = { kind: 'number' } as const;
const bool = { kind: 'boolean' } as const;

export const AUDIT_EVENTS = {
  node_started: { version: { kind: 'id', max: 64 }, pid: int },
  node_stopped: { reason: { kind: 'id', max: 64 } },
  worker_spawned: { workerId: id, model: id, backend: { kind: 'id', max: 32 } },
  worker_ended: { workerId: id, outcome: { kind: 'id', max: 32 }, verified: bool, endMs: num },
  end_verification: { workerId: id, verified: bool, ms: num, detail: { kind: 'id', optional: true } },
  request_served: {
    requestId: id,
    model: id,
    durationMs: num,
    promptTokens: int,
    completionTokens: int,
    outcome: { kind: 'id', max: 32 },
    code: { kind: 'id', max: 64, optional: true },
  },
  refusal: { requestId: { kind: 'id', optional: true }, code: { kind: 'id', max: 64 }, route: { kind: 'route', optional: true } },
  // egress filter (issue 9): a refused connection or packet (destination metadata only), and each change of
  // the node's verified state with the policy hash it verified
  egress_denied: {
    set: { kind: 'id', max: 16 },
    hook: { kind: 'id', max: 16 },
    pid: int,
    cgroupId: int,
    proto: { kind: 'id', max: 16 },
    dst: { kind: 'id', max: 64 },
    port: int,
    probe: bool,
  },
  egress_state: { verified: bool, policyHash: { kind: 'id', max: 64 }, code: { kind: 'id', max: 64, optional: true } },
  // maintenance windows (issue 10): who opened one, what it allows (proto:addr/bits:port joined by "-"), until
  // when (epoch ms); each closing with its reason (manual, expired, expired_at_start, stray_entries)
  egress_window_opened: { windowId: { kind: 'id', max: 32 }, by: { kind: 'id', max: 64 }, untilMs: int, allow: { kind: 'route', max: 1024 } },
  egress_window_closed: { windowId: { kind: 'id', max: 32 }, reason: { kind: 'id', max: 32 }, entries: int },
  // pulled models (issue 10): the gateway started or stopped serving a model of its model directory
  model_added: { model: id, sha256: { kind: 'id', max: 64 }, bytes: int },
  model_removed: { model: id },
  // a ptrace / process_vm_readv / process_vm_writev call aimed at a worker or the gateway (detected, not prevented)
  ptrace_detected: { kind: { kind: 'id', max: 32 }, request: int, pid: int, callerCgroupId: int, target: int, targetIs: { kind: 'id', max: 16 } },
  // keyd (issue 7): a refused caller (not a worker, a second decapsulation, not the gateway, an unknown or
  // expired request key) and each worker's one decapsulation
  keyd_refusal: { op: { kind: 'id', max: 32 }, code: { kind: 'id', max: 64 }, reason: { kind: 'id', max: 32 }, uid: int, workerId: { kind: 'id', optional: true } },
  keyd_decapsulated: { workerId: id, keyId: { kind: 'id', max: 16 }, op: { kind: 'id', max: 16 } },
  // signed updates (issue 12): a release verified and switched to (trial started), refused (the code names
  // the check), its trial's outcome, and a manual rollback
  update_installed: { version: { kind: 'id', max: 32 }, slot: { kind: 'id', max: 1 }, signers: int },
  update_refused: { code: { kind: 'id', max: 64 }, version: { kind: 'id', max: 32, optional: true } },
  update_trial: { version: { kind: 'id', max: 32 }, slot: { kind: 'id', max: 1 }, passed: bool, ms: num },
  update_rolled_back: { from: { kind: 'id', max: 32 }, to: { kind: 'id', max: 32 }, manual: bool },
} as const satisfies Record<string, Record<string, FieldSpec>>;

export type AuditEventType = keyof typeof AUDIT_EVENTS;

/** Names every entry has; no event may use them as a field. */
export const ENTRY_FIELDS = ['seq', 'time', 'type', 'prev', 'hash'] as const;

type ValueOf<F> = F extends { kind: 'int' | 'number' } ? number : F extends { kind: 'boolean' } ? boolean : string;
type Fields<S> = { -readonly [K in keyof S as S[K] extends { optional: true } ? never : K]: ValueOf<S[K]> } & {
  -readonly [K in keyof S as S[K] extends { optional: true } ? K : never]?: ValueOf<S[K]> | undefined;
};
type Flatten<T> = { [K in keyof T]: T[K] };

/** One event as a caller hands it to `append`: `{ type, ...fields }`. */
export type AuditEvent = { [T in AuditEventType]: Flatten<{ type: T } & Fields<(typeof AUDIT_EVENTS)[T]>> }[AuditEventType];

const ID_RE = /^[A-Za-z0-9_.:-]+$/;
const ROUTE_RE = /^[A-Za-z0-9_.:/-]+$/;

export function isAuditEventType(type: unknown): type is AuditEventType {
  return typeof type === 'string' && Object.hasOwn(AUDIT_EVENTS, type);
}

/**
 * Checks an event against the table. Returns the problem (naming the type and field, never the value,
 * which might be exactly the content we refuse to record) or undefined when the event is acceptable.
 * On success `fields` receives the event's fields in table order, with absent optional fields omitted.
 */
export function checkAuditEvent(event: unknown, fields: Array<[string, string | number | boolean]>): string | undefined {
  if (event === null || typeof event !== 'object' || Array.isArray(event)) return 'an audit event must be an object';
  const record = event as Record<string, unknown>;
  const type = record.type;
  if (!isAuditEventType(type)) {
    return typeof type === 'string' && ID_RE.test(type) && type.length <= 64 ? `unknown audit event type "${type}"` : 'unknown audit event type';
  }
  const schema = AUDIT_EVENTS[type] as Record<string, FieldSpec>;
  for (const key of Object.keys(record)) {
    if (key === 'type') continue;
    if (!Object.hasOwn(schema, key)) {
      const shown = /^[A-Za-z0-9_]{1,64}$/.test(key) ? `"${key}"` : '(unprintable name)';
      return `audit event ${type} has no field ${shown}; the schema is closed (src/audit/audit-events.ts)`;
    }
  }
  for (const [name, spec] of Object.entries(schema)) {
    const value = record[name];
    if (value === undefined) {
      if (spec.optional) continue;
      return `audit event ${type} is missing required field ${name}`;
    }
    switch (spec.kind) {
      case 'id':
      case 'route': {
        const max = spec.max ?? ID_MAX;
        const re = spec.kind === 'id' ? ID_RE : ROUTE_RE;
        if (typeof value !== 'string' || value.length === 0 || value.length > max || !re.test(value)) {
          return `field ${name} of audit event ${type} must be 1-${max} characters of ${spec.kind === 'id' ? '[A-Za-z0-9_.:-]' : '[A-Za-z0-9_.:/-]'}`;
        }
        break;
      }
      case 'int':
        if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) return `field ${name} of audit event ${type} must be a non-negative integer`;
        break;
      case 'number':
        if (typeof value !== 'number' || !Number.isFinite(value) || value < 0) return `field ${name} of audit event ${type} must be a finite non-negative number`;
        break;
      case 'boolean':
        if (typeof value !== 'boolean') return `field ${name} of audit event ${type} must be a boolean`;
        break;
    }
    fields.push([name, value as string | number | boolean]);
  }
  return undefined;
}
