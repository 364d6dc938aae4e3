"""The SQLite engine: one writer connection behind an `asyncio.Lock`, one query-only reader, and
one query-only connection on the event loop's own thread for reads by key (`fetch_by_key`).

Every change runs as `BEGIN IMMEDIATE ... COMMIT` on the writer (rolled back on any
exception), its statements batched into as few hops to the writer's thread as their results
allow (`SqliteTx`); WAL lets the reader read meanwhile. Another process may write the same
file (the `broker keys` commands): `BEGIN IMMEDIATE` takes SQLite's own write lock, so its
writes and ours are serialised, and audit appends need no lock of their own (the chain's tail
is read inside the transaction, never kept). A refresh lock is a no-op: only the server
refreshes tokens. Committed changes go straight to the sink, before the write call returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosqlite

from broker.errors import Unavailable
from broker.store import _chain as chain
from broker.store import _codec as codec
from broker.store._codec import Row
from broker.store._migrate import apply_sqlite, load_migrations
from broker.store.changes import deliver
from broker.store.engine import Duplicate, MissingParent
from broker.store.protocols import ChangeSink

# One step for the writer's thread: a statement (or a read and the writes made from it), run on
# the connection; its cursor holds the result.
_Step = Callable[[sqlite3.Connection], sqlite3.Cursor]


def _statement(sql: str, parameters: Any) -> _Step:
    return lambda db: db.execute(sql, parameters)


def _run_steps(db: sqlite3.Connection, steps: list[_Step], fetch: bool) -> Any:
    """On the writer's thread: run `steps` in order; the last one's rows (`fetch`) or rowcount."""
    cursor: sqlite3.Cursor | None = None
    for step in steps:
        cursor = step(db)
    assert cursor is not None
    return cursor.fetchall() if fetch else cursor.rowcount


async def _on_thread(conn: aiosqlite.Connection, steps: list[_Step], fetch: bool) -> Any:
    """Run `steps` in ONE hop to the connection's thread (each hop is a queue, a thread wake-up and
    a loop wake-up). aiosqlite has no public call for several statements at once; `_execute` and
    `_conn` are what its own `Cursor` uses for each of its calls (every SQLite store test runs
    through here, so a release that changed them fails the suite, not production quietly)."""
    return await conn._execute(_run_steps, conn._conn, steps, fetch)  # type: ignore[no-untyped-call]


class SqliteTx:
    """A transaction on the writer connection (the `Tx` protocol).

    Steps whose result nobody reads (`BEGIN IMMEDIATE`, `executemany`, `write_from`) are queued
    and sent with the next statement that returns something, or with the COMMIT: an audit batch
    (BEGIN, the chain's tail and the INSERTs made from it, COMMIT) takes one hop to the writer's
    thread. An error of a queued step therefore surfaces at that later call, inside the same
    transaction, which then rolls back as a whole.
    """

    def __init__(self, conn: aiosqlite.Connection, *, begin: bool = False) -> None:
        self._conn = conn
        self._queued: list[_Step] = [_statement("BEGIN IMMEDIATE", ())] if begin else []
        # Whether anything reached the connection (so a ROLLBACK has something to undo).
        self.sent = False
        self.changes: list[str] = []

    async def _send(self, sql: str, args: Any, fetch: bool) -> Any:
        steps = [*self._queued, _statement(sql, args)]
        self._queued.clear()
        self.sent = True
        return await _on_thread(self._conn, steps, fetch)

    async def execute(self, sql: str, *args: Any) -> int:
        return int(await self._send(sql, args, False))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        parameters = list(rows)
        self._queued.append(lambda db: db.executemany(sql, parameters))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._send(sql, args, True))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None  # type: ignore[index]

    async def write_from(
        self, query: str, statement: str, rows: Callable[[list[Row]], Iterable[Sequence[Any]]]
    ) -> None:
        self._queued.append(lambda db: db.executemany(statement, rows(db.execute(query).fetchall())))

    async def changed(self, change: str) -> None:
        self.changes.append(change)

    async def lock_audit(self) -> None:
        """Nothing to take: the write lock already serialises every transaction."""

    async def commit(self) -> None:
        """Send what is queued and COMMIT, in one hop."""
        await self._send("COMMIT", (), False)


class SqliteEngine:
    """The `Engine` on one SQLite file; see the module docstring."""

    # The system clock to the millisecond (SQLite 3.40 has no `unixepoch('subsec')`).
    now_sql = "((julianday('now') - 2440587.5) * 86400.0)"
    skip_locked_sql = ""  # one writer at a time: nothing to skip
    lock_rows_sql = ""  # nor to wait for

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self.writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._inline: sqlite3.Connection | None = None  # `fetch_by_key`'s, on the event loop's thread
        self._write_lock = asyncio.Lock()
        self._sink: ChangeSink | None = None

    async def open(self) -> None:
        """Create the file (mode 0600) if needed, set the pragmas and apply pending migrations."""
        if self.writer is not None:
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
            await apply_sqlite(writer, load_migrations("sqlite"))
            await _backfill_audit_chain(writer)
            reader = await self._connect(query_only=True)
        except BaseException:
            await writer.close()
            raise
        try:
            inline = self._connect_inline()
        except BaseException:
            await reader.close()
            await writer.close()
            raise
        self.writer, self._reader, self._inline = writer, reader, inline

    def _connect_inline(self) -> sqlite3.Connection:
        """`fetch_by_key`'s connection: read-only, and never waiting for a lock (timeout 0), since a
        wait would stop the event loop; a busy database sends the read to the reader's thread."""
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA query_only = ON")
        return conn

    async def _connect(self, *, query_only: bool = False) -> aiosqlite.Connection:
        # isolation_level=None: the sqlite3 module starts no transactions of its own.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await _pragma(conn, f"busy_timeout = {int(self._busy_timeout_ms)}")
            await _pragma(conn, "foreign_keys = ON")
            if query_only:
                await _pragma(conn, "query_only = ON")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
        """Wait for the transaction in flight, then close every connection."""
        async with self._write_lock:
            writer, reader, inline = self.writer, self._reader, self._inline
            self.writer = self._reader = self._inline = None
            if inline is not None:
                inline.close()
            try:
                if reader is not None:
                    await reader.close()
            finally:
                if writer is not None:
                    await writer.close()

    async def watch(self, sink: ChangeSink) -> None:
        """No other writer to hear from: from now on this process's commits reach `sink`."""
        self._sink = sink
        sink.changes_seen()

    def refresh_lock(self, tenant: str, connection_id: str) -> contextlib.nullcontext[None]:
        """No lock needed: one process, which already runs one refresh per connection at a time."""
        return contextlib.nullcontext()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        """`BEGIN IMMEDIATE` on the writer; COMMIT on success, ROLLBACK on any exception."""
        async with self._write_lock:
            conn = self.writer
            if conn is None:
                raise RuntimeError("the store is not open")
            tx = SqliteTx(conn, begin=True)  # BEGIN IMMEDIATE goes with the first statement sent
            try:
                yield tx
                await tx.commit()
            except BaseException as exc:
                # Shielded so a cancelled caller still leaves the connection clean; rollback() is
                # a no-op when no transaction is open, and not needed when nothing was sent.
                if tx.sent:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.rollback())
                _raise_mapped(exc)
                raise
        if self._sink is not None:
            for change in tx.changes:
                deliver(self._sink, change)

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[SqliteTx]:
        """A read transaction on a connection of its own (WAL keeps its view while others write)."""
        if self.writer is None:
            raise RuntimeError("the store is not open")
        conn = await self._connect(query_only=True)
        try:
            await conn.execute("BEGIN")
            yield SqliteTx(conn)
        except sqlite3.Error as exc:
            _raise_mapped(exc)
            raise
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        conn = self._reader
        if conn is None:
            raise RuntimeError("the store is not open")
        try:
            return list(await conn.execute_fetchall(sql, args))
        except sqlite3.OperationalError as exc:
            _raise_mapped(exc)
            raise

    async def fetch_by_key(self, sql: str, *args: Any) -> list[Row]:
        """Run on the event loop's thread: a read by key from pages the OS has cached takes ~15 us,
        and a hop to the reader's thread (a queue, two thread wake-ups, the loop's self-pipe)
        costs ~150 us of CPU. A busy database (a lock held, a WAL being recovered) is waited for
        on the reader's thread instead, never here."""
        conn = self._inline
        if conn is None:
            raise RuntimeError("the store is not open")
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname.startswith("SQLITE_BUSY"):
                return await self.fetch(sql, *args)
            raise


# What the storage did, not the request: the file cannot be written (a failing or full disk, a
# file made read-only, a directory gone). Retrying later may work; nothing about the call was wrong.
_UNWRITABLE = ("SQLITE_IOERR", "SQLITE_FULL", "SQLITE_READONLY", "SQLITE_CANTOPEN")


def _raise_mapped(exc: BaseException) -> None:
    """Raise the store's error for an SQLite one; return when there is none."""
    if isinstance(exc, sqlite3.OperationalError):
        name = getattr(exc, "sqlite_errorname", None) or ""  # None on one raised by hand
        if name.startswith("SQLITE_BUSY"):
            raise Unavailable("the database is busy; retry shortly") from exc
        if name.startswith(_UNWRITABLE):
            raise Unavailable(
                "the broker's database cannot be written; retry once its storage is writable again"
            ) from exc
    if isinstance(exc, sqlite3.IntegrityError):
        message = str(exc)
        if message.startswith("UNIQUE constraint failed: "):
            raise Duplicate(message.removeprefix("UNIQUE constraint failed: ")) from exc
        if message.startswith("FOREIGN KEY"):
            raise MissingParent(message) from exc


async def _backfill_audit_chain(conn: aiosqlite.Connection) -> None:
    """Hash the events written before the chain existed (migration 0004), in one transaction.

    Only while the chain has not begun (no hashed event, no checkpoint): once it has, an
    event without a hash is a break for `verify_audit_chain` to report, never re-hashed.
    With no event at all there is nothing to hash, and no write lock is taken.
    """
    begun = await conn.execute_fetchall(
        "SELECT 1 FROM audit_events WHERE hash IS NOT NULL UNION ALL SELECT 1 FROM audit_checkpoints LIMIT 1"
    )
    if list(begun) or not list(await conn.execute_fetchall("SELECT 1 FROM audit_events LIMIT 1")):
        return
    await conn.execute("BEGIN IMMEDIATE")
    try:
        after, prev, page = 0, chain.GENESIS, 1000
        while True:
            rows = list(
                await conn.execute_fetchall(
                    f"{codec.AUDIT.select} WHERE id > ? ORDER BY id LIMIT ?", (after, page)
                )
            )
            updates = []
            for row in rows:
                event = replace(codec.AUDIT.from_row(row), prev_hash=prev)
                prev = chain.event_hash(event)
                updates.append((event.prev_hash, prev, event.id))
            await conn.executemany("UPDATE audit_events SET prev_hash = ?, hash = ? WHERE id = ?", updates)
            if len(rows) < page:
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
