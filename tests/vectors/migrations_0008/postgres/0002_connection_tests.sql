-- Connection tests and MCP tool discovery; PostgreSQL translation of ../0002_connection_tests.sql.
-- Differences: the tool name is COLLATE "C" (listed in byte order, like SQLite).

-- The last test's result as JSON (category, stage, scrubbed message, details, latency).
ALTER TABLE connections ADD COLUMN last_test TEXT;

-- The tools an MCP connection's server offered at the last refresh.
CREATE TABLE mcp_tools (
    tenant          TEXT COLLATE "C" NOT NULL,
    connection_id   TEXT COLLATE "C" NOT NULL,
    name            TEXT COLLATE "C" NOT NULL,
    description     TEXT    NOT NULL,
    input_schema    TEXT    NOT NULL,
    definition_hash TEXT    NOT NULL,
    discovered_at   BIGINT  NOT NULL,
    PRIMARY KEY (tenant, connection_id, name),
    FOREIGN KEY (tenant, connection_id) REFERENCES connections (tenant, id) ON DELETE CASCADE
);
