-- Shared rate-limit buckets (admin writes and connection tests, per principal).
-- Rows are few (classes x principals) and small; `updated_at` is seconds since the
-- epoch on the store's clock (on PostgreSQL the database server's, as replica clocks
-- may disagree), so every process drawing from a bucket agrees on time.
CREATE TABLE rate_buckets (
    kind            TEXT    NOT NULL,
    principal       TEXT    NOT NULL,
    tokens          {float} NOT NULL,
    updated_at      {float} NOT NULL,
    PRIMARY KEY (kind, principal)
);
