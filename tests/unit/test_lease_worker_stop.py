"""The lease worker stops when the broker closes, even when a driver swallowed the cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from broker.crypto import Kek, Keyring
from broker.egress import EgressPolicy, EgressSettings
from broker.service.audit import AuditLog
from broker.service.leases import LeaseService
from broker.store.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "leases.db")
    await s.open()
    yield s
    await s.close()


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


async def test_close_stops_a_worker_whose_cancellation_a_driver_swallowed(store: SqliteStore) -> None:
    queue = SwallowingQueue(store)
    leases = LeaseService(
        store=store,
        revocations=queue,  # type: ignore[arg-type]
        connections=store,
        grants=store,
        keyring=Keyring(Kek(bytes(32))),
        audit=AuditLog(store),
        egress=EgressPolicy(EgressSettings()),
        clock=lambda: datetime.now(UTC),
    )
    leases.start()
    await asyncio.wait_for(queue.entered.wait(), 10)
    await asyncio.wait_for(leases.close(), 10)  # before the fix: waited forever
    assert queue.swallowed == 1
