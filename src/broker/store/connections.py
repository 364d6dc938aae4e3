"""Connections: the rows, their labels, test results, MCP tools and last use."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from broker.errors import Aborted, AlreadyExists, NotFound
from broker.model import (
    AuditEvent,
    ConnectionFilter,
    ConnectionRecord,
    ConnectionStatus,
    Grant,
    McpTool,
    TestResult,
    TestStatus,
)
from broker.store import _codec as codec
from broker.store import changes
from broker.store.engine import Duplicate, MissingParent, Tx
from broker.store.lifecycle import EngineStore, Where, check_limit

_TABLE = codec.CONNECTIONS
# Resolve's reads on a cache miss: built once, so translated once.
_BY_ID = _TABLE.select + " WHERE tenant = ? AND id = ?"
_BY_LIVE_NAME = _TABLE.select + " WHERE tenant = ? AND name = ? AND deleted_at IS NULL"
# The record and one principal's grant on it in one statement (one round trip on PostgreSQL); the
# grant's columns come back as grant_<column>, NULL when there is none.
_BY_ID_WITH_GRANT = (
    "SELECT "  # noqa: S608 (names from the models' fields, never from input)
    + ", ".join(f"c.{col} AS {col}" for col in _TABLE.columns)
    + ", "
    + ", ".join(f"g.{col} AS grant_{col}" for col in codec.GRANTS.columns)
    + " FROM connections c LEFT JOIN grants g"
    " ON g.tenant = c.tenant AND g.connection_id = c.id AND g.principal = ?"
    " WHERE c.tenant = ? AND c.id = ?"
)
# What a replace writes. last_used_at is flushed out of band by `record_last_used`, which
# leaves the version alone: a replace based on an older read must not move it backwards.
# Test results are written only by `record_test_result`. `broker keys rewrap` re-wraps a
# data key without touching the version: a replace that keeps the ciphertext (the same
# data key) keeps the stored, possibly re-wrapped, key (SET sees the row's old values).
_UPDATED = tuple(
    col for col in _TABLE.columns if col not in ("tenant", "id", "last_tested_at", "test_status", "last_test")
)
# Each column's assignment and the record's values its parameters take, in order.
_ASSIGNMENTS = {
    "last_used_at": (
        "last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < ? THEN ? ELSE last_used_at END",
        ("last_used_at", "last_used_at"),
    ),
    "wrapped_dek": (
        "wrapped_dek = CASE WHEN ciphertext = ? THEN wrapped_dek ELSE ? END",
        ("ciphertext", "wrapped_dek"),
    ),
    "kek_id": ("kek_id = CASE WHEN ciphertext = ? THEN kek_id ELSE ? END", ("ciphertext", "kek_id")),
}
_SETS = [_ASSIGNMENTS.get(col, (f"{col} = ?", (col,))) for col in _UPDATED]
_UPDATE = (
    "UPDATE connections SET "  # noqa: S608
    + ", ".join(assignment for assignment, _ in _SETS)
    + " WHERE tenant = ? AND id = ? AND version = ?"
)
_UPDATE_VALUES = [value for _, values in _SETS for value in values]
# A tool row: the model's columns (from `McpTool`'s fields) between its connection and when it was seen.
_MCP_TOOL_COLUMNS = ("tenant", "connection_id", *codec.MCP_TOOLS.columns, "discovered_at")
_INSERT_MCP_TOOL = (
    f"INSERT INTO mcp_tools ({', '.join(_MCP_TOOL_COLUMNS)})"  # noqa: S608 (names from the model)
    f" VALUES ({', '.join('?' * len(_MCP_TOOL_COLUMNS))})"
)
_MCP_TOOLS_OF = (
    f"SELECT {', '.join(codec.MCP_TOOLS.columns)}, discovered_at FROM mcp_tools"  # noqa: S608
    " WHERE tenant = ? AND connection_id = ? ORDER BY name"
)
# A unique constraint as each engine names it: SQLite by its columns, PostgreSQL by its name.
_NAME_TAKEN = {"connections.tenant, connections.name", "connections_live_name"}
_ID_TAKEN = {"connections.tenant, connections.id", "connections_pkey"}

# `ListConnections` status filters; None lists live connections (active and revoked).
STATUS_WHERE: dict[ConnectionStatus | None, str] = {
    None: "deleted_at IS NULL",
    ConnectionStatus.ACTIVE: (
        "status = 'active' AND deleted_at IS NULL AND reauth_required_at IS NULL AND suspended_at IS NULL"
    ),
    ConnectionStatus.REVOKED: "status = 'revoked' AND deleted_at IS NULL",
    ConnectionStatus.DELETED: "deleted_at IS NOT NULL AND purged_at IS NULL",
    ConnectionStatus.EXPIRED: (
        "status = 'active' AND deleted_at IS NULL AND reauth_required_at IS NOT NULL AND suspended_at IS NULL"
    ),
    ConnectionStatus.SUSPENDED: "status = 'active' AND deleted_at IS NULL AND suspended_at IS NOT NULL",
}
# What admins see as a connection's status, in SQL: the first status whose filter holds, in
# `presented_status`'s order (on rows not purged, whose `status` is active or revoked).
_PRESENTED_ORDER = (
    ConnectionStatus.DELETED,
    ConnectionStatus.REVOKED,
    ConnectionStatus.SUSPENDED,
    ConnectionStatus.EXPIRED,
)
_COUNT_BY_TYPE_AND_STATUS = (
    "SELECT type, CASE "  # noqa: S608
    + " ".join(f"WHEN {STATUS_WHERE[status]} THEN '{status.value}'" for status in _PRESENTED_ORDER)
    + " ELSE 'active' END AS state, COUNT(*) AS n FROM connections WHERE purged_at IS NULL GROUP BY 1, 2"
)


def _update_args(record: ConnectionRecord, expected_version: int) -> list[Any]:
    values = dict(zip(_TABLE.columns, _TABLE.params(record), strict=True))
    return [*(values[col] for col in _UPDATE_VALUES), record.tenant, record.id, expected_version]


class Connections(EngineStore):
    """The connection rows and what hangs off them; the contracts are `protocols.ConnectionStore`'s."""

    async def count_connections(self) -> dict[tuple[str, str], int]:
        rows = await self._engine.fetch(_COUNT_BY_TYPE_AND_STATUS)
        return {(row["type"], row["state"]): int(row["n"]) for row in rows}

    async def create_connection(self, record: ConnectionRecord, event: AuditEvent) -> None:
        try:
            async with self._engine.transaction() as tx:
                await tx.execute(_TABLE.insert, *_TABLE.params(record))
                await _write_labels(tx, record)
                await self._insert_audit(tx, [event])
        except Duplicate as exc:
            _raise_conflict(exc, record)
            raise

    async def get_connection(self, tenant: str, connection_id: str) -> ConnectionRecord | None:
        rows = await self._engine.fetch_by_key(_BY_ID, tenant, connection_id)
        return _TABLE.from_row(rows[0]) if rows else None

    async def get_connection_with_grant(
        self, tenant: str, connection_id: str, principal: str
    ) -> tuple[ConnectionRecord | None, Grant | None]:
        rows = await self._engine.fetch_by_key(_BY_ID_WITH_GRANT, principal, tenant, connection_id)
        if not rows:
            return None, None
        row = rows[0]
        if row["grant_principal"] is None:
            return _TABLE.from_row(row), None
        grant = codec.GRANTS.from_row({col: row[f"grant_{col}"] for col in codec.GRANTS.columns})
        return _TABLE.from_row(row), grant

    async def find_connection_by_name(self, tenant: str, name: str) -> ConnectionRecord | None:
        rows = await self._engine.fetch_by_key(_BY_LIVE_NAME, tenant, name)
        return _TABLE.from_row(rows[0]) if rows else None

    async def list_connections(
        self, tenant: str, filter: ConnectionFilter, limit: int, after_id: str | None
    ) -> list[ConnectionRecord]:
        """Up to `limit` connections by id (byte order), every filter applied in SQL."""
        where = Where("tenant = ?", tenant)
        where.add(STATUS_WHERE[filter.status])
        where.equals("type", filter.type)
        where.equals("provider", filter.provider)
        if filter.name_prefix:
            # substr, not LIKE: no wildcards to escape, and case-sensitive on both engines.
            where.add("substr(name, 1, ?) = ?", len(filter.name_prefix), filter.name_prefix)
        for key, value in sorted(filter.labels.items()):
            where.add(
                "EXISTS (SELECT 1 FROM connection_labels l WHERE l.tenant = connections.tenant"
                " AND l.connection_id = connections.id AND l.key = ? AND l.value = ?)",
                key,
                value,
            )
        if after_id is not None:
            where.add("id > ?", after_id)
        sql, args = where.page(_TABLE.select, "id", limit)
        return [_TABLE.from_row(row) for row in await self._engine.fetch(sql, *args)]

    async def replace_connection(
        self, record: ConnectionRecord, expected_version: int, event: AuditEvent, *, drop_grants: bool = False
    ) -> None:
        """Compare-and-swap on the version: all or nothing with `event` (see `broker.store.postgres`
        for what makes it one on several replicas)."""
        if record.version <= expected_version:
            raise ValueError("a replaced connection needs a version above the expected one")
        try:
            async with self._engine.transaction() as tx:
                # The replaced secret version is remembered (not its ciphertext) for Resolve.
                await tx.execute(
                    "INSERT INTO secret_versions (tenant, connection_id, secret_version, superseded_at)"
                    " SELECT tenant, id, secret_version, ? FROM connections"
                    " WHERE tenant = ? AND id = ? AND version = ? AND secret_version < ?"
                    " ON CONFLICT DO NOTHING",
                    codec.to_micros(record.updated_at),
                    record.tenant,
                    record.id,
                    expected_version,
                    record.secret_version,
                )
                if await tx.execute(_UPDATE, *_update_args(record, expected_version)) == 0:
                    found = await tx.fetchval(
                        "SELECT 1 FROM connections WHERE tenant = ? AND id = ?", record.tenant, record.id
                    )
                    if found is None:
                        raise NotFound(f"connection {record.id} not found")
                    # Said so whether or not the caller sent an etag: another write came in between.
                    raise Aborted(
                        "the connection changed since it was read (another write came first); read it again"
                        " and retry"
                    )
                await _write_labels(tx, record)
                if drop_grants:
                    await tx.execute(
                        "DELETE FROM grants WHERE tenant = ? AND connection_id = ?", record.tenant, record.id
                    )
                await tx.changed(changes.connection_changed(record.tenant, record.id))
                await self._insert_audit(tx, [event])
        except Duplicate as exc:
            _raise_conflict(exc, record)
            raise

    async def record_last_used(self, uses: Sequence[tuple[str, str, datetime]]) -> None:
        if not uses:
            return
        # Rows are locked in key order, so two replicas flushing overlapping sets cannot deadlock.
        rows = sorted((tenant, cid, codec.to_micros(when)) for tenant, cid, when in uses)
        async with self._engine.transaction() as tx:
            await tx.executemany(
                "UPDATE connections SET last_used_at = ? WHERE tenant = ? AND id = ?"
                " AND (last_used_at IS NULL OR last_used_at < ?)",
                [(micros, tenant, cid, micros) for tenant, cid, micros in rows],
            )

    async def record_test_result(
        self, tenant: str, connection_id: str, result: TestResult, event: AuditEvent
    ) -> None:
        if result.tested_at is None:
            raise ValueError("a recorded test result needs tested_at")
        status = TestStatus.SUCCESS if result.success else TestStatus.FAILED
        recorded = await self._write(
            "UPDATE connections SET last_tested_at = ?, test_status = ?, last_test = ?"
            " WHERE tenant = ? AND id = ? AND purged_at IS NULL",
            codec.to_micros(result.tested_at),
            status.value,
            codec.test_result_text(result),
            tenant,
            connection_id,
            events=[event],
        )
        if recorded == 0:
            raise NotFound(f"connection {connection_id} not found")

    async def replace_mcp_tools(
        self,
        tenant: str,
        connection_id: str,
        tools: Sequence[McpTool],
        discovered_at: datetime,
        event: AuditEvent | None,
    ) -> None:
        when = codec.to_micros(discovered_at)
        try:
            async with self._engine.transaction() as tx:
                await tx.execute(
                    "DELETE FROM mcp_tools WHERE tenant = ? AND connection_id = ?", tenant, connection_id
                )
                await tx.executemany(
                    _INSERT_MCP_TOOL,
                    [(tenant, connection_id, *codec.MCP_TOOLS.params(t), when) for t in tools],
                )
                if event is not None:
                    await self._insert_audit(tx, [event])
        except MissingParent as exc:
            raise NotFound(f"connection {connection_id} not found") from exc

    async def list_mcp_tools(self, tenant: str, connection_id: str) -> tuple[list[McpTool], datetime | None]:
        rows = await self._engine.fetch(_MCP_TOOLS_OF, tenant, connection_id)
        when = codec.from_micros(rows[0]["discovered_at"]) if rows else None
        return [codec.MCP_TOOLS.from_row(row) for row in rows], when

    async def list_expiring_tokens(
        self, before: datetime, limit: int, after: datetime | None = None
    ) -> list[tuple[str, str]]:
        check_limit(limit)
        rows = await self._engine.fetch(
            f"SELECT tenant, id FROM connections WHERE {STATUS_WHERE[ConnectionStatus.ACTIVE]}"  # noqa: S608
            " AND secret_expires_at IS NOT NULL AND secret_expires_at < ? AND secret_expires_at >= ?"
            " ORDER BY secret_expires_at LIMIT ?",
            codec.to_micros(before),
            codec.to_micros(after) if after is not None else 0,
            limit,
        )
        return [(row["tenant"], row["id"]) for row in rows]


async def _write_labels(tx: Tx, record: ConnectionRecord) -> None:
    await tx.execute(
        "DELETE FROM connection_labels WHERE tenant = ? AND connection_id = ?", record.tenant, record.id
    )
    await tx.executemany(
        "INSERT INTO connection_labels (tenant, connection_id, key, value) VALUES (?, ?, ?, ?)",
        [(record.tenant, record.id, k, v) for k, v in sorted(record.labels.items())],
    )


def _raise_conflict(exc: Duplicate, record: ConnectionRecord) -> None:
    """Raise the domain error for a uniqueness violation on connections; return for any other."""
    if exc.constraint in _NAME_TAKEN:
        raise AlreadyExists(f"a connection named '{record.name}' already exists") from exc
    if exc.constraint in _ID_TAKEN:
        raise AlreadyExists(f"connection {record.id} already exists") from exc
