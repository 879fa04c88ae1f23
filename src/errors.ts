// Every error Phantoma reports, with a stable machine-readable code, its HTTP status and OpenAI error type.
// Clients and scripts branch on `code`; messages may change, codes may not. docs/errors.md documents each
// code (a test enforces it), and the CLI maps `exit` to its exit status.

export interface ErrorDefinition {
  readonly code: string;
  readonly status: number;
  /** OpenAI's error `type` field, so existing clients classify our errors correctly. */
  readonly type: 'invalid_request_error' | 'authentication_error' | 'rate_limit_error' | 'server_error' | 'not_found_error';
  /** CLI exit status when this error ends a command. */
  readonly exit: number;
}

function def(code: string, status: number, type: ErrorDefinition['type'], exit: number): ErrorDefinition {
  return Object.freeze({ code, status, type, exit });
}

/** The catalogue. Add new codes here only, and document them in docs/errors.md. */
export const ERRORS = Object.freeze({
  // configuration and command line
  CONFIG_INVALID: def('config_invalid', 500, 'server_error', 2),
  CONFIG_UNREADABLE: def('config_unreadable', 500, 'server_error', 2),
  CLI_USAGE: def('cli_usage', 400, 'invalid_request_error', 2),
  RUNTIME_UNSUPPORTED: def('runtime_unsupported', 500, 'server_error', 2),
  // models
  MODEL_NOT_FOUND: def('model_not_found', 404, 'not_found_error', 3),
  MODEL_FILE_INVALID: def('model_file_invalid', 500, 'server_error', 3),
  MODEL_DIGEST_MISMATCH: def('model_digest_mismatch', 500, 'server_error', 3),
  MODEL_LOAD_FAILED: def('model_load_failed', 500, 'server_error', 3),
  MEMORY_BUDGET_EXCEEDED: def('memory_budget_exceeded', 500, 'server_error', 2),
  // requests (gateway)
  INVALID_REQUEST: def('invalid_request', 400, 'invalid_request_error', 2),
  INVALID_JSON: def('invalid_json', 400, 'invalid_request_error', 2),
  UNSUPPORTED_MEDIA_TYPE: def('unsupported_media_type', 415, 'invalid_request_error', 2),
  REQUEST_TOO_LARGE: def('request_too_large', 413, 'invalid_request_error', 2),
  UNSUPPORTED_PARAMETER: def('unsupported_parameter', 400, 'invalid_request_error', 2),
  CONTEXT_LENGTH_EXCEEDED: def('context_length_exceeded', 400, 'invalid_request_error', 2),
  ROUTE_NOT_FOUND: def('not_found', 404, 'not_found_error', 2),
  INVALID_API_KEY: def('invalid_api_key', 401, 'authentication_error', 4),
  RATE_LIMITED: def('rate_limit_exceeded', 429, 'rate_limit_error', 4),
  CONCURRENCY_LIMITED: def('concurrency_limit_exceeded', 429, 'rate_limit_error', 4),
  QUEUE_FULL: def('queue_full', 503, 'server_error', 5),
  NOT_READY: def('not_ready', 503, 'server_error', 5),
  REQUEST_TIMEOUT: def('request_timeout', 504, 'server_error', 5),
  WORKER_FAILED: def('worker_failed', 502, 'server_error', 5),
  WORKER_OUT_OF_MEMORY: def('worker_out_of_memory', 502, 'server_error', 5),
  CLIENT_CLOSED: def('client_closed', 499, 'invalid_request_error', 5),
  // API keys and TLS
  API_KEY_NOT_FOUND: def('api_key_not_found', 404, 'not_found_error', 2),
  STATE_FILE_INVALID: def('state_file_invalid', 500, 'server_error', 1),
  TLS_SETUP_FAILED: def('tls_setup_failed', 500, 'server_error', 1),
  TLS_PIN_MISMATCH: def('tls_pin_mismatch', 502, 'server_error', 6),
  NODE_UNREACHABLE: def('node_unreachable', 502, 'server_error', 6),
  // audit log and host checks
  AUDIT_CHAIN_BROKEN: def('audit_chain_broken', 500, 'server_error', 7),
  AUDIT_EVENT_REFUSED: def('audit_event_refused', 500, 'server_error', 1),
  DOCTOR_CHECK_FAILED: def('doctor_check_failed', 500, 'server_error', 8),
  UNENCRYPTED_SWAP: def('unencrypted_swap', 503, 'server_error', 5),
  // egress filter (issue 9)
  EGRESS_UNVERIFIED: def('egress_unverified', 503, 'server_error', 5),
  // maintenance windows and model pull (issue 10)
  EGRESS_WINDOW_RESOLVE: def('egress_window_resolve_failed', 400, 'invalid_request_error', 5),
  EGRESS_WINDOW_FAILED: def('egress_window_failed', 503, 'server_error', 5),
  MODEL_PULL_BLOCKED: def('model_pull_blocked', 503, 'server_error', 5),
  MODEL_PULL_FAILED: def('model_pull_failed', 502, 'server_error', 5),
  MODEL_PULL_TRUNCATED: def('model_pull_truncated', 502, 'server_error', 5),
  MODEL_PULL_STALLED: def('model_pull_stalled', 504, 'server_error', 5),
  MODEL_SIZE_MISMATCH: def('model_size_mismatch', 502, 'server_error', 3),
  MODEL_IN_USE: def('model_in_use', 409, 'invalid_request_error', 3),
  // vault and keyd
  VAULT_NOT_FOUND: def('vault_not_found', 500, 'server_error', 9),
  VAULT_EXISTS: def('vault_exists', 409, 'invalid_request_error', 9),
  VAULT_CREDENTIAL_MISSING: def('vault_credential_missing', 500, 'server_error', 9),
  VAULT_PASSPHRASE_WRONG: def('vault_passphrase_wrong', 500, 'server_error', 9),
  VAULT_CORRUPT: def('vault_corrupt', 500, 'server_error', 9),
  VAULT_KDF_REFUSED: def('vault_kdf_refused', 500, 'server_error', 9),
  VAULT_LOCKED: def('vault_locked', 409, 'invalid_request_error', 9),
  CLIENT_EXISTS: def('client_exists', 409, 'invalid_request_error', 2),
  CLIENT_NOT_FOUND: def('client_not_found', 404, 'not_found_error', 2),
  REQUEST_KEY_UNKNOWN: def('request_key_unknown', 400, 'invalid_request_error', 9),
  KEYD_REFUSED: def('keyd_refused', 403, 'authentication_error', 9),
  KEYD_UNAVAILABLE: def('keyd_unavailable', 503, 'server_error', 9),
  KEYD_WORKER_NOT_CONNECTED: def('keyd_worker_not_connected', 503, 'server_error', 9),
  KEY_DOCUMENT_INVALID: def('key_document_invalid', 502, 'server_error', 6),
  // Docker worker backend
  DOCKER_UNREACHABLE: def('docker_unreachable', 503, 'server_error', 5),
  DOCKER_IMAGE_MISSING: def('docker_image_missing', 500, 'server_error', 2),
  // sealed requests (issue 8)
  SEALED_ENVELOPE_TOO_LARGE: def('sealed_envelope_too_large', 413, 'invalid_request_error', 2),
  SEALED_ENVELOPE_MALFORMED: def('sealed_envelope_malformed', 400, 'invalid_request_error', 2),
  SEALED_VERSION_UNSUPPORTED: def('sealed_version_unsupported', 400, 'invalid_request_error', 2),
  SEALED_UNKNOWN_CLIENT: def('sealed_unknown_client', 401, 'authentication_error', 4),
  SEALED_CLIENT_REVOKED: def('sealed_client_revoked', 403, 'authentication_error', 4),
  SEALED_BAD_SIGNATURE: def('sealed_bad_signature', 401, 'authentication_error', 4),
  SEALED_UNKNOWN_KEY: def('sealed_unknown_key', 400, 'invalid_request_error', 2),
  SEALED_TIMESTAMP_INVALID: def('sealed_timestamp_invalid', 400, 'invalid_request_error', 2),
  SEALED_REPLAY: def('sealed_replay', 409, 'invalid_request_error', 4),
  SEALED_REPLAY_MEMORY_FULL: def('sealed_replay_memory_full', 503, 'server_error', 5),
  SEALED_OPEN_FAILED: def('sealed_open_failed', 400, 'invalid_request_error', 2),
  RECEIPT_INVALID: def('receipt_invalid', 502, 'server_error', 6),
  PLAINTEXT_API_DISABLED: def('plaintext_api_disabled', 403, 'invalid_request_error', 4),
  // control plane and licensing (issue 11)
  CONTROL_PLANE_UNREACHABLE: def('control_plane_unreachable', 502, 'server_error', 10),
  CONTROL_PLANE_PIN_MISMATCH: def('control_plane_pin_mismatch', 502, 'server_error', 10),
  CONTROL_PLANE_REFUSED: def('control_plane_refused', 502, 'server_error', 10),
  LEASE_INVALID: def('lease_invalid', 502, 'server_error', 10),
  NOT_ENROLLED: def('not_enrolled', 503, 'server_error', 10),
  LICENSE_EXPIRED: def('license_expired', 503, 'server_error', 10),
  LICENSE_REVOKED: def('license_revoked', 503, 'server_error', 10),
  // signed updates (issue 12)
  RELEASE_KEY_INVALID: def('release_key_invalid', 400, 'invalid_request_error', 11),
  RELEASE_THRESHOLD_NOT_MET: def('release_threshold_not_met', 409, 'invalid_request_error', 11),
  RELEASE_BUILD_FAILED: def('release_build_failed', 500, 'server_error', 11),
  UPDATE_SIGNATURES_INSUFFICIENT: def('update_signatures_insufficient', 502, 'server_error', 11),
  UPDATE_METADATA_ROLLBACK: def('update_metadata_rollback', 502, 'server_error', 11),
  UPDATE_METADATA_EXPIRED: def('update_metadata_expired', 502, 'server_error', 11),
  UPDATE_METADATA_INVALID: def('update_metadata_invalid', 502, 'server_error', 11),
  UPDATE_TARGET_MISMATCH: def('update_target_mismatch', 502, 'server_error', 11),
  UPDATE_TARGET_TOO_LARGE: def('update_target_too_large', 502, 'server_error', 11),
  UPDATE_TARGET_NOT_FOUND: def('update_target_not_found', 404, 'not_found_error', 11),
  UPDATE_BUNDLES_INSUFFICIENT: def('update_bundles_insufficient', 502, 'server_error', 11),
  UPDATE_VERSION_ROLLBACK: def('update_version_rollback', 409, 'invalid_request_error', 11),
  UPDATE_NOT_ALLOWED: def('update_not_allowed', 403, 'invalid_request_error', 11),
  UPDATE_MANIFEST_MISMATCH: def('update_manifest_mismatch', 502, 'server_error', 11),
  UPDATE_REPOSITORY_UNREACHABLE: def('update_repository_unreachable', 502, 'server_error', 11),
  UPDATE_INSTALL_FAILED: def('update_install_failed', 500, 'server_error', 11),
  UPDATE_TRIAL_FAILED: def('update_trial_failed', 500, 'server_error', 11),
  UPDATE_NO_PREVIOUS_SLOT: def('update_no_previous_slot', 409, 'invalid_request_error', 11),
  // generic
  INTERNAL: def('internal_error', 500, 'server_error', 1),
});

export type ErrorKey = keyof typeof ERRORS;

export class PhantomaError extends Error {
  readonly code: string;
  readonly status: number;
  readonly type: ErrorDefinition['type'];
  readonly exit: number;
  /** Structured detail safe to log and return: never content, never a credential. */
  readonly details: Readonly<Record<string, unknown>> | undefined;

  constructor(definition: ErrorDefinition, message: string, options?: { cause?: unknown; details?: Record<string, unknown> }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = definition.code;
    this.status = definition.status;
    this.type = definition.type;
    this.exit = definition.exit;
    this.details = options?.details ? Object.freeze({ ...options.details }) : undefined;
  }
}

export class ConfigError extends PhantomaError {}
export class UsageError extends PhantomaError {}
export class ModelError extends PhantomaError {}

/** The catalogue entry for a code a node sent back, or the fallback for a code we do not know. */
export function definitionOf(code: unknown, fallback: ErrorDefinition): ErrorDefinition {
  return Object.values(ERRORS).find((d) => d.code === code) ?? fallback;
}

export function isPhantomaError(err: unknown): err is PhantomaError {
  return err instanceof PhantomaError;
}
