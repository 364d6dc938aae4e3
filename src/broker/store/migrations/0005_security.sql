-- The security monitor: suspended connections, security events, and what it has seen.

-- Set by the monitor; cleared only by ReinstateConnection. A suspended connection resolves for nobody.
ALTER TABLE connections ADD COLUMN suspended_at BIGINT;

-- Alerts from the monitor's rules. Never a secret value: rule, who, which connection,
-- the peer address, what the broker did, and a few counters in `details`.
CREATE TABLE security_events (
    id              {serial_key},
    tenant          {ordered_text} NOT NULL,
    time            BIGINT  NOT NULL,
    rule            TEXT    NOT NULL,
    severity        TEXT    NOT NULL,
    action          TEXT    NOT NULL,
    principal       TEXT    NOT NULL DEFAULT '',
    connection_id   TEXT    NOT NULL DEFAULT '',
    peer            TEXT    NOT NULL DEFAULT '',
    details         TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX security_events_by_tenant ON security_events (tenant, id);

-- Facts the new_principal_peer rule remembers across restarts: kind 'principal' is
-- (subject = connection id, object = principal), kind 'peer' is (subject = principal,
-- object = peer host). Bounded: only the newest few hundred objects per subject are kept.
CREATE TABLE monitor_seen (
    tenant          {ordered_text} NOT NULL,
    kind            {ordered_text} NOT NULL,
    subject         {ordered_text} NOT NULL,
    object          {ordered_text} NOT NULL,
    first_seen      BIGINT  NOT NULL,
    PRIMARY KEY (tenant, kind, subject, object)
);
