-- Audit seals: MACs over the chain's tail under a key derived from the master key.
-- One row per sealed tail (several replicas may seal the same one: the first stays).
-- Pruning deletes the seals of the events it deletes.
CREATE TABLE audit_seals (
    last_id         BIGINT  PRIMARY KEY,
    last_hash       TEXT    NOT NULL,
    kek_id          TEXT    NOT NULL,
    mac             TEXT    NOT NULL,
    sealed_at       BIGINT  NOT NULL
);
