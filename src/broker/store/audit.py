"""The audit log: append, list, export, and verify or prune the hash chain; and one page of
any event listing (audit events or security events)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from broker.errors import FailedPrecondition
from broker.model import AuditChainReport, AuditEvent, AuditFilter, AuditSeal, SealCheck, SecurityEventFilter
from broker.store import _chain as chain
from broker.store import _codec as codec
from broker.store.engine import Tx
from broker.store.lifecycle import CHECKPOINT_SELECT, EngineStore, Where, chain_tail, check_limit

_AUDIT_PAGE = 1000


def event_page(
    select: str,
    tenant: str,
    filter: AuditFilter | SecurityEventFilter,
    limit: int,
    *,
    cursor: int | None,
    oldest_first: bool,
) -> tuple[str, list[Any]]:
    """One page of an event listing, and its parameters: the tenant, each exact-match filter
    that is set, `time` from start_time (inclusive) to end_time (exclusive); newest first
    with id < cursor, or oldest first with id > cursor (when given)."""
    where = Where("tenant = ?", tenant)
    if isinstance(filter, AuditFilter):
        equals = [("connection_id", filter.connection_id), ("actor", filter.actor), ("action", filter.action)]
    else:
        equals = [
            ("rule", filter.rule),
            ("connection_id", filter.connection_id),
            ("principal", filter.principal),
        ]
    for column, value in equals:
        where.equals(column, value)
    if filter.start_time is not None:
        where.add("time >= ?", codec.to_micros(filter.start_time))
    if filter.end_time is not None:
        where.add("time < ?", codec.to_micros(filter.end_time))
    if cursor is not None:
        where.add("id > ?" if oldest_first else "id < ?", cursor)
    return where.page(select, "id" if oldest_first else "id DESC", limit)


async def _seals(tx: Tx, after_id: int, up_to_id: int) -> list[AuditSeal]:
    """Seals of events with after_id < id <= up_to_id."""
    rows = await tx.fetch(
        f"{codec.SEALS.select} WHERE last_id > ? AND last_id <= ? ORDER BY last_id", after_id, up_to_id
    )
    return [codec.SEALS.from_row(row) for row in rows]


class Audit(EngineStore):
    """The audit log (`protocols.AuditLogStore`); every change's own event is written by `_insert_audit`."""

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        """Append the batch in one transaction: one commit, one flush, one turn of the audit lock."""
        if not events:
            return
        async with self._engine.transaction() as tx:
            await self._insert_audit(tx, events)

    async def list_audit(
        self, tenant: str, filter: AuditFilter, limit: int, before_id: int | None
    ) -> list[AuditEvent]:
        sql, args = event_page(
            codec.AUDIT.select, tenant, filter, limit, cursor=before_id, oldest_first=False
        )
        return [codec.AUDIT.from_row(row) for row in await self._engine.fetch(sql, *args)]

    async def export_audit(
        self, tenant: str, filter: AuditFilter, limit: int, after_id: int | None
    ) -> list[AuditEvent]:
        sql, args = event_page(codec.AUDIT.select, tenant, filter, limit, cursor=after_id, oldest_first=True)
        return [codec.AUDIT.from_row(row) for row in await self._engine.fetch(sql, *args)]

    async def verify_audit_chain(self, seal_ok: SealCheck) -> AuditChainReport:
        """Walk the chain from the newest checkpoint, with the seals of each page's events, in
        pages of `_AUDIT_PAGE` (bounded memory), all in one snapshot.

        The snapshot holds still while the walk pages through it, so a prune or an append
        by anyone meanwhile cannot look like a break. Appends commit in id order (under
        the audit lock), so a snapshot always holds a prefix of the chain.
        """
        async with self._engine.snapshot() as tx:
            start = await tx.fetch(CHECKPOINT_SELECT)
            after, expected = (start[0]["last_id"], start[0]["last_hash"]) if start else (0, chain.GENESIS)
            sealed_up_to = await tx.fetchval("SELECT coalesce(max(last_id), 0) FROM audit_seals")
            walk = chain.ChainWalk(expected)
            while walk.ok:
                rows = await tx.fetch(
                    f"{codec.AUDIT.select} WHERE id > ? ORDER BY id LIMIT ?", after, _AUDIT_PAGE
                )
                if rows and not walk.add_seals(await _seals(tx, after, rows[-1]["id"]), seal_ok):
                    break
                for row in rows:
                    if not walk.check_row(row):
                        break
                if len(rows) < _AUDIT_PAGE:
                    break
                after = rows[-1]["id"]
            walk.finish(await _seals(tx, max(after, walk.last_id), sealed_up_to), seal_ok)
        return walk.report()

    async def audit_tail(self) -> tuple[int, str]:
        return await chain_tail(self._engine.fetch)

    async def add_audit_seal(self, seal: AuditSeal) -> AuditSeal:
        async with self._engine.transaction() as tx:
            await tx.execute(
                codec.SEALS.insert + " ON CONFLICT (last_id) DO NOTHING", *codec.SEALS.params(seal)
            )
            rows = await tx.fetch(f"{codec.SEALS.select} WHERE last_id = ?", seal.last_id)
        return codec.SEALS.from_row(rows[0])

    async def prune_audit(self, before: datetime, now: datetime, batch_size: int = 1000) -> int:
        """Delete the oldest events before `before`, batch by batch, each with its checkpoint.

        Each batch holds the audit lock (appends wait for it), so the chain's tail never
        moves under a prune; batches keep that wait short.
        """
        check_limit(batch_size)
        cutoff = codec.to_micros(before)
        pruned = 0
        run_id: int | None = None
        while True:
            async with self._engine.transaction() as tx:
                await tx.lock_audit()
                start = await tx.fetch(CHECKPOINT_SELECT)
                after, expected = (
                    (start[0]["last_id"], start[0]["last_hash"]) if start else (0, chain.GENESIS)
                )
                rows = await tx.fetch(
                    f"{codec.AUDIT.select} WHERE id > ? ORDER BY id LIMIT ?", after, batch_size
                )
                # A prefix only: the chain must stay contiguous even where times are not monotonic.
                batch = []
                for row in rows:
                    if row["time"] >= cutoff:
                        break
                    batch.append(row)
                if not batch:
                    return pruned
                walk = chain.ChainWalk(expected)
                for row in batch:
                    if not walk.check_row(row):
                        raise FailedPrecondition(
                            f"the audit chain is broken at event {walk.broken_id} ({walk.problem}); "
                            "pruning stopped there so the evidence is kept"
                        )
                last_id, last_hash = batch[-1]["id"], batch[-1]["hash"]
                await tx.execute("DELETE FROM audit_events WHERE id <= ?", last_id)
                await tx.execute("DELETE FROM audit_seals WHERE last_id <= ?", last_id)
                if run_id is None:
                    run_id = await tx.fetchval(
                        "INSERT INTO audit_checkpoints (last_id, last_hash, pruned_count, created_at)"
                        " VALUES (?, ?, ?, ?) RETURNING id",
                        last_id,
                        last_hash,
                        len(batch),
                        codec.to_micros(now),
                    )
                else:
                    await tx.execute(
                        "UPDATE audit_checkpoints SET last_id = ?, last_hash = ?,"
                        " pruned_count = pruned_count + ? WHERE id = ?",
                        last_id,
                        last_hash,
                        len(batch),
                        run_id,
                    )
            pruned += len(batch)
            if len(batch) < batch_size:
                return pruned
