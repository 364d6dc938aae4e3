-- The audit hash chain (see broker/store/_chain.py) and retention checkpoints.

-- Lowercase hex SHA-256. NULL only on events written before this migration: the SQLite
-- store computes their chain on open (SQL has no portable SHA-256), once, in one
-- transaction. No PostgreSQL database predates the chain, so there an event without a
-- hash is always a break for verification to report.
ALTER TABLE audit_events ADD COLUMN prev_hash TEXT;
ALTER TABLE audit_events ADD COLUMN hash TEXT;

-- One row per pruning run: the id and hash of the last event it deleted. Verification
-- starts from the newest checkpoint, so the events that remain stay verifiable.
CREATE TABLE audit_checkpoints (
    id              {serial_key},
    last_id         BIGINT  NOT NULL,
    last_hash       TEXT    NOT NULL,
    pruned_count    BIGINT  NOT NULL,
    created_at      BIGINT  NOT NULL
);

CREATE INDEX audit_checkpoints_by_last_id ON audit_checkpoints (last_id);
