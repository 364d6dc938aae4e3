-- OAuth2: re-authorization state, token expiry for the background refresher,
-- and pending authorization-code flows.

-- Set when the provider refused a refresh (invalid_grant); the connection shows as expired.
ALTER TABLE connections ADD COLUMN reauth_required_at BIGINT;
-- When the stored access token expires (oauth2 only): what the background refresher scans.
ALTER TABLE connections ADD COLUMN secret_expires_at BIGINT;
CREATE INDEX connections_by_secret_expiry ON connections (secret_expires_at);

-- Between BeginAuthorization and CompleteAuthorization. The state itself is never
-- stored, only its SHA-256; the PKCE verifier and any draft secrets are sealed.
CREATE TABLE oauth_states (
    state_hash      TEXT    PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    actor           TEXT    NOT NULL,
    connection_id   TEXT    NOT NULL,
    created_at      BIGINT  NOT NULL,
    expires_at      BIGINT  NOT NULL,
    ciphertext      {bytes} NOT NULL,
    wrapped_dek     {bytes} NOT NULL,
    kek_id          TEXT    NOT NULL
);
