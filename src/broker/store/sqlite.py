"""The embedded SQLite backend of the `Store` protocol (aiosqlite).

One writer connection, serialised by an `asyncio.Lock`, runs every change as
`BEGIN IMMEDIATE ... COMMIT` (rolled back on any exception, so a change and
its audit event land together or not at all). A second, query-only connection
serves reads; WAL lets it read while the writer writes. `secure_delete` zeroes
freed space, so a purged wrapped data key does not linger in the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from broker import tokenbucket
from broker.crypto import Sealed
from broker.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound, Unavailable
from broker.model import (
    AuditChainReport,
    AuditEvent,
    AuditFilter,
    ConnectionFilter,
    ConnectionRecord,
    Grant,
    GrantFilter,
    McpTool,
    PendingAuthorization,
    SecurityEvent,
    SecurityEventFilter,
    SeenFact,
    TestResult,
    TestStatus,
)
from broker.store import _chain as chain
from broker.store import _codec as codec
from broker.store import _sql
from broker.store._migrate import apply_sqlite, load_migrations
from broker.store.base import ChangeSink, WrappedDek

if TYPE_CHECKING:
    from broker.store.base import Store

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
_GRANT_SELECT = "SELECT " + ", ".join(codec.GRANT_COLUMNS) + " FROM grants"  # noqa: S608
_GRANT_UPSERT = (
    f"INSERT INTO grants ({', '.join(codec.GRANT_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?) "  # noqa: S608
    "ON CONFLICT (tenant, connection_id, principal) DO UPDATE SET "
    "created_at = excluded.created_at, created_by = excluded.created_by, expires_at = excluded.expires_at"
)
_AUDIT_SELECT = (
    "SELECT id, " + ", ".join(codec.AUDIT_COLUMNS) + ", prev_hash, hash FROM audit_events"  # noqa: S608
)
# The id is given, not assigned: it is part of the hashed form, computed before the insert.
_AUDIT_INSERT = (
    f"INSERT INTO audit_events (id, {', '.join(codec.AUDIT_COLUMNS)}, prev_hash, hash) "  # noqa: S608
    f"VALUES (?, {', '.join('?' for _ in codec.AUDIT_COLUMNS)}, ?, ?)"
)
_AUDIT_PAGE = 1000

_SECURITY_EVENT_SELECT = "SELECT id, " + ", ".join(codec.SECURITY_EVENT_COLUMNS) + " FROM security_events"  # noqa: S608
_SECURITY_EVENT_INSERT = (
    f"INSERT INTO security_events ({', '.join(codec.SECURITY_EVENT_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in codec.SECURITY_EVENT_COLUMNS)})"
)
_OAUTH_STATE_SELECT = "SELECT * FROM oauth_states WHERE state_hash = ? AND tenant = ? AND actor = ?"
_OAUTH_STATE_DELETE = "DELETE FROM oauth_states WHERE state_hash = ? AND tenant = ? AND actor = ?"


class SqliteStore:
    """`Store` on one SQLite file; see the module docstring for the connection layout."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        # Verifying and pruning the audit chain exclude each other: a prune under a
        # running verification would look like deleted events.
        self._chain_lock = asyncio.Lock()

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create the file (mode 0600) if needed, set the pragmas and apply pending migrations."""
        if self._writer is not None:
            raise RuntimeError("the store is already open")
        _create_private_file(self.path)
        writer = await self._connect()
        try:
            mode = await _pragma(writer, "journal_mode = WAL")
            if str(mode).lower() != "wal":
                raise RuntimeError(f"SQLite refused WAL mode for {self.path} (got {mode!r})")
            await _pragma(writer, "synchronous = FULL")
            # Zero freed space, so a purged wrapped data key does not survive in a free page.
            if await _pragma(writer, "secure_delete = ON") != 1:
                raise RuntimeError("SQLite refused secure_delete")
            await apply_sqlite(writer, load_migrations())
            await _backfill_audit_chain(writer)
            reader = await self._connect()
        except BaseException:
            await writer.close()
            raise
        try:
            await _pragma(reader, "query_only = ON")
        except BaseException:
            await reader.close()
            await writer.close()
            raise
        self._writer, self._reader = writer, reader

    async def _connect(self) -> aiosqlite.Connection:
        # isolation_level=None: the sqlite3 module starts no transactions of its own.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await _pragma(conn, f"busy_timeout = {int(self._busy_timeout_ms)}")
            await _pragma(conn, "foreign_keys = ON")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
        """Wait for the transaction in flight, then close both connections."""
        async with self._write_lock:
            writer, reader = self._writer, self._reader
            self._writer = self._reader = None
            try:
                if reader is not None:
                    await reader.close()
            finally:
                if writer is not None:
                    await writer.close()

    async def watch(self, sink: ChangeSink) -> None:
        """Nothing to watch: this process is the file's only writer, and tells its cache itself."""
        sink.changes_seen()

    def refresh_lock(self, tenant: str, connection_id: str) -> AbstractAsyncContextManager[None]:
        """No lock needed: one process, which already runs one refresh per connection at a time."""
        return contextlib.nullcontext()

    async def take_rate_token(self, kind: str, principal: str, rate_per_second: float, burst: int) -> float:
        """Read, refill, take and write back under the write lock (one writer: atomic)."""
        async with self._transaction() as conn:
            now = time.time()
            cursor = await conn.execute(
                "SELECT tokens, updated_at FROM rate_buckets WHERE kind = ? AND principal = ?",
                (kind, principal),
            )
            row = await cursor.fetchone()
            tokens, updated = (row[0], row[1]) if row is not None else (float(burst), now)
            tokens, wait = tokenbucket.take(tokens, updated, now, rate_per_second, burst)
            await conn.execute(
                "INSERT INTO rate_buckets (kind, principal, tokens, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (kind, principal) DO UPDATE SET tokens = excluded.tokens,"
                " updated_at = excluded.updated_at",
                (kind, principal, tokens, now),
            )
        return wait

    async def count_connections(self) -> dict[tuple[str, str], int]:
        """Connections (not purged) by (type, status as admins see it), across tenants."""
        rows = await self._read(_sql.COUNT_BY_TYPE_AND_STATUS, ())
        return {(row["type"], row["state"]): int(row["n"]) for row in rows}

    async def ping(self) -> None:
        """Raise if the reader cannot answer `SELECT 1`."""
        await self._read("SELECT 1", ())

    # -------------------------------------------------------------- plumbing

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """`BEGIN IMMEDIATE` on the writer; COMMIT on success, ROLLBACK on any exception."""
        async with self._write_lock:
            conn = self._writer
            if conn is None:
                raise RuntimeError("the store is not open")
            try:
                await conn.execute("BEGIN IMMEDIATE")
                yield conn
                await conn.commit()
            except BaseException as exc:
                # Shielded so a cancelled caller still leaves the connection clean;
                # rollback() is a no-op when no transaction is open.
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.rollback())
                if _is_busy(exc):
                    raise Unavailable("the database is busy; retry shortly") from exc
                raise

    async def _read(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        conn = self._reader
        if conn is None:
            raise RuntimeError("the store is not open")
        try:
            return list(await conn.execute_fetchall(sql, params))
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise Unavailable("the database is busy; retry shortly") from exc
            raise

    @staticmethod
    async def _insert_audit(conn: aiosqlite.Connection, events: Iterable[AuditEvent]) -> None:
        """Append events to the hash chain; the one place audit rows are written.

        Runs inside the caller's write transaction, whose lock fixes the order: each
        event gets the next id and links to the hash of the event before it.
        """
        last_id, last_hash = await _chain_tail(conn)
        params = []
        for event in events:
            last_id += 1
            linked = replace(event, id=last_id, prev_hash=last_hash)
            last_hash = chain.event_hash(linked)
            params.append((last_id, *codec.audit_params(linked), linked.prev_hash, last_hash))
        await conn.executemany(_AUDIT_INSERT, params)

    @staticmethod
    async def _write_labels(conn: aiosqlite.Connection, record: ConnectionRecord) -> None:
        await conn.execute(
            "DELETE FROM connection_labels WHERE tenant = ? AND connection_id = ?", (record.tenant, record.id)
        )
        await conn.executemany(
            _LABEL_INSERT, [(record.tenant, record.id, k, v) for k, v in sorted(record.labels.items())]
        )

    # ------------------------------------------------------------------ meta

    async def get_meta(self, key: str) -> bytes | None:
        """A broker-wide value, or None."""
        rows = await self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return bytes(rows[0]["value"]) if rows else None

    async def put_meta(self, key: str, value: bytes) -> None:
        """Insert or replace a broker-wide value."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    async def kek_ids_in_use(self) -> set[str]:
        """Ids of the master keys that wrap a stored data key, across all tenants."""
        rows = await self._read(
            "SELECT kek_id FROM connections WHERE kek_id IS NOT NULL UNION SELECT kek_id FROM oauth_states",
            (),
        )
        return {row["kek_id"] for row in rows}

    # ----------------------------------------------------------- connections

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
        _check_limit(limit)
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
        _check_limit(limit)
        rows = await self._read(
            "SELECT tenant, id FROM connections WHERE secret_expires_at IS NOT NULL AND secret_expires_at < ?"
            " AND deleted_at IS NULL AND status = 'active' AND reauth_required_at IS NULL"
            " AND suspended_at IS NULL ORDER BY secret_expires_at LIMIT ?",
            (codec.to_micros(before), limit),
        )
        return [(row["tenant"], row["id"]) for row in rows]

    # ----------------------------------------------------------------- oauth

    async def put_oauth_state(self, pending: PendingAuthorization, event: AuditEvent) -> None:
        """Store a pending authorization-code flow and its audit event."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO oauth_states (state_hash, tenant, actor, connection_id, created_at, expires_at,"
                " ciphertext, wrapped_dek, kek_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                codec.oauth_state_params(pending),
            )
            await self._insert_audit(conn, [event])

    async def take_oauth_state(self, state_hash: str, tenant: str, actor: str) -> PendingAuthorization | None:
        """Remove and return the caller's pending flow: a state can be used once, by its owner."""
        key = (state_hash, tenant, actor)
        async with self._transaction() as conn:
            rows = list(await conn.execute_fetchall(_OAUTH_STATE_SELECT, key))
            if not rows:
                return None
            await conn.execute(_OAUTH_STATE_DELETE, key)
        return codec.oauth_state_from_row(rows[0])

    async def delete_expired_oauth_states(self, now: datetime) -> int:
        """Forget flows that were never completed; returns how many."""
        async with (
            self._transaction() as conn,
            conn.execute("DELETE FROM oauth_states WHERE expires_at <= ?", (codec.to_micros(now),)) as cursor,
        ):
            return int(cursor.rowcount)

    # -------------------------------------------------------------- security

    async def add_security_event(self, event: SecurityEvent) -> SecurityEvent:
        """Store a security event; returns it with the id the database gave it."""
        params = codec.security_event_params(event)
        async with self._transaction() as conn, conn.execute(_SECURITY_EVENT_INSERT, params) as cursor:
            event_id = cursor.lastrowid
        return replace(event, id=int(event_id or 0))

    async def list_security_events(
        self, tenant: str, filter: SecurityEventFilter, limit: int, before_id: int | None
    ) -> list[SecurityEvent]:
        """Up to `limit` of the tenant's events, newest first, with id < before_id when given."""
        _check_limit(limit)
        arg = _sql.Params(numbered=False)
        where = _sql.event_where(
            arg, tenant, _sql.security_equals(filter), filter.start_time, filter.end_time
        )
        if before_id is not None:
            where.append(f"id < {arg(before_id)}")
        statement = (
            f"{_SECURITY_EVENT_SELECT} WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT {arg(limit)}"
        )
        rows = await self._read(statement, arg.values)
        return [codec.security_event_from_row(row) for row in rows]

    async def remember_seen(self, facts: Sequence[SeenFact], keep: int) -> None:
        """Insert new facts (existing ones keep their first_seen), then trim each subject to `keep`."""
        if not facts:
            return
        _check_limit(keep)
        async with self._transaction() as conn:
            await conn.executemany(
                "INSERT INTO monitor_seen (tenant, kind, subject, object, first_seen) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, kind, subject, object) DO NOTHING",
                [(f.tenant, f.kind, f.subject, f.object, codec.to_micros(f.first_seen)) for f in facts],
            )
            subjects = sorted({(f.tenant, f.kind, f.subject) for f in facts})
            await conn.executemany(
                "DELETE FROM monitor_seen WHERE tenant = ? AND kind = ? AND subject = ? AND object NOT IN"
                " (SELECT object FROM monitor_seen WHERE tenant = ? AND kind = ? AND subject = ?"
                " ORDER BY first_seen DESC, object LIMIT ?)",
                [(*key, *key, keep) for key in subjects],
            )

    async def load_seen(self, limit: int) -> list[SeenFact]:
        """Up to `limit` remembered facts, newest first."""
        _check_limit(limit)
        rows = await self._read(
            "SELECT tenant, kind, subject, object, first_seen FROM monitor_seen"
            " ORDER BY first_seen DESC LIMIT ?",
            (limit,),
        )
        return [codec.seen_fact_from_row(row) for row in rows]

    # ---------------------------------------------------------------- grants

    async def put_grant(self, grant: Grant, event: AuditEvent) -> None:
        """Insert or replace the grant and write `event`; `NotFound` when the connection is unknown."""
        params = codec.grant_params(grant)
        try:
            async with self._transaction() as conn:
                await conn.execute(_GRANT_UPSERT, params)
                await self._insert_audit(conn, [event])
        except sqlite3.IntegrityError as exc:
            if "FOREIGN KEY" in str(exc):
                raise NotFound(f"connection {grant.connection_id} not found") from exc
            raise

    async def delete_grant(self, tenant: str, connection_id: str, principal: str, event: AuditEvent) -> bool:
        """Delete one grant and write `event`; False and nothing written when there was none."""
        async with self._transaction() as conn:
            async with conn.execute(
                "DELETE FROM grants WHERE tenant = ? AND connection_id = ? AND principal = ?",
                (tenant, connection_id, principal),
            ) as cursor:
                deleted = cursor.rowcount
            if deleted == 0:
                return False
            await self._insert_audit(conn, [event])
        return True

    async def get_grant(self, tenant: str, connection_id: str, principal: str) -> Grant | None:
        """The grant, expired or not, or None."""
        rows = await self._read(
            _GRANT_SELECT + " WHERE tenant = ? AND connection_id = ? AND principal = ?",
            (tenant, connection_id, principal),
        )
        return codec.grant_from_row(rows[0]) if rows else None

    async def list_grants(
        self, tenant: str, filter: GrantFilter, limit: int, after: tuple[str, str] | None
    ) -> list[Grant]:
        """Up to `limit` grants ordered by (connection_id, principal), after that pair when given."""
        _check_limit(limit)
        where = ["tenant = ?"]
        params: list[Any] = [tenant]
        if filter.connection_id:
            where.append("connection_id = ?")
            params.append(filter.connection_id)
        if filter.principal:
            where.append("principal = ?")
            params.append(filter.principal)
        if after is not None:
            where.append("(connection_id > ? OR (connection_id = ? AND principal > ?))")
            params += [after[0], after[0], after[1]]
        sql = f"{_GRANT_SELECT} WHERE {' AND '.join(where)} ORDER BY connection_id, principal LIMIT ?"
        rows = await self._read(sql, [*params, limit])
        return [codec.grant_from_row(row) for row in rows]

    # ----------------------------------------------------------------- audit

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        """Append the batch in one transaction: one commit, one fsync."""
        if not events:
            return
        async with self._transaction() as conn:
            await self._insert_audit(conn, events)

    async def list_audit(
        self, tenant: str, filter: AuditFilter, limit: int, before_id: int | None
    ) -> list[AuditEvent]:
        """Up to `limit` events, newest first, with id < before_id when given."""
        _check_limit(limit)
        arg = _sql.Params(numbered=False)
        where = _sql.event_where(arg, tenant, _sql.audit_equals(filter), filter.start_time, filter.end_time)
        if before_id is not None:
            where.append(f"id < {arg(before_id)}")
        statement = f"{_AUDIT_SELECT} WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT {arg(limit)}"
        rows = await self._read(statement, arg.values)
        return [codec.audit_from_row(row) for row in rows]

    async def export_audit(
        self, tenant: str, filter: AuditFilter, limit: int, after_id: int | None
    ) -> list[AuditEvent]:
        """Up to `limit` events, oldest first, with id > after_id when given."""
        _check_limit(limit)
        arg = _sql.Params(numbered=False)
        where = _sql.event_where(arg, tenant, _sql.audit_equals(filter), filter.start_time, filter.end_time)
        if after_id is not None:
            where.append(f"id > {arg(after_id)}")
        statement = f"{_AUDIT_SELECT} WHERE {' AND '.join(where)} ORDER BY id LIMIT {arg(limit)}"
        rows = await self._read(statement, arg.values)
        return [codec.audit_from_row(row) for row in rows]

    async def verify_audit_chain(self) -> AuditChainReport:
        """Walk the chain from the newest checkpoint in pages of `_AUDIT_PAGE` (bounded memory)."""
        async with self._chain_lock:
            start = await self._read(_CHECKPOINT_SELECT, ())
            after, expected = (start[0]["last_id"], start[0]["last_hash"]) if start else (0, chain.GENESIS)
            walk = chain.ChainWalk(expected)
            while walk.ok:
                rows = await self._read(
                    f"{_AUDIT_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (after, _AUDIT_PAGE)
                )
                for row in rows:
                    if not _check_row(walk, row):
                        break
                if len(rows) < _AUDIT_PAGE:
                    break
                after = rows[-1]["id"]
        return AuditChainReport(walk.ok, walk.checked, walk.broken_id, walk.problem)

    async def prune_audit(self, before: datetime, now: datetime, batch_size: int = 1000) -> int:
        """Delete the oldest events before `before`, batch by batch, each with its checkpoint."""
        _check_limit(batch_size)
        cutoff = codec.to_micros(before)
        pruned = 0
        run_id: int | None = None
        async with self._chain_lock:
            while True:
                async with self._transaction() as conn:
                    start = list(await conn.execute_fetchall(_CHECKPOINT_SELECT))
                    after, expected = (
                        (start[0]["last_id"], start[0]["last_hash"]) if start else (0, chain.GENESIS)
                    )
                    rows = list(
                        await conn.execute_fetchall(
                            f"{_AUDIT_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (after, batch_size)
                        )
                    )
                    # A prefix only: the chain must stay contiguous even where times are not monotonic.
                    batch = []
                    for row in rows:
                        if row["time"] >= cutoff:
                            break
                        batch.append(row)
                    if not batch:
                        return pruned
                    walk = chain.ChainWalk(expected)
                    for row in batch:
                        if not _check_row(walk, row):
                            raise FailedPrecondition(
                                f"the audit chain is broken at event {walk.broken_id} ({walk.problem}); "
                                "pruning stopped there so the evidence is kept"
                            )
                    last_id, last_hash = batch[-1]["id"], batch[-1]["hash"]
                    await conn.execute("DELETE FROM audit_events WHERE id <= ?", (last_id,))
                    if run_id is None:
                        async with conn.execute(
                            "INSERT INTO audit_checkpoints (last_id, last_hash, pruned_count, created_at)"
                            " VALUES (?, ?, ?, ?)",
                            (last_id, last_hash, len(batch), codec.to_micros(now)),
                        ) as cursor:
                            run_id = cursor.lastrowid
                    else:
                        await conn.execute(
                            "UPDATE audit_checkpoints SET last_id = ?, last_hash = ?,"
                            " pruned_count = pruned_count + ? WHERE id = ?",
                            (last_id, last_hash, len(batch), run_id),
                        )
                pruned += len(batch)
                if len(batch) < batch_size:
                    return pruned

    # ----------------------------------------------------------- master keys

    async def deks_by_kek(self) -> dict[str, int]:
        """How many stored data keys each master key wraps (connections and pending flows)."""
        rows = await self._read(
            "SELECT kek_id, COUNT(*) AS n FROM (SELECT kek_id FROM connections WHERE kek_id IS NOT NULL"
            " UNION ALL SELECT kek_id FROM oauth_states) GROUP BY kek_id",
            (),
        )
        return {row["kek_id"]: int(row["n"]) for row in rows}

    async def list_deks_not_under(
        self, kek_id: str, limit: int, after: tuple[str, str, str] | None = None
    ) -> list[WrappedDek]:
        """Up to `limit` stored data keys wrapped by another master key, by (kind, tenant, key)."""
        _check_limit(limit)
        cursor = after or ("", "", "")
        rows = await self._read(
            "SELECT * FROM (SELECT 'connection' AS kind, tenant, id AS key, secret_version, ciphertext,"
            " wrapped_dek, kek_id FROM connections WHERE kek_id IS NOT NULL AND kek_id <> ?"
            " UNION ALL SELECT 'oauth_state', tenant, state_hash, 0, ciphertext, wrapped_dek, kek_id"
            " FROM oauth_states WHERE kek_id <> ?) WHERE (kind, tenant, key) > (?, ?, ?)"
            " ORDER BY kind, tenant, key LIMIT ?",
            (kek_id, kek_id, *cursor, limit),
        )
        return [
            WrappedDek(
                kind=row["kind"],
                tenant=row["tenant"],
                key=row["key"],
                secret_version=int(row["secret_version"]),
                sealed=Sealed(bytes(row["ciphertext"]), bytes(row["wrapped_dek"]), row["kek_id"]),
            )
            for row in rows
        ]

    async def rewrap_deks(
        self, rewrapped: Sequence[tuple[WrappedDek, Sealed]], wraps: Mapping[str, int]
    ) -> int:
        """Store re-wrapped keys, each only if its row still holds the key read; one transaction.

        Only wrapped_dek and kek_id change (never the version, the ciphertext or anything
        else); `wraps` is added to the per-key counts in the same transaction. Returns
        how many rows were updated: a row re-sealed or purged meanwhile is left alone.
        """
        updated = 0
        async with self._transaction() as conn:
            for old, new in rewrapped:
                if new.ciphertext != old.sealed.ciphertext:
                    raise ValueError("a re-wrap must keep the ciphertext")
                if old.kind == "connection":
                    sql = (
                        "UPDATE connections SET wrapped_dek = ?, kek_id = ? WHERE tenant = ? AND id = ?"
                        " AND secret_version = ? AND kek_id = ? AND wrapped_dek = ? AND ciphertext = ?"
                    )
                    params: tuple[Any, ...] = (new.wrapped_dek, new.kek_id, old.tenant, old.key)
                    params += (old.secret_version, old.sealed.kek_id, old.sealed.wrapped_dek, new.ciphertext)
                else:
                    sql = (
                        "UPDATE oauth_states SET wrapped_dek = ?, kek_id = ?"
                        " WHERE tenant = ? AND state_hash = ? AND kek_id = ? AND wrapped_dek = ?"
                        " AND ciphertext = ?"
                    )
                    params = (new.wrapped_dek, new.kek_id, old.tenant, old.key)
                    params += (old.sealed.kek_id, old.sealed.wrapped_dek, new.ciphertext)
                async with conn.execute(sql, params) as cursor:
                    updated += cursor.rowcount
            await self._add_wraps(conn, wraps)
        return updated

    async def add_kek_wraps(self, wraps: Mapping[str, int]) -> None:
        """Add to the persisted count of encryptions under each master key."""
        if any(wraps.values()):
            async with self._transaction() as conn:
                await self._add_wraps(conn, wraps)

    @staticmethod
    async def _add_wraps(conn: aiosqlite.Connection, wraps: Mapping[str, int]) -> None:
        await conn.executemany(
            "INSERT INTO kek_wraps (kek_id, wraps) VALUES (?, ?)"
            " ON CONFLICT (kek_id) DO UPDATE SET wraps = wraps + excluded.wraps",
            [(kek_id, n) for kek_id, n in sorted(wraps.items()) if n],
        )

    async def kek_wraps(self) -> dict[str, int]:
        """The persisted count of encryptions under each master key."""
        rows = await self._read("SELECT kek_id, wraps FROM kek_wraps", ())
        return {row["kek_id"]: int(row["wraps"]) for row in rows}

    async def superseded_at(self, tenant: str, connection_id: str, secret_version: int) -> datetime | None:
        """When this secret version of the connection was replaced, if still remembered."""
        rows = await self._read(
            "SELECT superseded_at FROM secret_versions WHERE tenant = ? AND connection_id = ?"
            " AND secret_version = ?",
            (tenant, connection_id, secret_version),
        )
        return codec.from_micros(rows[0]["superseded_at"]) if rows else None

    async def purge_superseded(self, before: datetime) -> int:
        """Forget secret versions replaced before `before`; returns how many."""
        async with (
            self._transaction() as conn,
            conn.execute(
                "DELETE FROM secret_versions WHERE superseded_at < ?", (codec.to_micros(before),)
            ) as cursor,
        ):
            return int(cursor.rowcount)


_CHECKPOINT_SELECT = "SELECT last_id, last_hash FROM audit_checkpoints ORDER BY last_id DESC LIMIT 1"


async def _chain_tail(conn: aiosqlite.Connection) -> tuple[int, str]:
    """(id, hash) of the newest event, else of the newest checkpoint, else (0, GENESIS)."""
    rows = list(await conn.execute_fetchall("SELECT id, hash FROM audit_events ORDER BY id DESC LIMIT 1"))
    if rows:
        return int(rows[0]["id"]), str(rows[0]["hash"] or "")
    rows = list(await conn.execute_fetchall(_CHECKPOINT_SELECT))
    if rows:
        return int(rows[0]["last_id"]), str(rows[0]["last_hash"])
    return 0, chain.GENESIS


def _check_row(walk: chain.ChainWalk, row: sqlite3.Row) -> bool:
    """Feed one stored row to the walk; a row whose fields no longer parse is a break."""
    try:
        event = codec.audit_from_row(row)
    except (ValueError, TypeError, KeyError):
        return walk.unreadable(int(row["id"]))
    return walk.check(event)


async def _backfill_audit_chain(conn: aiosqlite.Connection) -> None:
    """Hash the events written before the chain existed (migration 0004), in one transaction.

    Only while the chain has not begun (no hashed event, no checkpoint): once it has, an
    event without a hash is a break for `verify_audit_chain` to report, never re-hashed.
    """
    begun = await conn.execute_fetchall(
        "SELECT 1 FROM audit_events WHERE hash IS NOT NULL UNION ALL SELECT 1 FROM audit_checkpoints LIMIT 1"
    )
    if list(begun):
        return
    await conn.execute("BEGIN IMMEDIATE")
    try:
        after, prev = 0, chain.GENESIS
        while True:
            rows = list(
                await conn.execute_fetchall(
                    f"{_AUDIT_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (after, _AUDIT_PAGE)
                )
            )
            updates = []
            for row in rows:
                event = replace(codec.audit_from_row(row), prev_hash=prev)
                prev = chain.event_hash(event)
                updates.append((event.prev_hash, prev, event.id))
            await conn.executemany("UPDATE audit_events SET prev_hash = ?, hash = ? WHERE id = ?", updates)
            if len(rows) < _AUDIT_PAGE:
                break
            after = rows[-1]["id"]
        await conn.commit()
    except BaseException:
        await conn.rollback()
        raise


def _create_private_file(path: Path) -> None:
    """Create the database file owner-only before SQLite does (its WAL files copy the mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


async def _pragma(conn: aiosqlite.Connection, assignment: str) -> Any:
    rows = list(await conn.execute_fetchall(f"PRAGMA {assignment}"))
    return rows[0][0] if rows else None


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and getattr(exc, "sqlite_errorname", "").startswith(
        "SQLITE_BUSY"
    )


def _check_limit(limit: int) -> None:
    # SQLite reads a negative LIMIT as "no limit"; never let a bad page size list everything.
    if limit < 1:
        raise ValueError("limit must be at least 1")


def _connection_conflict(exc: sqlite3.IntegrityError, record: ConnectionRecord) -> AlreadyExists | None:
    """The domain error for a uniqueness violation on connections, or None for any other violation."""
    message = str(exc)
    if "UNIQUE" in message and "connections.name" in message:
        return AlreadyExists(f"a connection named '{record.name}' already exists")
    if "UNIQUE" in message and "connections.id" in message:
        return AlreadyExists(f"connection {record.id} already exists")
    return None


if TYPE_CHECKING:

    def _satisfies_protocol(store: SqliteStore) -> Store:
        return store
