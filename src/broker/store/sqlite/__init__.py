"""The embedded SQLite store (aiosqlite): `SqlStore` over `SqliteEngine`.

One writer connection, serialised by an `asyncio.Lock`, runs every change as
`BEGIN IMMEDIATE ... COMMIT` (rolled back on any exception, so a change and
its audit event land together or not at all). A second, query-only connection
serves reads; WAL lets it read while the writer writes; the audit chain is
verified on a connection of its own, in one read transaction. `secure_delete`
zeroes freed space, so a purged wrapped data key does not linger in the file.
Committed changes reach the change sink before the write call returns.
"""

from __future__ import annotations

from pathlib import Path

from broker.store.sql import SqlStore
from broker.store.sqlite.engine import SqliteEngine

__all__ = ["SqliteStore"]


class SqliteStore(SqlStore):
    """`Store` on one SQLite file; see the module docstring for the connection layout."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        self.engine = SqliteEngine(path, busy_timeout_ms=busy_timeout_ms)
        super().__init__(self.engine)

    @property
    def path(self) -> Path:
        return self.engine.path
