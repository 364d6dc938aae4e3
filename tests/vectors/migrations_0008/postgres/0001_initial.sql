-- The initial schema, PostgreSQL translation of ../0001_initial.sql (same version
-- numbers, so both engines record the same history). Differences from SQLite:
--   * BLOB is BYTEA;
--   * audit_events.id is a plain BIGINT key: the store assigns it (tail + 1) under the
--     audit advisory lock, because the id is part of the hashed chain form;
--   * text keys that are ordered or paged on are COLLATE "C" (byte order, like SQLite's
--     BINARY), so `ORDER BY id` and `id > $n` agree with the SQLite backend and with
--     Python's sort whatever the database's default collation is.
-- Times are BIGINT microseconds since the epoch (UTC); config, labels, secret_fields
-- and details are JSON text with sorted keys (TEXT, not JSONB: the codec is shared).

CREATE TABLE connections (
    tenant          TEXT COLLATE "C" NOT NULL,
    id              TEXT COLLATE "C" NOT NULL,
    name            TEXT COLLATE "C" NOT NULL,
    type            TEXT    NOT NULL,
    provider        TEXT    NOT NULL,
    config          TEXT    NOT NULL,
    secret_fields   TEXT    NOT NULL,
    labels          TEXT    NOT NULL,
    -- Soft deletion is deleted_at, not status: a deleted connection keeps the status
    -- (active or revoked) it had, and gets it back when restored.
    status          TEXT    NOT NULL CHECK (status IN ('active', 'revoked', 'deleted')),
    version         BIGINT  NOT NULL,
    secret_version  BIGINT  NOT NULL,
    -- The sealed envelope; all three are NULL once a purge destroyed the data key.
    ciphertext      BYTEA,
    wrapped_dek     BYTEA,
    kek_id          TEXT,
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL,
    created_by      TEXT    NOT NULL,
    deleted_at      BIGINT,
    purged_at       BIGINT,
    last_used_at    BIGINT,
    last_tested_at  BIGINT,
    test_status     TEXT    NOT NULL CHECK (test_status IN ('untested', 'success', 'failed')),
    PRIMARY KEY (tenant, id),
    CHECK ((ciphertext IS NULL) = (wrapped_dek IS NULL) AND (wrapped_dek IS NULL) = (kek_id IS NULL)),
    CHECK (purged_at IS NULL OR wrapped_dek IS NULL)
);

-- A name is unique among the live connections of a tenant; soft-deleted rows free it.
-- The store maps a violation of this index (by name) to AlreadyExists.
CREATE UNIQUE INDEX connections_live_name ON connections (tenant, name) WHERE deleted_at IS NULL;

-- Labels again, one row each, so label filters are exact in SQL and paging stays right.
CREATE TABLE connection_labels (
    tenant          TEXT COLLATE "C" NOT NULL,
    connection_id   TEXT COLLATE "C" NOT NULL,
    key             TEXT COLLATE "C" NOT NULL,
    value           TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (tenant, connection_id, key),
    FOREIGN KEY (tenant, connection_id) REFERENCES connections (tenant, id) ON DELETE CASCADE
);

CREATE INDEX connection_labels_by_value ON connection_labels (tenant, key, value);

CREATE TABLE grants (
    tenant          TEXT COLLATE "C" NOT NULL,
    connection_id   TEXT COLLATE "C" NOT NULL,
    principal       TEXT COLLATE "C" NOT NULL,
    created_at      BIGINT  NOT NULL,
    created_by      TEXT    NOT NULL,
    expires_at      BIGINT,
    PRIMARY KEY (tenant, connection_id, principal),
    FOREIGN KEY (tenant, connection_id) REFERENCES connections (tenant, id) ON DELETE CASCADE
);

CREATE INDEX grants_by_principal ON grants (tenant, principal, connection_id);

-- No foreign key to connections: the trail outlives what it describes, and
-- denied requests may name ids that never existed.
CREATE TABLE audit_events (
    id              BIGINT  PRIMARY KEY,
    tenant          TEXT COLLATE "C" NOT NULL,
    time            BIGINT  NOT NULL,
    actor           TEXT COLLATE "C" NOT NULL,
    action          TEXT COLLATE "C" NOT NULL,
    outcome         TEXT    NOT NULL,
    connection_id   TEXT COLLATE "C" NOT NULL,
    reason          TEXT    NOT NULL,
    request_id      TEXT    NOT NULL,
    peer            TEXT    NOT NULL,
    details         TEXT    NOT NULL
);

CREATE INDEX audit_events_by_tenant ON audit_events (tenant, id);
CREATE INDEX audit_events_by_connection ON audit_events (tenant, connection_id, id);

CREATE TABLE meta (
    key             TEXT    PRIMARY KEY,
    value           BYTEA   NOT NULL
);
