-- Leases: a database user made for one executor on a dynamic connection. The row is
-- written ('creating') before the user exists and is the revocation queue afterwards:
-- 'revoking' rows are retried at next_attempt_at until the drop succeeds; claimed_until
-- keeps two replicas from dropping the same user at once. No password is ever stored.
CREATE TABLE leases (
    tenant          {ordered_text} NOT NULL,
    id              {ordered_text} NOT NULL,
    connection_id   {ordered_text} NOT NULL,
    principal       TEXT    NOT NULL,
    username        {ordered_text} NOT NULL UNIQUE,
    state           {ordered_text} NOT NULL CHECK (state IN ('creating', 'active', 'revoking', 'revoked')),
    created_at      BIGINT  NOT NULL,
    expires_at      BIGINT  NOT NULL,
    max_expires_at  BIGINT  NOT NULL,
    run_id          TEXT    NOT NULL DEFAULT '',
    revoke_reason   TEXT    NOT NULL DEFAULT '',
    attempts        BIGINT  NOT NULL DEFAULT 0,
    last_error      TEXT    NOT NULL DEFAULT '',
    next_attempt_at BIGINT,
    claimed_until   BIGINT,
    revoked_at      BIGINT,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX leases_connection ON leases (tenant, connection_id, id);
-- The revocation worker's scan: every lease not yet revoked, by when it next needs work.
CREATE INDEX leases_due ON leases (state, expires_at);
