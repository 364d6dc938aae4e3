"""The PostgreSQL engine (asyncpg): pools, transactions, the change listener and advisory locks.

Statements arrive written for SQLite's syntax where the two differ only in spelling:
`?` placeholders become `$1, $2, ...` and the `BINARY` collation becomes `"C"` (byte
order on both), translated once per statement and cached. The concurrency model is
described in `broker.store.postgres`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import asyncpg

from broker.errors import Unavailable
from broker.store._codec import Row
from broker.store._migrate import load_migrations
from broker.store.changes import deliver
from broker.store.engine import Duplicate, MissingParent
from broker.store.postgres import changes
from broker.store.postgres.migrate import AUDIT_LOCK, REFRESH_LOCK_CLASS, apply_postgres
from broker.store.protocols import ChangeSink

# What a lost or overloaded database looks like; reported as UNAVAILABLE (retry), never
# with the driver's message, which may name the server.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # includes a connection lost mid-call
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, query cancelled or timed out
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # deadlock or serialization failure
    asyncpg.exceptions.PostgresSystemError,  # class 58: the server's I/O failed
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a read-only server (a standby after failover)
    # What a pooled connection whose server backend was just terminated can raise on its next
    # use (seen: "cannot switch to state 11; another operation is in progress").
    asyncpg.exceptions.InternalClientError,
    asyncpg.InterfaceError,
)
_RETRY = "the database is unavailable; retry shortly"
_translated: dict[str, str] = {}


def translate(sql: str) -> str:
    """The statement in PostgreSQL's spelling (see the module docstring); cached."""
    done = _translated.get(sql)
    if done is None:
        numbers = itertools.count(1)
        done = re.sub(r"\?", lambda _: f"${next(numbers)}", sql).replace("COLLATE BINARY", 'COLLATE "C"')
        if len(_translated) > 4096:  # statements are few, but label filters vary: stay bounded
            _translated.clear()
        _translated[sql] = done
    return done


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


class PostgresTx:
    """A transaction on a pooled connection (the `Tx` protocol)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.changes: list[str] = []

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self._conn.execute(translate(sql), *args)
        return int(status.rpartition(" ")[2] or 0)  # the command tag: `UPDATE 1`, `DELETE 0`

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(translate(sql), rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.fetch(translate(sql), *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(translate(sql), *args)

    async def write_from(
        self, query: str, statement: str, rows: Callable[[list[Row]], Iterable[Sequence[Any]]]
    ) -> None:
        await self.executemany(statement, rows(await self.fetch(query)))

    async def changed(self, change: str) -> None:
        await changes.notify(self._conn, change)
        self.changes.append(change)

    async def lock_audit(self) -> None:
        """The audit advisory lock, held until commit; take it last (see `broker.store.postgres`)."""
        await self._conn.execute("SELECT pg_advisory_xact_lock($1)", AUDIT_LOCK)


class PostgresEngine:
    """The `Engine` on a PostgreSQL database; see the module docstring."""

    now_sql = "extract(epoch FROM clock_timestamp())::float8"
    skip_locked_sql = " FOR UPDATE SKIP LOCKED"
    lock_rows_sql = " FOR UPDATE"

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
        self.pool_min, self.pool_max = pool_min, pool_max
        self._command_timeout = command_timeout
        self._heartbeat = heartbeat_seconds
        self._pool: asyncpg.Pool | None = None
        # Sessions that only hold OAuth refresh locks (see `refresh_lock`); opened on demand.
        self._lock_pool: asyncpg.Pool | None = None
        self.listener: changes.Listener | None = None
        self._sink: ChangeSink | None = None

    async def open(self) -> None:
        """Create the pools and apply pending migrations (under the migration advisory lock)."""
        if self._pool is not None:
            raise RuntimeError("the store is already open")
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self.pool_min,
                max_size=self.pool_max,
                command_timeout=self._command_timeout,
                server_settings=_session_settings("query"),
            )
        except _UNAVAILABLE as exc:
            raise Unavailable("cannot connect to the PostgreSQL database (storage.url)") from exc
        try:
            async with pool.acquire() as conn:
                await apply_postgres(conn, load_migrations("postgres"))
            # min_size 0: no session is opened until a refresh needs a lock.
            self._lock_pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=self.pool_max,
                # Bounds the wait for a lock whose holder is stuck: then Unavailable, not a hang.
                command_timeout=self._command_timeout,
                server_settings=_session_settings("lock"),
            )
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        """Stop listening; wait for the connections in use to be released, then close the pools."""
        listener, self.listener = self.listener, None
        if listener is not None:
            await listener.close()
        for pool in (self._lock_pool, self._pool):
            if pool is not None:
                await pool.close()
        self._lock_pool = self._pool = None

    async def watch(self, sink: ChangeSink) -> None:
        """LISTEN for other replicas' changes on a session of its own (`changes.Listener`)."""
        if self.listener is not None:
            raise RuntimeError("the store is already watched")

        def connect() -> Any:
            return asyncpg.connect(self._dsn, server_settings=_session_settings("listen"))

        self._sink = sink
        self.listener = changes.Listener(connect, sink, heartbeat_seconds=self._heartbeat)
        await self.listener.start(first_attempt_timeout=5.0)

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
                raise Unavailable(_RETRY) from exc
            try:
                yield
            finally:
                # A lost session released the lock already; nothing to roll back then.
                with contextlib.suppress(*_UNAVAILABLE):
                    await transaction.rollback()

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        return self._pool

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[PostgresTx]:
        """One READ COMMITTED transaction on a pooled connection; rolled back on any exception."""
        async with (
            self._mapped_errors(),
            self._require_pool().acquire() as conn,
            conn.transaction(isolation="read_committed"),
        ):
            tx = PostgresTx(conn)
            yield tx
        if self._sink is not None:
            # This replica hears its own NOTIFY later too; the sink must know before we return.
            for change in tx.changes:
                deliver(self._sink, change)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[PostgresTx]:
        """A REPEATABLE READ, READ ONLY transaction: one snapshot for all its statements."""
        async with (
            self._mapped_errors(),
            self._require_pool().acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield PostgresTx(conn)

    @staticmethod
    @contextlib.asynccontextmanager
    async def _mapped_errors() -> AsyncIterator[None]:
        try:
            yield
        except asyncpg.UniqueViolationError as exc:
            raise Duplicate(exc.constraint_name or "") from exc
        except asyncpg.ForeignKeyViolationError as exc:
            raise MissingParent(str(exc)) from exc
        except _UNAVAILABLE as exc:
            raise Unavailable(_RETRY) from exc

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """A read: one statement in autocommit, tried once more on another connection if the first
        one was lost (a read is safe to repeat; the pool drops the dead connection)."""
        pool, sql = self._require_pool(), translate(sql)
        try:
            return list(await pool.fetch(sql, *args))
        except _UNAVAILABLE:
            pass
        try:
            return list(await pool.fetch(sql, *args))
        except _UNAVAILABLE as exc:
            raise Unavailable(_RETRY) from exc

    # A read by key is a round trip like any other: asyncpg's own I/O runs on the event loop.
    fetch_by_key = fetch
