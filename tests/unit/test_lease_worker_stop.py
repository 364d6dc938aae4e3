"""The lease worker stops when the broker closes, even when a driver swallowed the cancellation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from broker.crypto import Kek, Keyring
from broker.egress import EgressPolicy, EgressSettings
from broker.service.audit import AuditLog
from broker.service.leases import LeaseService
from broker.store.sqlite import SqliteStore


class SwallowingQueue:
    """The store's revocation queue, except that one call eats the cancellation it receives, as
    aiomysql's connect (`asyncio.wait_for` on Python 3.11) can."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.entered = asyncio.Event()
        self.swallowed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def pending_revocations(self, now: datetime) -> int:
        self.entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.swallowed += 1
        return 0


async def test_close_stops_a_worker_whose_cancellation_a_driver_swallowed(sqlite_store: SqliteStore) -> None:
    queue = SwallowingQueue(sqlite_store)
    leases = LeaseService(
        store=sqlite_store,
        revocations=queue,  # type: ignore[arg-type]
        connections=sqlite_store,
        grants=sqlite_store,
        keyring=Keyring(Kek(bytes(32))),
        audit=AuditLog(sqlite_store),
        egress=EgressPolicy(EgressSettings()),
        clock=lambda: datetime.now(UTC),
    )
    leases.start()
    await asyncio.wait_for(queue.entered.wait(), 10)
    await asyncio.wait_for(leases.close(), 10)  # before the fix: waited forever
    assert queue.swallowed == 1
