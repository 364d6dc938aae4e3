"""Lifecycle and plumbing of `PostgresStore`: the pools, the change listener, the refresh lock,
transactions, reads, and the one place audit rows are written. The concurrency model is
described in `broker.store.postgres`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any

import asyncpg

from broker.errors import Unavailable
from broker.model import AuditEvent
from broker.store import _chain as chain
from broker.store import _codec as codec
from broker.store import _pg_changes as changes
from broker.store._pg_migrate import AUDIT_LOCK, REFRESH_LOCK_CLASS, apply_postgres, load_postgres_migrations
from broker.store.protocols import ChangeSink

# Statements are assembled from the constant column lists in `_codec`, never from input.
_AUDIT_INSERT = (
    f"INSERT INTO audit_events (id, {', '.join(codec.AUDIT_COLUMNS)}, prev_hash, hash) "  # noqa: S608
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(codec.AUDIT_COLUMNS) + 4))})"
)
_CHECKPOINT_SELECT = "SELECT last_id, last_hash FROM audit_checkpoints ORDER BY last_id DESC LIMIT 1"

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


class PostgresBase:
    """The pools and their plumbing, which every part of `PostgresStore` builds on."""

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

    async def announce_block(self, tenant: str, principal: str, until: float) -> None:
        """NOTIFY the other replicas (and this one's own listener, harmlessly) of a block."""
        async with self._transaction() as conn:
            await changes.notify(conn, changes.principal_blocked(tenant, principal, until))

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
        until commit, and a holder must never wait for a row lock (see `broker.store.postgres`).
        """
        await conn.execute("SELECT pg_advisory_xact_lock($1)", AUDIT_LOCK)
        # READ COMMITTED: this statement's snapshot is taken after the lock was granted,
        # so it sees the previous holder's committed events.
        last_id, last_hash = await _chain_tail(conn)
        await conn.executemany(_AUDIT_INSERT, chain.linked_rows(events, last_id, last_hash))


async def _chain_tail(conn: asyncpg.Connection) -> tuple[int, str]:
    """(id, hash) of the newest event, else of the newest checkpoint, else (0, GENESIS)."""
    row = await conn.fetchrow("SELECT id, hash FROM audit_events ORDER BY id DESC LIMIT 1")
    if row is not None:
        return int(row["id"]), str(row["hash"] or "")
    row = await conn.fetchrow(_CHECKPOINT_SELECT)
    if row is not None:
        return int(row["last_id"]), str(row["last_hash"])
    return 0, chain.GENESIS


def _row_count(status: str) -> int:
    """Rows touched, from a command tag such as `UPDATE 1` or `DELETE 0`."""
    return int(status.rpartition(" ")[2] or 0)
