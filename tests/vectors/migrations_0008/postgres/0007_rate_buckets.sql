-- Shared rate-limit buckets; PostgreSQL translation of ../0007_rate_buckets.sql.
-- Differences: DOUBLE PRECISION for REAL. Every replica draws from these rows, under
-- the row lock, on the database server's clock (replica clocks may disagree).
CREATE TABLE rate_buckets (
    kind            TEXT              NOT NULL,
    principal       TEXT              NOT NULL,
    tokens          DOUBLE PRECISION  NOT NULL,
    updated_at      DOUBLE PRECISION  NOT NULL,
    PRIMARY KEY (kind, principal)
);
