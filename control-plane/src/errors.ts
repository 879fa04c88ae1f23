// Every error the control plane reports, with a stable code (prefix `cp_`), HTTP status and CLI exit status.
// Nodes branch on `code` (src/control/ maps it to the node's control_plane_refused); control-plane/README.md
// documents each code and a test keeps the two in step.

export interface CpErrorDefinition {
  readonly code: string;
  readonly status: number;
  readonly exit: number;
}

function def(code: string, status: number, exit: number): CpErrorDefinition {
  return Object.freeze({ code, status, exit });
}

export const CP_ERRORS = Object.freeze({
  CONFIG_INVALID: def('cp_config_invalid', 500, 2),
  USAGE: def('cp_usage', 400, 2),
  // request shape
  BODY_TOO_LARGE: def('cp_body_too_large', 413, 2),
  INVALID_JSON: def('cp_invalid_json', 400, 2),
  UNSUPPORTED_MEDIA_TYPE: def('cp_unsupported_media_type', 415, 2),
  SCHEMA_VIOLATION: def('cp_schema_violation', 400, 2),
  NOT_FOUND: def('cp_not_found', 404, 2),
  // enrolment
  TOKEN_UNKNOWN: def('cp_token_unknown', 401, 4),
  TOKEN_USED: def('cp_token_used', 401, 4),
  TOKEN_EXPIRED: def('cp_token_expired', 401, 4),
  // heartbeats
  BAD_SIGNATURE: def('cp_bad_signature', 401, 4),
  NODE_UNKNOWN: def('cp_node_unknown', 404, 4),
  NODE_REVOKED: def('cp_node_revoked', 403, 4),
  ENROLMENT_SUPERSEDED: def('cp_enrolment_superseded', 409, 4),
  COUNTER_STALE: def('cp_counter_stale', 409, 4),
  CLOCK_SKEW: def('cp_clock_skew', 400, 4),
  // administration
  NODE_NAME_INVALID: def('cp_node_name_invalid', 400, 2),
  // the service itself
  KEY_EXISTS: def('cp_key_exists', 409, 9),
  KEY_UNREADABLE: def('cp_key_unreadable', 500, 9),
  DATABASE_FAILED: def('cp_database_failed', 503, 5),
  ADMIN_UNREACHABLE: def('cp_admin_unreachable', 503, 6),
  INTERNAL: def('cp_internal', 500, 1),
});

export class CpError extends Error {
  readonly code: string;
  readonly status: number;
  readonly exit: number;
  readonly details: Readonly<Record<string, unknown>> | undefined;
  constructor(definition: CpErrorDefinition, message: string, options?: { cause?: unknown; details?: Record<string, unknown> }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'CpError';
    this.code = definition.code;
    this.status = definition.status;
    this.exit = definition.exit;
    this.details = options?.details ? Object.freeze({ ...options.details }) : undefined;
  }
}

export function isCpError(err: unknown): err is CpError {
  return err instanceof CpError;
}
