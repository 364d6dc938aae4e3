"""The store's own plumbing over its `Engine`: lifecycle, the change feed, locks, one-statement
writes (`_write`), and the one place audit rows are written."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from broker.model import AuditEvent
from broker.store import _chain as chain
from broker.store import _codec as codec
from broker.store import changes
from broker.store.engine import Engine, Tx
from broker.store.protocols import ChangeSink


class EngineStore:
    """What every part of the store builds on: the engine and its plumbing (the contracts of the
    methods without a docstring are `protocols.Lifecycle`'s and `protocols.Coordination`'s)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def open(self) -> None:
        await self._engine.open()

    async def close(self) -> None:
        await self._engine.close()

    async def ping(self) -> None:
        """Raise if the store cannot answer `SELECT 1`."""
        await self._engine.fetch("SELECT 1")

    async def watch(self, sink: ChangeSink) -> None:
        await self._engine.watch(sink)

    async def announce_block(self, tenant: str, principal: str, until: float) -> None:
        """Tell every replica's monitor (this one's too, harmlessly) that a principal is blocked."""
        async with self._engine.transaction() as tx:
            await tx.changed(changes.principal_blocked(tenant, principal, until))

    def refresh_lock(self, tenant: str, connection_id: str) -> AbstractAsyncContextManager[None]:
        return self._engine.refresh_lock(tenant, connection_id)

    async def _write(
        self, sql: str, *args: Any, events: Sequence[AuditEvent] = (), change: str | None = None
    ) -> int:
        """Run one statement in a write transaction; how many rows it changed. Only when it changed
        some: the `change` message and the audit `events` go in the same transaction."""
        async with self._engine.transaction() as tx:
            count = await tx.execute(sql, *args)
            if count:
                if change is not None:
                    await tx.changed(change)
                if events:
                    await self._insert_audit(tx, events)
        return count

    @staticmethod
    async def _insert_audit(tx: Tx, events: Iterable[AuditEvent]) -> None:
        """Append events to the hash chain; the one place audit rows are written.

        Always the last step of its transaction: the audit lock it takes is held until
        commit, and a holder must never wait for a row lock (see `broker.store.postgres`).
        """
        await tx.lock_audit()
        # READ COMMITTED: the tail query's snapshot is taken after the lock was granted, so it
        # sees the previous holder's committed events. One step, so SQLite sends the read, the
        # INSERTs and the COMMIT to its writer's thread together.
        await tx.write_from(chain.TAIL_QUERY, codec.AUDIT.insert, chain.linker(events))


class Where:
    """The conditions of one listing and their parameters, built up filter by filter; `page`
    writes the statement. Conditions are constant SQL; only parameters come from input."""

    def __init__(self, condition: str, *args: Any) -> None:
        self.conditions, self.args = [condition], list(args)

    def add(self, condition: str, *args: Any) -> None:
        self.conditions.append(condition)
        self.args += args

    def equals(self, column: str, value: object) -> None:
        """`column = value`, when the filter is set (not "" or None)."""
        if value:
            self.add(f"{column} = ?", value)

    def page(self, select: str, order: str, limit: int) -> tuple[str, list[Any]]:
        """The statement for one page of `limit` rows in `order`, and its parameters."""
        check_limit(limit)
        sql = f"{select} WHERE {' AND '.join(self.conditions)} ORDER BY {order} LIMIT ?"
        return sql, [*self.args, limit]


def check_limit(limit: int) -> None:
    """Refuse a page size below 1: SQLite reads a negative LIMIT as "no limit"."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
