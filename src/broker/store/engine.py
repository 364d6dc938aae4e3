"""What the one SQL store needs from a database engine: the `Engine` and its `Tx`.

The queries (`connections`, `access`, `audit`, `keys`) are written once, with `?`
placeholders; an engine (`sqlite.engine`, `postgres.engine`) carries only what
genuinely differs: connections and pools, how a write transaction starts and is
serialised, placeholder style and collation names, error classes, the clock used
for rate buckets, and how committed changes reach the change feed (`changes`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from broker.store._codec import Row
from broker.store.protocols import ChangeSink


class Duplicate(Exception):
    """A unique constraint refused a write; `constraint` is how the engine names it."""

    def __init__(self, constraint: str) -> None:
        super().__init__(constraint)
        self.constraint = constraint


class MissingParent(Exception):
    """A foreign key refused a write: the row it points at does not exist."""


class Tx(Protocol):
    """One write transaction: committed when its block ends, rolled back on any exception."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; how many rows it changed."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement per row of parameters."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """The rows of a query (or of a statement's RETURNING clause)."""

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""

    async def write_from(
        self, query: str, statement: str, rows: Callable[[list[Row]], Iterable[Sequence[Any]]]
    ) -> None:
        """Run `query`, then `statement` once per row of parameters `rows` makes of its result.

        A write that depends on a read of the same transaction, given whole so an engine can do
        both without a round trip to the caller in between (SQLite sends them with its next
        statement or the COMMIT, in one hop to its writer's thread; an error surfaces there).
        `rows` may run on another thread: it must use only what it was given.
        """

    async def changed(self, change: str) -> None:
        """A change Resolve must hear of (`broker.store.changes`): delivered once committed."""

    async def lock_audit(self) -> None:
        """Serialise audit appends and prunes until commit (across replicas, where there are any)."""


class Engine(Protocol):
    """A database behind the store; see the module docstring."""

    # The database's clock in seconds since the epoch, as an SQL expression (shared rate buckets).
    now_sql: str
    # Appended to a SELECT in a write transaction: lock the rows read and skip those another
    # transaction holds (PostgreSQL), so concurrent claimers take disjoint rows; "" where writers
    # are serialised anyway (SQLite).
    skip_locked_sql: str
    # Appended to a SELECT ... ORDER BY in a write transaction: lock the rows read, in that order
    # (PostgreSQL), so two writers of the same rows wait for each other instead of deadlocking;
    # "" where writers are serialised anyway (SQLite).
    lock_rows_sql: str

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None:
        """Finish the transaction in flight and release every connection."""

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A write transaction; its changes reach the sink after commit, before the block returns."""

    def snapshot(self) -> AbstractAsyncContextManager[Tx]:
        """A read-only transaction whose view holds still while it lasts (to walk the audit chain)."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """A read: one statement in autocommit."""

    async def fetch_by_key(self, sql: str, *args: Any) -> list[Row]:
        """`fetch` for a read of the few rows one key names through an index (what a Resolve cache
        miss reads): an engine may run it on the caller's thread, where a hop to another costs
        more than the read itself."""

    async def watch(self, sink: ChangeSink) -> None:
        """Hand committed changes to `sink` from now on: this process's, and other replicas'."""

    def refresh_lock(self, tenant: str, connection_id: str) -> AbstractAsyncContextManager[None]:
        """Held around an OAuth2 token refresh, so one process at a time refreshes a connection."""
