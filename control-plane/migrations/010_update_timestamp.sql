-- Signed updates (issue 12): the TUF timestamp the control plane serves. One row, re-signed by whichever
-- instance holds the advisory lock, so N instances serve one monotonic timestamp.
CREATE TABLE IF NOT EXISTS update_timestamp (
  id smallint PRIMARY KEY CHECK (id = 1),
  version integer NOT NULL,
  snapshot_version integer NOT NULL,
  expires timestamptz NOT NULL,
  body text NOT NULL,
  signed_at timestamptz NOT NULL DEFAULT now()
);
