"""The PostgreSQL backend of the `Store` protocol (asyncpg), for several broker replicas.

A pool of connections (`pool_min`..`pool_max`). Reads are single statements in
autocommit (READ COMMITTED). Every change runs in one READ COMMITTED transaction,
rolled back on any exception, so a change and its audit event land together or
not at all. Concurrency between replicas rests on these:

* `replace_connection` is a compare-and-swap, `UPDATE ... WHERE version = $n`: a
  concurrent writer of the same row waits for the row lock, re-checks the WHERE
  clause against the committed row and updates nothing (then `Aborted`).
* Audit appends are serialised by a transaction-level advisory lock
  (`pg_advisory_xact_lock(AUDIT_LOCK)`), taken as the last step of every
  transaction that writes an event, so all replicas extend one hash chain with
  contiguous ids. The cost: audited writes of every replica commit one after
  another (the group commit in `service.audit` makes one lock turn per batch, and
  the lock is held only from the append to the commit, one round trip and one
  WAL flush). Because nothing takes a row lock after the advisory lock, a
  transaction holding it never waits for one: no deadlock.
* `take_oauth_state` is a single `DELETE ... RETURNING`: one caller gets the row.
* Writes that change what Resolve serves (a connection row, a grant, re-wrapped keys)
  NOTIFY in their transaction; every replica LISTENs and invalidates its cache
  (`_pg_changes`, which also says what happens while a listener is down).
* An OAuth2 refresh holds a per-connection advisory lock (`refresh_lock`) on a
  session of a separate small pool, so one replica calls the token endpoint.
* Shared rate-limit buckets are rows taken under their row lock, on the server's clock.

Every session carries `application_name` = `broker/<pid>/<use>/<host>` (use: query,
lock or listen), so pg_stat_activity tells replicas, and a replica's sessions, apart.

Purging overwrites the sealed columns with NULL in the UPDATE, as on SQLite. Unlike
SQLite's `secure_delete`, PostgreSQL keeps the old row version in the table until
VACUUM reclaims it (and even then does not zero the space), in the WAL until it is
recycled, and in any base backup or replica. The store does not run VACUUM per
purge: it cannot run in a transaction and would not erase the WAL or backups
anyway. What makes a purged secret unrecoverable on PostgreSQL is cryptographic:
its data key is wrapped by a master key, and rotating that key away (and
destroying it) leaves the lingering bytes useless. See the README.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

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
from broker.store import _pg_changes as changes
from broker.store import _sql
from broker.store._pg_migrate import AUDIT_LOCK, REFRESH_LOCK_CLASS, apply_postgres, load_postgres_migrations
from broker.store.base import ChangeSink, WrappedDek

if TYPE_CHECKING:
    from broker.store.base import Store

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
_GRANT_SELECT = "SELECT " + ", ".join(codec.GRANT_COLUMNS) + " FROM grants"  # noqa: S608
_GRANT_UPSERT = (
    f"INSERT INTO grants ({', '.join(codec.GRANT_COLUMNS)}) VALUES ($1, $2, $3, $4, $5, $6) "  # noqa: S608
    "ON CONFLICT (tenant, connection_id, principal) DO UPDATE SET "
    "created_at = excluded.created_at, created_by = excluded.created_by, expires_at = excluded.expires_at"
)
_AUDIT_SELECT = (
    "SELECT id, " + ", ".join(codec.AUDIT_COLUMNS) + ", prev_hash, hash FROM audit_events"  # noqa: S608
)
_AUDIT_INSERT = (
    f"INSERT INTO audit_events (id, {', '.join(codec.AUDIT_COLUMNS)}, prev_hash, hash) "  # noqa: S608
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(codec.AUDIT_COLUMNS) + 4))})"
)
_AUDIT_PAGE = 1000
_CHECKPOINT_SELECT = "SELECT last_id, last_hash FROM audit_checkpoints ORDER BY last_id DESC LIMIT 1"
_SECURITY_EVENT_SELECT = "SELECT id, " + ", ".join(codec.SECURITY_EVENT_COLUMNS) + " FROM security_events"  # noqa: S608
_SECURITY_EVENT_INSERT = (
    f"INSERT INTO security_events ({', '.join(codec.SECURITY_EVENT_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(codec.SECURITY_EVENT_COLUMNS) + 1))}) RETURNING id"
)

# What a lost or overloaded database looks like; reported as UNAVAILABLE (retry), never
# with the driver's message, which may name the server.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # includes a connection lost mid-call
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, query cancelled or timed out
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # deadlock or serialization failure
    # What a pooled connection whose server backend was just terminated can raise on its next
    # use (seen: "cannot switch to state 11; another operation is in progress").
    asyncpg.exceptions.InternalClientError,
    asyncpg.InterfaceError,
)


def _session_settings(use: str) -> dict[str, str]:
    """How this process's sessions appear in pg_stat_activity: `broker/<pid>/<use>/<host>`.

    So an operator (or a test) can tell replicas, and what each session is for, apart.
    PostgreSQL keeps at most 63 bytes of it; the pid and use come first so they survive.
    """
    name = f"broker/{os.getpid()}/{use}/{socket.gethostname()}"
    return {"application_name": name.encode()[:63].decode(errors="ignore")}


def _refresh_lock_key(tenant: str, connection_id: str) -> int:
    """A 32-bit key per connection; a collision only makes two refreshes take turns."""
    digest = hashlib.blake2b(f"{tenant}\0{connection_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresStore:
    """`Store` on a PostgreSQL database; see the module docstring for the concurrency model."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_min: int = 1,
        pool_max: int = 10,
        command_timeout: float = 30.0,
        heartbeat_seconds: float = 1.0,
    ) -> None:
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ValueError("need 0 <= pool_min <= pool_max and pool_max >= 1")
        self._dsn = dsn
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._command_timeout = command_timeout
        self._heartbeat = heartbeat_seconds
        self._pool: asyncpg.Pool | None = None
        # Sessions that only hold OAuth refresh locks (see `refresh_lock`); opened on demand.
        self._lock_pool: asyncpg.Pool | None = None
        self._listener: changes.Listener | None = None

    def __repr__(self) -> str:
        # The DSN may carry a password: never part of a repr or a log line.
        return f"PostgresStore(pool_min={self._pool_min}, pool_max={self._pool_max})"

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create the pool and apply pending migrations (under the migration advisory lock)."""
        if self._pool is not None:
            raise RuntimeError("the store is already open")
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._pool_min,
                max_size=self._pool_max,
                command_timeout=self._command_timeout,
                server_settings=_session_settings("query"),
            )
        except _UNAVAILABLE as exc:
            raise Unavailable("cannot connect to the PostgreSQL database (storage.url)") from exc
        try:
            async with pool.acquire() as conn:
                await apply_postgres(conn, load_postgres_migrations())
            # min_size 0: no session is opened until a refresh needs a lock.
            self._lock_pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=self._pool_max,
                # Bounds the wait for a lock whose holder is stuck: then Unavailable, not a hang.
                command_timeout=self._command_timeout,
                server_settings=_session_settings("lock"),
            )
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def watch(self, sink: ChangeSink) -> None:
        """LISTEN for other replicas' changes on a session of its own (`_pg_changes`)."""
        if self._listener is not None:
            raise RuntimeError("the store is already watched")

        def connect() -> Any:
            return asyncpg.connect(self._dsn, server_settings=_session_settings("listen"))

        self._listener = changes.Listener(connect, sink, heartbeat_seconds=self._heartbeat)
        await self._listener.start(first_attempt_timeout=5.0)

    @property
    def listener(self) -> changes.Listener | None:
        """The change listener once `watch()` was called (its state: `listening`, `server_pid`)."""
        return self._listener

    async def close(self) -> None:
        """Stop listening; wait for the connections in use to be released, then close the pools."""
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        lock_pool, self._lock_pool = self._lock_pool, None
        if lock_pool is not None:
            await lock_pool.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @contextlib.asynccontextmanager
    async def refresh_lock(self, tenant: str, connection_id: str) -> AsyncIterator[None]:
        """A transaction-level advisory lock on a session of the lock pool, held while the body runs.

        The lock pool is separate from the query pool on purpose: a holder does its
        work (reads, the compare-and-swap write) on the query pool, so holders can never
        use up the sessions they need to finish. Rolling back releases the lock; so does
        the server if this process dies (its session ends).
        """
        if self._lock_pool is None:
            raise RuntimeError("the store is not open")
        async with self._lock_pool.acquire() as conn:
            transaction = conn.transaction()
            try:
                await transaction.start()
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1, $2)",
                    REFRESH_LOCK_CLASS,
                    _refresh_lock_key(tenant, connection_id),
                )
            except _UNAVAILABLE as exc:
                raise Unavailable("the database is unavailable; retry shortly") from exc
            try:
                yield
            finally:
                # A lost session released the lock already; nothing to roll back then.
                with contextlib.suppress(*_UNAVAILABLE):
                    await transaction.rollback()

    async def take_rate_token(self, kind: str, principal: str, rate_per_second: float, burst: int) -> float:
        """Take from the shared bucket under its row lock, on the database server's clock."""
        async with self._transaction() as conn:
            # Insert a full bucket, or lock the existing row (the no-op update) and read it;
            # `now` is read after the lock was granted.
            row = await conn.fetchrow(
                "INSERT INTO rate_buckets (kind, principal, tokens, updated_at)"
                " VALUES ($1, $2, $3, extract(epoch FROM clock_timestamp()))"
                " ON CONFLICT (kind, principal) DO UPDATE SET kind = excluded.kind"
                " RETURNING tokens, updated_at, extract(epoch FROM clock_timestamp())::float8 AS now",
                kind,
                principal,
                float(burst),
            )
            now = row["now"]
            tokens, wait = tokenbucket.take(row["tokens"], row["updated_at"], now, rate_per_second, burst)
            await conn.execute(
                "UPDATE rate_buckets SET tokens = $3, updated_at = $4 WHERE kind = $1 AND principal = $2",
                kind,
                principal,
                tokens,
                now,
            )
        return wait

    async def count_connections(self) -> dict[tuple[str, str], int]:
        """Connections (not purged) by (type, status as admins see it), across tenants."""
        rows = await self._fetch(_sql.COUNT_BY_TYPE_AND_STATUS)
        return {(row["type"], row["state"]): int(row["n"]) for row in rows}

    async def ping(self) -> None:
        """Raise if the database cannot answer `SELECT 1`."""
        await self._fetch("SELECT 1")

    # -------------------------------------------------------------- plumbing

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """One READ COMMITTED transaction on a pooled connection; rolled back on any exception."""
        pool = self._require_pool()
        try:
            async with pool.acquire() as conn, conn.transaction(isolation="read_committed"):
                yield conn
        except _UNAVAILABLE as exc:
            raise Unavailable("the database is unavailable; retry shortly") from exc

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """A read: one statement in autocommit, tried once more on another connection if the first
        one was lost (a read is safe to repeat; the pool drops the dead connection)."""
        pool = self._require_pool()
        try:
            return list(await pool.fetch(sql, *args))
        except _UNAVAILABLE:
            pass
        try:
            return list(await pool.fetch(sql, *args))
        except _UNAVAILABLE as exc:
            raise Unavailable("the database is unavailable; retry shortly") from exc

    @staticmethod
    async def _insert_audit(conn: asyncpg.Connection, events: Iterable[AuditEvent]) -> None:
        """Append events to the hash chain; the one place audit rows are written.

        Always the last statement of its transaction: the advisory lock it takes is held
        until commit, and a holder must never wait for a row lock (see the module docstring).
        """
        await conn.execute("SELECT pg_advisory_xact_lock($1)", AUDIT_LOCK)
        # READ COMMITTED: this statement's snapshot is taken after the lock was granted,
        # so it sees the previous holder's committed events.
        last_id, last_hash = await _chain_tail(conn)
        params = []
        for event in events:
            last_id += 1
            linked = replace(event, id=last_id, prev_hash=last_hash)
            last_hash = chain.event_hash(linked)
            params.append((last_id, *codec.audit_params(linked), linked.prev_hash, last_hash))
        await conn.executemany(_AUDIT_INSERT, params)

    @staticmethod
    async def _write_labels(conn: asyncpg.Connection, record: ConnectionRecord) -> None:
        await conn.execute(
            "DELETE FROM connection_labels WHERE tenant = $1 AND connection_id = $2", record.tenant, record.id
        )
        await conn.executemany(
            "INSERT INTO connection_labels (tenant, connection_id, key, value) VALUES ($1, $2, $3, $4)",
            [(record.tenant, record.id, k, v) for k, v in sorted(record.labels.items())],
        )

    # ------------------------------------------------------------------ meta

    async def get_meta(self, key: str) -> bytes | None:
        """A broker-wide value, or None."""
        rows = await self._fetch("SELECT value FROM meta WHERE key = $1", key)
        return bytes(rows[0]["value"]) if rows else None

    async def put_meta(self, key: str, value: bytes) -> None:
        """Insert or replace a broker-wide value."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                key,
                value,
            )

    async def kek_ids_in_use(self) -> set[str]:
        """Ids of the master keys that wrap a stored data key, across all tenants."""
        rows = await self._fetch(
            "SELECT kek_id FROM connections WHERE kek_id IS NOT NULL UNION SELECT kek_id FROM oauth_states"
        )
        return {row["kek_id"] for row in rows}

    # ----------------------------------------------------------- connections

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
        _check_limit(limit)
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
        _check_limit(limit)
        rows = await self._fetch(
            "SELECT tenant, id FROM connections"
            " WHERE secret_expires_at IS NOT NULL AND secret_expires_at < $1 AND deleted_at IS NULL"
            " AND status = 'active' AND reauth_required_at IS NULL AND suspended_at IS NULL"
            " ORDER BY secret_expires_at LIMIT $2",
            codec.to_micros(before),
            limit,
        )
        return [(row["tenant"], row["id"]) for row in rows]

    # ----------------------------------------------------------------- oauth

    async def put_oauth_state(self, pending: PendingAuthorization, event: AuditEvent) -> None:
        """Store a pending authorization-code flow and its audit event."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO oauth_states (state_hash, tenant, actor, connection_id, created_at, expires_at,"
                " ciphertext, wrapped_dek, kek_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                *codec.oauth_state_params(pending),
            )
            await self._insert_audit(conn, [event])

    async def take_oauth_state(self, state_hash: str, tenant: str, actor: str) -> PendingAuthorization | None:
        """Remove and return the caller's pending flow in one `DELETE ... RETURNING`: single use."""
        rows = await self._fetch(
            "DELETE FROM oauth_states WHERE state_hash = $1 AND tenant = $2 AND actor = $3 RETURNING *",
            state_hash,
            tenant,
            actor,
        )
        return codec.oauth_state_from_row(rows[0]) if rows else None

    async def delete_expired_oauth_states(self, now: datetime) -> int:
        """Forget flows that were never completed; returns how many."""
        async with self._transaction() as conn:
            done = await conn.execute("DELETE FROM oauth_states WHERE expires_at <= $1", codec.to_micros(now))
        return _row_count(done)

    # -------------------------------------------------------------- security

    async def add_security_event(self, event: SecurityEvent) -> SecurityEvent:
        """Store a security event; returns it with the id the database gave it."""
        async with self._transaction() as conn:
            event_id = await conn.fetchval(_SECURITY_EVENT_INSERT, *codec.security_event_params(event))
        return replace(event, id=int(event_id))

    async def list_security_events(
        self, tenant: str, filter: SecurityEventFilter, limit: int, before_id: int | None
    ) -> list[SecurityEvent]:
        """Up to `limit` of the tenant's events, newest first, with id < before_id when given."""
        _check_limit(limit)
        arg = _sql.Params(numbered=True)
        equals = [
            ("rule", filter.rule),
            ("connection_id", filter.connection_id),
            ("principal", filter.principal),
        ]
        where = _sql.event_where(arg, tenant, equals, filter.start_time, filter.end_time)
        if before_id is not None:
            where.append(f"id < {arg(before_id)}")
        sql = f"{_SECURITY_EVENT_SELECT} WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT {arg(limit)}"
        rows = await self._fetch(sql, *arg.values)
        return [codec.security_event_from_row(row) for row in rows]

    async def remember_seen(self, facts: Sequence[SeenFact], keep: int) -> None:
        """Insert new facts (existing ones keep their first_seen), then trim each subject to `keep`."""
        if not facts:
            return
        _check_limit(keep)
        rows = sorted({(f.tenant, f.kind, f.subject, f.object): f for f in facts}.items())
        async with self._transaction() as conn:
            await conn.executemany(
                "INSERT INTO monitor_seen (tenant, kind, subject, object, first_seen)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, kind, subject, object) DO NOTHING",
                [(*key, codec.to_micros(f.first_seen)) for key, f in rows],
            )
            subjects = sorted({(f.tenant, f.kind, f.subject) for f in facts})
            await conn.executemany(
                "DELETE FROM monitor_seen WHERE tenant = $1 AND kind = $2 AND subject = $3 AND object NOT IN"
                " (SELECT object FROM monitor_seen WHERE tenant = $1 AND kind = $2 AND subject = $3"
                " ORDER BY first_seen DESC, object LIMIT $4)",
                [(*key, keep) for key in subjects],
            )

    async def load_seen(self, limit: int) -> list[SeenFact]:
        """Up to `limit` remembered facts, newest first."""
        _check_limit(limit)
        rows = await self._fetch(
            "SELECT tenant, kind, subject, object, first_seen FROM monitor_seen"
            " ORDER BY first_seen DESC LIMIT $1",
            limit,
        )
        return [codec.seen_fact_from_row(row) for row in rows]

    # ---------------------------------------------------------------- grants

    async def put_grant(self, grant: Grant, event: AuditEvent) -> None:
        """Insert or replace the grant and write `event`; `NotFound` when the connection is unknown."""
        try:
            async with self._transaction() as conn:
                await conn.execute(_GRANT_UPSERT, *codec.grant_params(grant))
                await changes.notify(
                    conn, changes.grant_changed(grant.tenant, grant.connection_id, grant.principal)
                )
                await self._insert_audit(conn, [event])
        except asyncpg.ForeignKeyViolationError as exc:
            raise NotFound(f"connection {grant.connection_id} not found") from exc

    async def delete_grant(self, tenant: str, connection_id: str, principal: str, event: AuditEvent) -> bool:
        """Delete one grant and write `event`; False and nothing written when there was none."""
        async with self._transaction() as conn:
            done = await conn.execute(
                "DELETE FROM grants WHERE tenant = $1 AND connection_id = $2 AND principal = $3",
                tenant,
                connection_id,
                principal,
            )
            if _row_count(done) == 0:
                return False
            await changes.notify(conn, changes.grant_changed(tenant, connection_id, principal))
            await self._insert_audit(conn, [event])
        return True

    async def get_grant(self, tenant: str, connection_id: str, principal: str) -> Grant | None:
        """The grant, expired or not, or None."""
        rows = await self._fetch(
            _GRANT_SELECT + " WHERE tenant = $1 AND connection_id = $2 AND principal = $3",
            tenant,
            connection_id,
            principal,
        )
        return codec.grant_from_row(rows[0]) if rows else None

    async def list_grants(
        self, tenant: str, filter: GrantFilter, limit: int, after: tuple[str, str] | None
    ) -> list[Grant]:
        """Up to `limit` grants ordered by (connection_id, principal), after that pair when given."""
        _check_limit(limit)
        arg = _sql.Params(numbered=True)
        where = [f"tenant = {arg(tenant)}"]
        if filter.connection_id:
            where.append(f"connection_id = {arg(filter.connection_id)}")
        if filter.principal:
            where.append(f"principal = {arg(filter.principal)}")
        if after is not None:
            where.append(f"(connection_id, principal) > ({arg(after[0])}, {arg(after[1])})")
        order = f"ORDER BY connection_id, principal LIMIT {arg(limit)}"
        sql = f"{_GRANT_SELECT} WHERE {' AND '.join(where)} {order}"
        rows = await self._fetch(sql, *arg.values)
        return [codec.grant_from_row(row) for row in rows]

    # ----------------------------------------------------------------- audit

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        """Append the batch in one transaction: one commit, one WAL flush, one turn of the audit lock."""
        if not events:
            return
        async with self._transaction() as conn:
            await self._insert_audit(conn, events)

    async def list_audit(
        self, tenant: str, filter: AuditFilter, limit: int, before_id: int | None
    ) -> list[AuditEvent]:
        """Up to `limit` events, newest first, with id < before_id when given."""
        _check_limit(limit)
        arg = _sql.Params(numbered=True)
        where = _sql.event_where(arg, tenant, _sql.audit_equals(filter), filter.start_time, filter.end_time)
        if before_id is not None:
            where.append(f"id < {arg(before_id)}")
        sql = f"{_AUDIT_SELECT} WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT {arg(limit)}"
        rows = await self._fetch(sql, *arg.values)
        return [codec.audit_from_row(row) for row in rows]

    async def export_audit(
        self, tenant: str, filter: AuditFilter, limit: int, after_id: int | None
    ) -> list[AuditEvent]:
        """Up to `limit` events, oldest first, with id > after_id when given."""
        _check_limit(limit)
        arg = _sql.Params(numbered=True)
        where = _sql.event_where(arg, tenant, _sql.audit_equals(filter), filter.start_time, filter.end_time)
        if after_id is not None:
            where.append(f"id > {arg(after_id)}")
        sql = f"{_AUDIT_SELECT} WHERE {' AND '.join(where)} ORDER BY id LIMIT {arg(limit)}"
        rows = await self._fetch(sql, *arg.values)
        return [codec.audit_from_row(row) for row in rows]

    async def verify_audit_chain(self) -> AuditChainReport:
        """Walk the chain in pages inside one REPEATABLE READ, READ ONLY transaction.

        The snapshot holds still while the walk pages through it, so a prune or an
        append by any replica meanwhile cannot look like a break. Appends commit in id
        order under the audit lock, so a snapshot always holds a prefix of the chain.
        """
        pool = self._require_pool()
        try:
            async with (
                pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                start = await conn.fetch(_CHECKPOINT_SELECT)
                after, expected = (
                    (start[0]["last_id"], start[0]["last_hash"]) if start else (0, chain.GENESIS)
                )
                walk = chain.ChainWalk(expected)
                while walk.ok:
                    rows = await conn.fetch(
                        f"{_AUDIT_SELECT} WHERE id > $1 ORDER BY id LIMIT $2", after, _AUDIT_PAGE
                    )
                    for row in rows:
                        if not _check_row(walk, row):
                            break
                    if len(rows) < _AUDIT_PAGE:
                        break
                    after = rows[-1]["id"]
        except _UNAVAILABLE as exc:
            raise Unavailable("the database is unavailable; retry shortly") from exc
        return AuditChainReport(walk.ok, walk.checked, walk.broken_id, walk.problem)

    async def prune_audit(self, before: datetime, now: datetime, batch_size: int = 1000) -> int:
        """Delete the oldest events before `before`, batch by batch, each with its checkpoint.

        Each batch holds the audit lock (appends of every replica wait for it), so the
        chain's tail never moves under a prune; batches keep that wait short.
        """
        _check_limit(batch_size)
        cutoff = codec.to_micros(before)
        pruned = 0
        run_id: int | None = None
        while True:
            async with self._transaction() as conn:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", AUDIT_LOCK)
                start = await conn.fetch(_CHECKPOINT_SELECT)
                after, expected = (
                    (start[0]["last_id"], start[0]["last_hash"]) if start else (0, chain.GENESIS)
                )
                rows = await conn.fetch(
                    f"{_AUDIT_SELECT} WHERE id > $1 ORDER BY id LIMIT $2", after, batch_size
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
                await conn.execute("DELETE FROM audit_events WHERE id <= $1", last_id)
                if run_id is None:
                    run_id = await conn.fetchval(
                        "INSERT INTO audit_checkpoints (last_id, last_hash, pruned_count, created_at)"
                        " VALUES ($1, $2, $3, $4) RETURNING id",
                        last_id,
                        last_hash,
                        len(batch),
                        codec.to_micros(now),
                    )
                else:
                    await conn.execute(
                        "UPDATE audit_checkpoints SET last_id = $1, last_hash = $2,"
                        " pruned_count = pruned_count + $3 WHERE id = $4",
                        last_id,
                        last_hash,
                        len(batch),
                        run_id,
                    )
            pruned += len(batch)
            if len(batch) < batch_size:
                return pruned

    # ----------------------------------------------------------- master keys

    async def deks_by_kek(self) -> dict[str, int]:
        """How many stored data keys each master key wraps (connections and pending flows)."""
        rows = await self._fetch(
            "SELECT kek_id, COUNT(*) AS n FROM (SELECT kek_id FROM connections WHERE kek_id IS NOT NULL"
            " UNION ALL SELECT kek_id FROM oauth_states) AS wrapped GROUP BY kek_id"
        )
        return {row["kek_id"]: int(row["n"]) for row in rows}

    async def list_deks_not_under(
        self, kek_id: str, limit: int, after: tuple[str, str, str] | None = None
    ) -> list[WrappedDek]:
        """Up to `limit` stored data keys wrapped by another master key, by (kind, tenant, key)."""
        _check_limit(limit)
        cursor = after or ("", "", "")
        # COLLATE "C" throughout: byte order, as on SQLite, and one collation for the UNION.
        rows = await self._fetch(
            'SELECT * FROM (SELECT \'connection\' COLLATE "C" AS kind, tenant COLLATE "C" AS tenant,'
            ' id COLLATE "C" AS key, secret_version, ciphertext, wrapped_dek, kek_id FROM connections'
            " WHERE kek_id IS NOT NULL AND kek_id <> $1"
            ' UNION ALL SELECT \'oauth_state\' COLLATE "C", tenant COLLATE "C", state_hash COLLATE "C", 0,'
            " ciphertext, wrapped_dek, kek_id FROM oauth_states WHERE kek_id <> $1) AS wrapped"
            " WHERE (kind, tenant, key) > ($2, $3, $4) ORDER BY kind, tenant, key LIMIT $5",
            kek_id,
            *cursor,
            limit,
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

        A compare-and-swap per row on (kek_id, wrapped_dek, ciphertext), READ COMMITTED:
        a row re-sealed or purged meanwhile (by any replica) no longer matches and is
        left alone. Never changes the version or the ciphertext.
        """
        updated = 0
        async with self._transaction() as conn:
            for old, new in rewrapped:
                if new.ciphertext != old.sealed.ciphertext:
                    raise ValueError("a re-wrap must keep the ciphertext")
                if old.kind == "connection":
                    done = await conn.execute(
                        "UPDATE connections SET wrapped_dek = $1, kek_id = $2 WHERE tenant = $3 AND id = $4"
                        " AND secret_version = $5 AND kek_id = $6 AND wrapped_dek = $7 AND ciphertext = $8",
                        new.wrapped_dek,
                        new.kek_id,
                        old.tenant,
                        old.key,
                        old.secret_version,
                        old.sealed.kek_id,
                        old.sealed.wrapped_dek,
                        new.ciphertext,
                    )
                else:
                    done = await conn.execute(
                        "UPDATE oauth_states SET wrapped_dek = $1, kek_id = $2 WHERE tenant = $3"
                        " AND state_hash = $4 AND kek_id = $5 AND wrapped_dek = $6 AND ciphertext = $7",
                        new.wrapped_dek,
                        new.kek_id,
                        old.tenant,
                        old.key,
                        old.sealed.kek_id,
                        old.sealed.wrapped_dek,
                        new.ciphertext,
                    )
                updated += _row_count(done)
            if updated:
                # Cached records hold the old wrapped keys; one message rather than one per row.
                await changes.notify(conn, changes.everything_changed())
            await self._add_wraps(conn, wraps)
        return updated

    async def add_kek_wraps(self, wraps: Mapping[str, int]) -> None:
        """Add to the persisted count of encryptions under each master key (an atomic increment)."""
        if any(wraps.values()):
            async with self._transaction() as conn:
                await self._add_wraps(conn, wraps)

    @staticmethod
    async def _add_wraps(conn: asyncpg.Connection, wraps: Mapping[str, int]) -> None:
        # Sorted, so replicas adding to the same keys lock the rows in one order.
        await conn.executemany(
            "INSERT INTO kek_wraps (kek_id, wraps) VALUES ($1, $2)"
            " ON CONFLICT (kek_id) DO UPDATE SET wraps = kek_wraps.wraps + excluded.wraps",
            [(kek_id, n) for kek_id, n in sorted(wraps.items()) if n],
        )

    async def kek_wraps(self) -> dict[str, int]:
        """The persisted count of encryptions under each master key."""
        rows = await self._fetch("SELECT kek_id, wraps FROM kek_wraps")
        return {row["kek_id"]: int(row["wraps"]) for row in rows}

    async def superseded_at(self, tenant: str, connection_id: str, secret_version: int) -> datetime | None:
        """When this secret version of the connection was replaced, if still remembered."""
        rows = await self._fetch(
            "SELECT superseded_at FROM secret_versions WHERE tenant = $1 AND connection_id = $2"
            " AND secret_version = $3",
            tenant,
            connection_id,
            secret_version,
        )
        return codec.from_micros(rows[0]["superseded_at"]) if rows else None

    async def purge_superseded(self, before: datetime) -> int:
        """Forget secret versions replaced before `before`; returns how many."""
        async with self._transaction() as conn:
            done = await conn.execute(
                "DELETE FROM secret_versions WHERE superseded_at < $1", codec.to_micros(before)
            )
        return _row_count(done)


async def _chain_tail(conn: asyncpg.Connection) -> tuple[int, str]:
    """(id, hash) of the newest event, else of the newest checkpoint, else (0, GENESIS)."""
    row = await conn.fetchrow("SELECT id, hash FROM audit_events ORDER BY id DESC LIMIT 1")
    if row is not None:
        return int(row["id"]), str(row["hash"] or "")
    row = await conn.fetchrow(_CHECKPOINT_SELECT)
    if row is not None:
        return int(row["last_id"]), str(row["last_hash"])
    return 0, chain.GENESIS


def _check_row(walk: chain.ChainWalk, row: asyncpg.Record) -> bool:
    """Feed one stored row to the walk; a row whose fields no longer parse is a break."""
    try:
        event = codec.audit_from_row(row)
    except (ValueError, TypeError, KeyError):
        return walk.unreadable(int(row["id"]))
    return walk.check(event)


def _row_count(status: str) -> int:
    """Rows touched, from a command tag such as `UPDATE 1` or `DELETE 0`."""
    return int(status.rpartition(" ")[2] or 0)


def _check_limit(limit: int) -> None:
    # The same refusal as on SQLite, where a negative LIMIT would mean "no limit".
    if limit < 1:
        raise ValueError("limit must be at least 1")


def _connection_conflict(exc: asyncpg.UniqueViolationError, record: ConnectionRecord) -> AlreadyExists | None:
    """The domain error for a uniqueness violation on connections, or None for any other violation."""
    constraint = getattr(exc, "constraint_name", None)
    if constraint == "connections_live_name":
        return AlreadyExists(f"a connection named '{record.name}' already exists")
    if constraint == "connections_pkey":
        return AlreadyExists(f"connection {record.id} already exists")
    return None


if TYPE_CHECKING:

    def _satisfies_protocol(store: PostgresStore) -> Store:
        return store
