-- Connection tests and MCP tool discovery.

-- The last test's result as JSON (category, stage, scrubbed message, details, latency).
ALTER TABLE connections ADD COLUMN last_test TEXT;

-- The tools an MCP connection's server offered at the last refresh (listed by name).
CREATE TABLE mcp_tools (
    tenant          {ordered_text} NOT NULL,
    connection_id   {ordered_text} NOT NULL,
    name            {ordered_text} NOT NULL,
    description     TEXT    NOT NULL,
    input_schema    TEXT    NOT NULL,
    definition_hash TEXT    NOT NULL,
    discovered_at   BIGINT  NOT NULL,
    PRIMARY KEY (tenant, connection_id, name),
    FOREIGN KEY (tenant, connection_id) REFERENCES connections (tenant, id) ON DELETE CASCADE
);
