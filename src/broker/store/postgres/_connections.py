"""Connections on PostgreSQL: the rows, their labels, test results, MCP tools and last use."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from broker.errors import Aborted, AlreadyExists, NotFound
from broker.model import AuditEvent, ConnectionFilter, ConnectionRecord, McpTool, TestResult, TestStatus
from broker.store import _codec as codec
from broker.store import _pg_changes as changes
from broker.store import _sql
from broker.store.postgres._base import PostgresBase, _row_count

# Statements are assembled from the constant column lists in `_codec`, never from input.
_CONNECTION_SELECT = "SELECT " + ", ".join(codec.CONNECTION_COLUMNS) + " FROM connections"  # noqa: S608
_CONNECTION_INSERT = (
    f"INSERT INTO connections ({', '.join(codec.CONNECTION_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(codec.CONNECTION_COLUMNS) + 1))})"
)
# What a replace writes, after tenant ($1) and id ($2); the expected version comes last.
# As on SQLite: last_used_at only moves forward (GREATEST ignores NULL); the test columns
# are written only by `record_test_result`; and a replace that keeps the ciphertext (the
# same data key) keeps the stored wrapped key, which `broker keys rewrap` may have
# re-wrapped since the read (SET expressions see the row's old values).
_UPDATED_COLUMNS = tuple(
    col for col in codec.CONNECTION_COLUMNS if col not in ("tenant", "id", *codec.TEST_COLUMNS)
)
_UPDATED_AT = {col: i for i, col in enumerate(_UPDATED_COLUMNS, start=3)}


def _assignment(col: str, i: int) -> str:
    if col == "last_used_at":
        return f"{col} = GREATEST(last_used_at, ${i})"
    if col in ("wrapped_dek", "kek_id"):
        return f"{col} = CASE WHEN ciphertext = ${_UPDATED_AT['ciphertext']} THEN {col} ELSE ${i} END"
    return f"{col} = ${i}"


_CONNECTION_UPDATE = (
    "UPDATE connections SET "  # noqa: S608
    + ", ".join(_assignment(col, i) for col, i in _UPDATED_AT.items())
    + f" WHERE tenant = $1 AND id = $2 AND version = ${len(_UPDATED_COLUMNS) + 3}"
)


class Connections(PostgresBase):
    """The connection rows and what hangs off them."""

    async def count_connections(self) -> dict[tuple[str, str], int]:
        """Connections (not purged) by (type, status as admins see it), across tenants."""
        rows = await self._fetch(_sql.COUNT_BY_TYPE_AND_STATUS)
        return {(row["type"], row["state"]): int(row["n"]) for row in rows}

    async def create_connection(self, record: ConnectionRecord, event: AuditEvent) -> None:
        """Insert the connection, its labels and its audit event; `AlreadyExists` on a live name."""
        params = codec.connection_params(record)
        try:
            async with self._transaction() as conn:
                await conn.execute(_CONNECTION_INSERT, *params)
                await self._write_labels(conn, record)
                await self._insert_audit(conn, [event])
        except asyncpg.UniqueViolationError as exc:
            conflict = _connection_conflict(exc, record)
            if conflict is None:
                raise
            raise conflict from exc

    async def get_connection(self, tenant: str, connection_id: str) -> ConnectionRecord | None:
        """The connection in any state, or None."""
        rows = await self._fetch(_CONNECTION_SELECT + " WHERE tenant = $1 AND id = $2", tenant, connection_id)
        return codec.connection_from_row(rows[0]) if rows else None

    async def find_connection_by_name(self, tenant: str, name: str) -> ConnectionRecord | None:
        """The live connection with this name, or None."""
        rows = await self._fetch(
            _CONNECTION_SELECT + " WHERE tenant = $1 AND name = $2 AND deleted_at IS NULL", tenant, name
        )
        return codec.connection_from_row(rows[0]) if rows else None

    async def list_connections(
        self, tenant: str, filter: ConnectionFilter, limit: int, after_id: str | None
    ) -> list[ConnectionRecord]:
        """Up to `limit` connections by id (byte order), every filter applied in SQL."""
        _sql.check_limit(limit)
        arg = _sql.Params(numbered=True)
        where = [f"tenant = {arg(tenant)}", _sql.STATUS_WHERE[filter.status]]
        if filter.type:
            where.append(f"type = {arg(filter.type)}")
        if filter.provider:
            where.append(f"provider = {arg(filter.provider)}")
        if filter.name_prefix:
            # starts_with, not LIKE: no wildcards to escape; case-sensitive.
            where.append(f"starts_with(name, {arg(filter.name_prefix)})")
        for key, value in sorted(filter.labels.items()):
            where.append(
                "EXISTS (SELECT 1 FROM connection_labels l WHERE l.tenant = connections.tenant"  # noqa: S608
                f" AND l.connection_id = connections.id AND l.key = {arg(key)} AND l.value = {arg(value)})"
            )
        if after_id is not None:
            where.append(f"id > {arg(after_id)}")
        sql = f"{_CONNECTION_SELECT} WHERE {' AND '.join(where)} ORDER BY id LIMIT {arg(limit)}"
        rows = await self._fetch(sql, *arg.values)
        return [codec.connection_from_row(row) for row in rows]

    async def replace_connection(
        self,
        record: ConnectionRecord,
        expected_version: int,
        event: AuditEvent,
        *,
        drop_grants: bool = False,
    ) -> None:
        """Compare-and-swap on the version (READ COMMITTED + the row lock the UPDATE takes)."""
        if record.version <= expected_version:
            raise ValueError("a replaced connection needs a version above the expected one")
        values = dict(zip(codec.CONNECTION_COLUMNS, codec.connection_params(record), strict=True))
        params = [record.tenant, record.id, *(values[col] for col in _UPDATED_COLUMNS), expected_version]
        try:
            async with self._transaction() as conn:
                # The replaced secret version is remembered (not its ciphertext) for Resolve.
                await conn.execute(
                    "INSERT INTO secret_versions (tenant, connection_id, secret_version, superseded_at)"
                    " SELECT tenant, id, secret_version, $1 FROM connections"
                    " WHERE tenant = $2 AND id = $3 AND version = $4 AND secret_version < $5"
                    " ON CONFLICT DO NOTHING",
                    codec.to_micros(record.updated_at),
                    record.tenant,
                    record.id,
                    expected_version,
                    record.secret_version,
                )
                status = await conn.execute(_CONNECTION_UPDATE, *params)
                if _row_count(status) == 0:
                    found = await conn.fetchval(
                        "SELECT 1 FROM connections WHERE tenant = $1 AND id = $2", record.tenant, record.id
                    )
                    if found is None:
                        raise NotFound(f"connection {record.id} not found")
                    raise Aborted(
                        "the connection changed since it was read (etag mismatch); read it again and retry"
                    )
                await self._write_labels(conn, record)
                if drop_grants:
                    await conn.execute(
                        "DELETE FROM grants WHERE tenant = $1 AND connection_id = $2",
                        record.tenant,
                        record.id,
                    )
                await changes.notify(conn, changes.connection_changed(record.tenant, record.id))
                await self._insert_audit(conn, [event])
        except asyncpg.UniqueViolationError as exc:
            conflict = _connection_conflict(exc, record)
            if conflict is None:
                raise
            raise conflict from exc

    async def record_last_used(self, uses: Sequence[tuple[str, str, datetime]]) -> None:
        """Raise last_used_at (never lower it) in one transaction; the version is untouched."""
        if not uses:
            return
        # Rows are locked in key order, so two replicas flushing overlapping sets cannot deadlock.
        params = sorted((tenant, cid, codec.to_micros(when)) for tenant, cid, when in uses)
        async with self._transaction() as conn:
            await conn.executemany(
                "UPDATE connections SET last_used_at = $3 WHERE tenant = $1 AND id = $2"
                " AND (last_used_at IS NULL OR last_used_at < $3)",
                params,
            )

    async def record_test_result(
        self, tenant: str, connection_id: str, result: TestResult, event: AuditEvent
    ) -> None:
        """Store a connection's latest test result with its audit event; the version is untouched."""
        if result.tested_at is None:
            raise ValueError("a recorded test result needs tested_at")
        status = TestStatus.SUCCESS if result.success else TestStatus.FAILED
        async with self._transaction() as conn:
            done = await conn.execute(
                "UPDATE connections SET last_tested_at = $1, test_status = $2, last_test = $3"
                " WHERE tenant = $4 AND id = $5 AND purged_at IS NULL",
                codec.to_micros(result.tested_at),
                status.value,
                codec.to_json(codec.test_result_to_doc(result)),
                tenant,
                connection_id,
            )
            if _row_count(done) == 0:
                raise NotFound(f"connection {connection_id} not found")
            await self._insert_audit(conn, [event])

    async def replace_mcp_tools(
        self,
        tenant: str,
        connection_id: str,
        tools: Sequence[McpTool],
        discovered_at: datetime,
        event: AuditEvent | None,
    ) -> None:
        """Replace the stored tool list of a connection (and write `event` when given)."""
        try:
            async with self._transaction() as conn:
                await conn.execute(
                    "DELETE FROM mcp_tools WHERE tenant = $1 AND connection_id = $2", tenant, connection_id
                )
                await conn.executemany(
                    "INSERT INTO mcp_tools (tenant, connection_id, name, description, input_schema,"
                    " definition_hash, discovered_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    [codec.mcp_tool_params(tenant, connection_id, t, discovered_at) for t in tools],
                )
                if event is not None:
                    await self._insert_audit(conn, [event])
        except asyncpg.ForeignKeyViolationError as exc:
            raise NotFound(f"connection {connection_id} not found") from exc

    async def list_mcp_tools(self, tenant: str, connection_id: str) -> tuple[list[McpTool], datetime | None]:
        """The stored tools by name, and when they were discovered (None when never)."""
        rows = await self._fetch(
            "SELECT name, description, input_schema, definition_hash, discovered_at FROM mcp_tools"
            " WHERE tenant = $1 AND connection_id = $2 ORDER BY name",
            tenant,
            connection_id,
        )
        when = codec.from_micros(rows[0]["discovered_at"]) if rows else None
        return [codec.mcp_tool_from_row(row) for row in rows], when

    async def list_expiring_tokens(self, before: datetime, limit: int) -> list[tuple[str, str]]:
        """(tenant, id) of live, active connections whose token expires before `before`, soonest first."""
        _sql.check_limit(limit)
        rows = await self._fetch(
            "SELECT tenant, id FROM connections"
            " WHERE secret_expires_at IS NOT NULL AND secret_expires_at < $1 AND deleted_at IS NULL"
            " AND status = 'active' AND reauth_required_at IS NULL AND suspended_at IS NULL"
            " ORDER BY secret_expires_at LIMIT $2",
            codec.to_micros(before),
            limit,
        )
        return [(row["tenant"], row["id"]) for row in rows]

    @staticmethod
    async def _write_labels(conn: asyncpg.Connection, record: ConnectionRecord) -> None:
        await conn.execute(
            "DELETE FROM connection_labels WHERE tenant = $1 AND connection_id = $2", record.tenant, record.id
        )
        await conn.executemany(
            "INSERT INTO connection_labels (tenant, connection_id, key, value) VALUES ($1, $2, $3, $4)",
            [(record.tenant, record.id, k, v) for k, v in sorted(record.labels.items())],
        )


def _connection_conflict(exc: asyncpg.UniqueViolationError, record: ConnectionRecord) -> AlreadyExists | None:
    """The domain error for a uniqueness violation on connections, or None for any other violation."""
    constraint = getattr(exc, "constraint_name", None)
    if constraint == "connections_live_name":
        return AlreadyExists(f"a connection named '{record.name}' already exists")
    if constraint == "connections_pkey":
        return AlreadyExists(f"connection {record.id} already exists")
    return None
