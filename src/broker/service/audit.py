"""The audit trail's write path for Resolve: durable group commit.

A Resolve's event must be on disk before its response is sent, and if it cannot
be written the Resolve fails. One fsync per call would cap throughput at the
disk's sync rate, so concurrent callers share a transaction: each `append`
joins the pending batch and waits; one writer task commits whatever has
accumulated while the previous commit was in flight, then wakes every waiter
of that batch with the outcome.

Admin mutations do not come through here: the store writes their events in the
same transaction as the change itself.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from broker import metrics
from broker.errors import InvalidArgument, Unavailable
from broker.model import AuditEvent, AuditFilter
from broker.service import paging
from broker.service.context import Call
from broker.store import Store

log = structlog.get_logger("broker.audit")

MAX_BATCH = 512


class AuditLog:
    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[tuple[AuditEvent, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def append(self, event: AuditEvent) -> None:
        """Return once `event` is durably stored; raise `Unavailable` if it could not be."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        # Shield: a caller that gives up must not cancel the commit other callers share.
        await asyncio.shield(future)

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            started = time.perf_counter()
            try:
                await self._store.append_audit([event for event, _ in batch])
                metrics.AUDIT_WRITE_SECONDS.observe(time.perf_counter() - started)
                metrics.AUDIT_BATCH_SIZE.observe(len(batch))
            except Exception as exc:
                log.error("audit_write_failed", batch_size=len(batch), error_type=type(exc).__name__)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(
                            Unavailable("the audit log cannot be written; nothing was released")
                        )
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def close(self) -> None:
        """Wait for every accepted event to be written."""
        while self._writer is not None and not self._writer.done():
            await asyncio.wait([self._writer])

    async def list(
        self, call: Call, filter: AuditFilter, page_size: int, page_token: str
    ) -> tuple[list[AuditEvent], str]:
        """One page of the caller's tenant's events, newest first."""
        if filter.start_time and filter.end_time and filter.start_time >= filter.end_time:
            raise InvalidArgument.field("end_time", "must be after start_time")
        limit = paging.page_size(page_size)
        before = paging.decode_token("audit", page_token)
        if before is not None and not isinstance(before, int):
            raise InvalidArgument.field("page_token", "is not a token returned by this listing")
        events = await self._store.list_audit(call.tenant, filter, limit + 1, before)
        if len(events) > limit:
            return events[:limit], paging.encode_token("audit", events[limit - 1].id)
        return events, ""
