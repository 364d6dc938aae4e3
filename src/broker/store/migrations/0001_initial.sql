-- The initial schema. Times are BIGINT microseconds since the epoch (UTC); config,
-- labels, secret_fields and details are JSON text with sorted keys (TEXT, not JSONB:
-- the codec is shared). Engine words are in braces (see broker/store/_migrate.py).

CREATE TABLE connections (
    tenant          {ordered_text} NOT NULL,
    id              {ordered_text} NOT NULL,
    name            {ordered_text} NOT NULL,
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
    ciphertext      {bytes},
    wrapped_dek     {bytes},
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
    tenant          {ordered_text} NOT NULL,
    connection_id   {ordered_text} NOT NULL,
    key             {ordered_text} NOT NULL,
    value           {ordered_text} NOT NULL,
    PRIMARY KEY (tenant, connection_id, key),
    FOREIGN KEY (tenant, connection_id) REFERENCES connections (tenant, id) ON DELETE CASCADE
);

CREATE INDEX connection_labels_by_value ON connection_labels (tenant, key, value);

CREATE TABLE grants (
    tenant          {ordered_text} NOT NULL,
    connection_id   {ordered_text} NOT NULL,
    principal       {ordered_text} NOT NULL,
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
    -- The id is part of the hashed chain form, so both stores assign it (tail + 1); on
    -- PostgreSQL under the audit advisory lock. SQLite's AUTOINCREMENT predates the chain.
    id              {sqlite: INTEGER PRIMARY KEY AUTOINCREMENT | postgres: BIGINT  PRIMARY KEY},
    tenant          {ordered_text} NOT NULL,
    time            BIGINT  NOT NULL,
    actor           {ordered_text} NOT NULL,
    action          {ordered_text} NOT NULL,
    outcome         TEXT    NOT NULL,
    connection_id   {ordered_text} NOT NULL,
    reason          TEXT    NOT NULL,
    request_id      TEXT    NOT NULL,
    peer            TEXT    NOT NULL,
    details         TEXT    NOT NULL
);

CREATE INDEX audit_events_by_tenant ON audit_events (tenant, id);
CREATE INDEX audit_events_by_connection ON audit_events (tenant, connection_id, id);

CREATE TABLE meta (
    key             TEXT    PRIMARY KEY,
    value           {bytes} NOT NULL
);
