-- The control plane's state. One set of migrations for PGlite and a real Postgres server; applied in
-- order by control-plane/src/db.ts under an advisory lock, so N instances starting together apply each once.

-- One-time enrolment tokens: only the SHA-256 of a token is stored.
CREATE TABLE enrol_tokens (
  token_sha256 text PRIMARY KEY CHECK (token_sha256 ~ '^[0-9a-f]{64}$'),
  node_name    text NOT NULL,
  created_at   timestamptz NOT NULL,
  expires_at   timestamptz NOT NULL,
  used_at      timestamptz
);
CREATE INDEX enrol_tokens_expires ON enrol_tokens (expires_at);

-- One row per node: its current enrolment, key, status and latest state. `last_counter` only ever grows
-- within an enrolment (the heartbeat UPDATE carries `last_counter < $counter` in its WHERE).
CREATE TABLE nodes (
  name            text PRIMARY KEY,
  public_key      bytea NOT NULL CHECK (octet_length(public_key) = 32),
  enrolment       text NOT NULL,
  status          text NOT NULL CHECK (status IN ('active', 'revoked')),
  enrolled_at     timestamptz NOT NULL,
  revoked_at      timestamptz,
  last_counter    bigint NOT NULL DEFAULT 0,
  last_seen_at    timestamptz,
  last_version    text,
  last_state      jsonb,
  lease_expires_at timestamptz
);

-- Bounded history: every accepted heartbeat, pruned after heartbeat.historyDays.
CREATE TABLE heartbeats (
  node_name   text NOT NULL REFERENCES nodes (name) ON DELETE CASCADE,
  enrolment   text NOT NULL,
  counter     bigint NOT NULL,
  received_at timestamptz NOT NULL,
  body        jsonb NOT NULL,
  PRIMARY KEY (node_name, enrolment, counter)
);
CREATE INDEX heartbeats_received ON heartbeats (received_at);
