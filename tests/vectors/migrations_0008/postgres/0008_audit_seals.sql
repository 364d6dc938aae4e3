-- Audit seals; PostgreSQL translation of ../0008_audit_seals.sql. Differences: none.
CREATE TABLE audit_seals (
    last_id         BIGINT  PRIMARY KEY,
    last_hash       TEXT    NOT NULL,
    kek_id          TEXT    NOT NULL,
    mac             TEXT    NOT NULL,
    sealed_at       BIGINT  NOT NULL
);
