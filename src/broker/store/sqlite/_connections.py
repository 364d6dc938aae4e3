"""Connections on SQLite: the rows, their labels, test results, MCP tools and last use."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aiosqlite

from broker.errors import Aborted, AlreadyExists, NotFound
from broker.model import AuditEvent, ConnectionFilter, ConnectionRecord, McpTool, TestResult, TestStatus
from broker.store import _codec as codec
from broker.store import _sql
from broker.store.sqlite._base import SqliteBase

# Statements are assembled from the constant column lists in `_codec`, never from input.
_CONNECTION_SELECT = "SELECT " + ", ".join(codec.CONNECTION_COLUMNS) + " FROM connections"  # noqa: S608
_CONNECTION_INSERT = (
    f"INSERT INTO connections ({', '.join(codec.CONNECTION_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in codec.CONNECTION_COLUMNS)})"
)
# last_used_at is flushed out of band by `record_last_used`, which leaves the version
# alone; a replace based on an older read must not move it backwards. Test results
# are likewise written only by `record_test_result`. `broker keys rewrap` re-wraps a
# data key without touching the version; a replace based on an older read that keeps
# the same ciphertext (same data key) keeps the stored, possibly re-wrapped, key.
_CONNECTION_UPDATE = (
    "UPDATE connections SET "  # noqa: S608
    + ", ".join(
        f"{col} = :{col}"
        for col in codec.CONNECTION_COLUMNS
        if col not in ("tenant", "id", "last_used_at", "wrapped_dek", "kek_id", *codec.TEST_COLUMNS)
    )
    + ", last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < :last_used_at"
    " THEN :last_used_at ELSE last_used_at END"
    + "".join(
        f", {col} = CASE WHEN ciphertext = :ciphertext THEN {col} ELSE :{col} END"
        for col in ("wrapped_dek", "kek_id")
    )
    + " WHERE tenant = :tenant AND id = :id AND version = :expected_version"
)
_LABEL_INSERT = "INSERT INTO connection_labels (tenant, connection_id, key, value) VALUES (?, ?, ?, ?)"


class Connections(SqliteBase):
    """The connection rows and what hangs off them."""

    async def count_connections(self) -> dict[tuple[str, str], int]:
        """Connections (not purged) by (type, status as admins see it), across tenants."""
        rows = await self._read(_sql.COUNT_BY_TYPE_AND_STATUS, ())
        return {(row["type"], row["state"]): int(row["n"]) for row in rows}

    async def create_connection(self, record: ConnectionRecord, event: AuditEvent) -> None:
        """Insert the connection, its labels and its audit event; `AlreadyExists` on a live name."""
        params = codec.connection_params(record)
        try:
            async with self._transaction() as conn:
                await conn.execute(_CONNECTION_INSERT, params)
                await self._write_labels(conn, record)
                await self._insert_audit(conn, [event])
        except sqlite3.IntegrityError as exc:
            conflict = _connection_conflict(exc, record)
            if conflict is None:
                raise
            raise conflict from exc

    async def get_connection(self, tenant: str, connection_id: str) -> ConnectionRecord | None:
        """The connection in any state, or None."""
        rows = await self._read(_CONNECTION_SELECT + " WHERE tenant = ? AND id = ?", (tenant, connection_id))
        return codec.connection_from_row(rows[0]) if rows else None

    async def find_connection_by_name(self, tenant: str, name: str) -> ConnectionRecord | None:
        """The live connection with this name, or None."""
        rows = await self._read(
            _CONNECTION_SELECT + " WHERE tenant = ? AND name = ? AND deleted_at IS NULL", (tenant, name)
        )
        return codec.connection_from_row(rows[0]) if rows else None

    async def list_connections(
        self, tenant: str, filter: ConnectionFilter, limit: int, after_id: str | None
    ) -> list[ConnectionRecord]:
        """Up to `limit` connections by id, every filter applied in SQL."""
        _sql.check_limit(limit)
        where = ["tenant = ?", _sql.STATUS_WHERE[filter.status]]
        params: list[Any] = [tenant]
        if filter.type:
            where.append("type = ?")
            params.append(filter.type)
        if filter.provider:
            where.append("provider = ?")
            params.append(filter.provider)
        if filter.name_prefix:
            # substr, not LIKE: no wildcards to escape, and case-sensitive in SQLite too.
            where.append("substr(name, 1, ?) = ?")
            params += [len(filter.name_prefix), filter.name_prefix]
        for key, value in sorted(filter.labels.items()):
            where.append(
                "EXISTS (SELECT 1 FROM connection_labels l WHERE l.tenant = connections.tenant"
                " AND l.connection_id = connections.id AND l.key = ? AND l.value = ?)"
            )
            params += [key, value]
        if after_id is not None:
            where.append("id > ?")
            params.append(after_id)
        sql = f"{_CONNECTION_SELECT} WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
        rows = await self._read(sql, [*params, limit])
        return [codec.connection_from_row(row) for row in rows]

    async def replace_connection(
        self,
        record: ConnectionRecord,
        expected_version: int,
        event: AuditEvent,
        *,
        drop_grants: bool = False,
    ) -> None:
        """Overwrite (tenant, id) if still at `expected_version`; all or nothing with `event`."""
        if record.version <= expected_version:
            raise ValueError("a replaced connection needs a version above the expected one")
        params: dict[str, Any] = dict(
            zip(codec.CONNECTION_COLUMNS, codec.connection_params(record), strict=True)
        )
        params["expected_version"] = expected_version
        try:
            async with self._transaction() as conn:
                # The replaced secret version is remembered (not its ciphertext) for Resolve.
                await conn.execute(
                    "INSERT OR IGNORE INTO secret_versions (tenant, connection_id, secret_version,"
                    " superseded_at) SELECT tenant, id, secret_version, ? FROM connections"
                    " WHERE tenant = ? AND id = ? AND version = ? AND secret_version < ?",
                    (
                        codec.to_micros(record.updated_at),
                        record.tenant,
                        record.id,
                        expected_version,
                        record.secret_version,
                    ),
                )
                async with conn.execute(_CONNECTION_UPDATE, params) as cursor:
                    changed = cursor.rowcount
                if changed == 0:
                    found = await conn.execute_fetchall(
                        "SELECT 1 FROM connections WHERE tenant = ? AND id = ?", (record.tenant, record.id)
                    )
                    if not list(found):
                        raise NotFound(f"connection {record.id} not found")
                    raise Aborted(
                        "the connection changed since it was read (etag mismatch); read it again and retry"
                    )
                await self._write_labels(conn, record)
                if drop_grants:
                    await conn.execute(
                        "DELETE FROM grants WHERE tenant = ? AND connection_id = ?",
                        (record.tenant, record.id),
                    )
                await self._insert_audit(conn, [event])
        except sqlite3.IntegrityError as exc:
            conflict = _connection_conflict(exc, record)
            if conflict is None:
                raise
            raise conflict from exc

    async def record_last_used(self, uses: Sequence[tuple[str, str, datetime]]) -> None:
        """Raise last_used_at (never lower it) in one transaction; the version is untouched."""
        if not uses:
            return
        params = []
        for tenant, connection_id, when in uses:
            micros = codec.to_micros(when)
            params.append((micros, tenant, connection_id, micros))
        async with self._transaction() as conn:
            await conn.executemany(
                "UPDATE connections SET last_used_at = ? WHERE tenant = ? AND id = ?"
                " AND (last_used_at IS NULL OR last_used_at < ?)",
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
            async with conn.execute(
                "UPDATE connections SET last_tested_at = ?, test_status = ?, last_test = ?"
                " WHERE tenant = ? AND id = ? AND purged_at IS NULL",
                (
                    codec.to_micros(result.tested_at),
                    status.value,
                    codec.to_json(codec.test_result_to_doc(result)),
                    tenant,
                    connection_id,
                ),
            ) as cursor:
                if cursor.rowcount == 0:
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
        async with self._transaction() as conn:
            await conn.execute(
                "DELETE FROM mcp_tools WHERE tenant = ? AND connection_id = ?", (tenant, connection_id)
            )
            try:
                await conn.executemany(
                    "INSERT INTO mcp_tools (tenant, connection_id, name, description, input_schema,"
                    " definition_hash, discovered_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [codec.mcp_tool_params(tenant, connection_id, t, discovered_at) for t in tools],
                )
            except sqlite3.IntegrityError as exc:
                if "FOREIGN KEY" in str(exc):
                    raise NotFound(f"connection {connection_id} not found") from exc
                raise
            if event is not None:
                await self._insert_audit(conn, [event])

    async def list_mcp_tools(self, tenant: str, connection_id: str) -> tuple[list[McpTool], datetime | None]:
        """The stored tools by name, and when they were discovered (None when never)."""
        rows = await self._read(
            "SELECT name, description, input_schema, definition_hash, discovered_at FROM mcp_tools"
            " WHERE tenant = ? AND connection_id = ? ORDER BY name",
            (tenant, connection_id),
        )
        when = codec.from_micros(rows[0]["discovered_at"]) if rows else None
        return [codec.mcp_tool_from_row(row) for row in rows], when

    async def list_expiring_tokens(self, before: datetime, limit: int) -> list[tuple[str, str]]:
        """(tenant, id) of live, active connections whose token expires before `before`, soonest first."""
        _sql.check_limit(limit)
        rows = await self._read(
            "SELECT tenant, id FROM connections WHERE secret_expires_at IS NOT NULL AND secret_expires_at < ?"
            " AND deleted_at IS NULL AND status = 'active' AND reauth_required_at IS NULL"
            " AND suspended_at IS NULL ORDER BY secret_expires_at LIMIT ?",
            (codec.to_micros(before), limit),
        )
        return [(row["tenant"], row["id"]) for row in rows]

    @staticmethod
    async def _write_labels(conn: aiosqlite.Connection, record: ConnectionRecord) -> None:
        await conn.execute(
            "DELETE FROM connection_labels WHERE tenant = ? AND connection_id = ?", (record.tenant, record.id)
        )
        await conn.executemany(
            _LABEL_INSERT, [(record.tenant, record.id, k, v) for k, v in sorted(record.labels.items())]
        )


def _connection_conflict(exc: sqlite3.IntegrityError, record: ConnectionRecord) -> AlreadyExists | None:
    """The domain error for a uniqueness violation on connections, or None for any other violation."""
    message = str(exc)
    if "UNIQUE" in message and "connections.name" in message:
        return AlreadyExists(f"a connection named '{record.name}' already exists")
    if "UNIQUE" in message and "connections.id" in message:
        return AlreadyExists(f"connection {record.id} already exists")
    return None
