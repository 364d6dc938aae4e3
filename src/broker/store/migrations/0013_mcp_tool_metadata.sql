-- What an MCP server says of a tool beside its name, description and input schema (MCP
-- 2025-06-18 and 2025-11-25): a display title ('' when not given), and as JSON, NULL when the
-- server sent none, the behaviour hints (`annotations`), the schema of its structured result
-- (`outputSchema`) and how it may run (`execution`: `taskSupport`). Rows stored before this
-- migration described tools the broker read without these: they get the empty values, which
-- is what their definition hashes were computed from.
ALTER TABLE mcp_tools ADD COLUMN title TEXT NOT NULL DEFAULT '';
ALTER TABLE mcp_tools ADD COLUMN annotations TEXT;
ALTER TABLE mcp_tools ADD COLUMN output_schema TEXT;
ALTER TABLE mcp_tools ADD COLUMN execution TEXT;
