"""The embedded SQLite store: `SqlStore` over `SqliteEngine` (see `engine` for the connection
layout). `secure_delete` zeroes freed space, so a purged wrapped data key does not linger."""

from __future__ import annotations

from pathlib import Path

from broker.store.sql import SqlStore
from broker.store.sqlite.engine import SqliteEngine

__all__ = ["SqliteStore"]


class SqliteStore(SqlStore):
    """`Store` on one SQLite file."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        self.engine = SqliteEngine(path, busy_timeout_ms=busy_timeout_ms)
        super().__init__(self.engine)

    @property
    def path(self) -> Path:
        return self.engine.path
