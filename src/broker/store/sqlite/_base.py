"""Lifecycle and plumbing of `SqliteStore`: the two connections, the write transaction, reads,
and the one place audit rows are written. The connection layout is in `broker.store.sqlite`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiosqlite

from broker.errors import Unavailable
from broker.model import AuditEvent
from broker.store import _chain as chain
from broker.store import _codec as codec
from broker.store._migrate import apply_sqlite, load_migrations
from broker.store.protocols import ChangeSink

# Statements are assembled from the constant column lists in `_codec`, never from input.
_AUDIT_SELECT = (
    "SELECT id, " + ", ".join(codec.AUDIT_COLUMNS) + ", prev_hash, hash FROM audit_events"  # noqa: S608
)
# The id is given, not assigned: it is part of the hashed form, computed before the insert.
_AUDIT_INSERT = (
    f"INSERT INTO audit_events (id, {', '.join(codec.AUDIT_COLUMNS)}, prev_hash, hash) "  # noqa: S608
    f"VALUES (?, {', '.join('?' for _ in codec.AUDIT_COLUMNS)}, ?, ?)"
)
_AUDIT_PAGE = 1000
_CHECKPOINT_SELECT = "SELECT last_id, last_hash FROM audit_checkpoints ORDER BY last_id DESC LIMIT 1"


class SqliteBase:
    """The connections and their plumbing, which every part of `SqliteStore` builds on."""

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

    async def announce_block(self, tenant: str, principal: str, until: float) -> None:
        """No other replica to tell."""

    def refresh_lock(self, tenant: str, connection_id: str) -> AbstractAsyncContextManager[None]:
        """No lock needed: one process, which already runs one refresh per connection at a time."""
        return contextlib.nullcontext()

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
        await conn.executemany(_AUDIT_INSERT, chain.linked_rows(events, last_id, last_hash))


async def _chain_tail(conn: aiosqlite.Connection) -> tuple[int, str]:
    """(id, hash) of the newest event, else of the newest checkpoint, else (0, GENESIS)."""
    rows = list(await conn.execute_fetchall("SELECT id, hash FROM audit_events ORDER BY id DESC LIMIT 1"))
    if rows:
        return int(rows[0]["id"]), str(rows[0]["hash"] or "")
    rows = list(await conn.execute_fetchall(_CHECKPOINT_SELECT))
    if rows:
        return int(rows[0]["last_id"]), str(rows[0]["last_hash"])
    return 0, chain.GENESIS


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
