-- Master-key rotation and superseded secret versions.

-- AES-GCM encryptions made under each master key (one per wrapped data key), for the
-- random-nonce limit of 2^32 per key. Added to, never rewritten: several processes
-- (every broker replica, `broker keys rewrap`) count into the same rows.
CREATE TABLE kek_wraps (
    kek_id          TEXT    PRIMARY KEY,
    wraps           BIGINT  NOT NULL
);

-- When a connection's secret version was replaced, kept for resolve.superseded_grace_seconds
-- so Resolve can tell an executor holding that version when it was superseded. Metadata
-- only: the replaced ciphertext is not kept.
CREATE TABLE secret_versions (
    tenant          TEXT    NOT NULL,
    connection_id   TEXT    NOT NULL,
    secret_version  BIGINT  NOT NULL,
    superseded_at   BIGINT  NOT NULL,
    PRIMARY KEY (tenant, connection_id, secret_version)
);
CREATE INDEX secret_versions_by_time ON secret_versions (superseded_at);

-- `broker keys rewrap` and `broker keys status` look rows up by master key.
CREATE INDEX connections_by_kek ON connections (kek_id);
CREATE INDEX oauth_states_by_kek ON oauth_states (kek_id);
