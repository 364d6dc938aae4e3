"""Group commit: a caller is answered only once its event is durable; a caller that gives up
neither loses nor duplicates its batch, and the other callers of that batch are still answered."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from broker.errors import Unavailable
from broker.model import AuditEvent, Outcome
from broker.service.audit import AuditLog


def _event(n: int) -> AuditEvent:
    return AuditEvent(
        time=datetime(2026, 1, 1, tzinfo=UTC),
        tenant="default",
        actor="spiffe://broker.local/tenant/default/executor/demo",
        action="connection.resolve",
        outcome=Outcome.SUCCEEDED,
        connection_id=f"c{n}",
    )


class _GatedStore:
    """Audit writes that wait for `release`, then succeed (or fail, with `fail`)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.fail = False
        self.batches: list[list[str]] = []

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        self.started.set()
        await self.release.wait()
        if self.fail:
            raise OSError("disk full")
        self.batches.append([e.connection_id for e in events])


async def test_no_caller_is_answered_before_its_batch_is_written() -> None:
    store = _GatedStore()
    log = AuditLog(store)  # type: ignore[arg-type]
    callers = [asyncio.create_task(log.append(_event(i))) for i in range(3)]
    await asyncio.wait_for(store.started.wait(), 5)
    await asyncio.sleep(0.05)
    assert not any(c.done() for c in callers)
    store.release.set()
    await asyncio.wait_for(asyncio.gather(*callers), 5)
    assert store.batches == [["c0", "c1", "c2"]]
    await log.close()


async def test_a_caller_that_gives_up_does_not_cancel_lose_or_repeat_the_shared_batch() -> None:
    store = _GatedStore()
    log = AuditLog(store)  # type: ignore[arg-type]
    first = asyncio.create_task(log.append(_event(0)))
    await asyncio.wait_for(store.started.wait(), 5)  # batch 1 ([c0]) is being written
    # Batch 2 gathers while batch 1 is in flight; one of its callers gives up.
    waiting = [asyncio.create_task(log.append(_event(i))) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    waiting[1].cancel()
    store.release.set()
    await asyncio.wait_for(asyncio.gather(first, waiting[0], waiting[2]), 5)
    with pytest.raises(asyncio.CancelledError):
        await waiting[1]
    await log.close()
    assert store.batches == [["c0"], ["c1", "c2", "c3"]]


async def test_a_failed_write_answers_every_remaining_caller_unavailable() -> None:
    store = _GatedStore()
    store.fail = True
    log = AuditLog(store)  # type: ignore[arg-type]
    callers = [asyncio.create_task(log.append(_event(i))) for i in range(2)]
    await asyncio.wait_for(store.started.wait(), 5)
    callers[0].cancel()
    store.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError) and isinstance(results[1], Unavailable)
    await log.close()
