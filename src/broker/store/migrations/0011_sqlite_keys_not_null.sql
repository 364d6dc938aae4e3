-- SQLite lets a PRIMARY KEY column that is not INTEGER hold NULL (a legacy it keeps for
-- compatibility), so meta.key, oauth_states.state_hash, kek_wraps.kek_id and audit_seals.last_id
-- took NULL there. SQLite cannot add NOT NULL to a column: each table is rebuilt as
-- https://www.sqlite.org/lang_altertable.html#otheralter says (create the new table, copy the
-- rows, drop the old one, rename the new one, create its indexes again), in this migration's
-- transaction. A row whose key is NULL is not copied, so it is gone: the store never writes one,
-- and no lookup (by key, hash, master key or chain position) can find it. No foreign key, trigger
-- or view names these tables, so foreign-key enforcement (on in the store; it cannot be switched
-- inside a transaction) has nothing to check here. PostgreSQL's primary keys are NOT NULL
-- already: there this migration changes nothing.
{sqlite:
CREATE TABLE meta_new (
    key             TEXT    NOT NULL PRIMARY KEY,
    value           BLOB    NOT NULL
);
INSERT INTO meta_new (key, value) SELECT key, value FROM meta WHERE key IS NOT NULL;
DROP TABLE meta;
ALTER TABLE meta_new RENAME TO meta;

CREATE TABLE oauth_states_new (
    state_hash      TEXT    NOT NULL PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    actor           TEXT    NOT NULL,
    connection_id   TEXT    NOT NULL,
    created_at      BIGINT  NOT NULL,
    expires_at      BIGINT  NOT NULL,
    ciphertext      BLOB    NOT NULL,
    wrapped_dek     BLOB    NOT NULL,
    kek_id          TEXT    NOT NULL
);
INSERT INTO oauth_states_new
        (state_hash, tenant, actor, connection_id, created_at, expires_at, ciphertext, wrapped_dek, kek_id)
    SELECT state_hash, tenant, actor, connection_id, created_at, expires_at, ciphertext, wrapped_dek, kek_id
    FROM oauth_states WHERE state_hash IS NOT NULL;
DROP TABLE oauth_states;
ALTER TABLE oauth_states_new RENAME TO oauth_states;
CREATE INDEX oauth_states_by_kek ON oauth_states (kek_id);

CREATE TABLE kek_wraps_new (
    kek_id          TEXT    NOT NULL PRIMARY KEY,
    wraps           BIGINT  NOT NULL
);
INSERT INTO kek_wraps_new (kek_id, wraps) SELECT kek_id, wraps FROM kek_wraps WHERE kek_id IS NOT NULL;
DROP TABLE kek_wraps;
ALTER TABLE kek_wraps_new RENAME TO kek_wraps;

CREATE TABLE audit_seals_new (
    last_id         BIGINT  NOT NULL PRIMARY KEY,
    last_hash       TEXT    NOT NULL,
    kek_id          TEXT    NOT NULL,
    mac             TEXT    NOT NULL,
    sealed_at       BIGINT  NOT NULL
);
INSERT INTO audit_seals_new (last_id, last_hash, kek_id, mac, sealed_at)
    SELECT last_id, last_hash, kek_id, mac, sealed_at FROM audit_seals WHERE last_id IS NOT NULL;
DROP TABLE audit_seals;
ALTER TABLE audit_seals_new RENAME TO audit_seals;
| postgres: }
