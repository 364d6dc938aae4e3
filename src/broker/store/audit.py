"""The audit log: append, list, export, and verify or prune the hash chain; and one page of
any event listing (audit events or security events)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from broker.errors import FailedPrecondition
from broker.model import (
    AnchorKeys,
    AuditAnchors,
    AuditChainReport,
    AuditCheckpoint,
    AuditEvent,
    AuditFilter,
    AuditSeal,
    SecurityEventFilter,
)
from broker.store import _chain as chain
from broker.store import _codec as codec
from broker.store._codec import Row
from broker.store.engine import Tx
from broker.store.lifecycle import EngineStore, Where, check_limit

_AUDIT_PAGE = 1000
_NEWEST_CHECKPOINT = f"{codec.CHECKPOINTS.select} ORDER BY last_id DESC LIMIT 1"
_NEWEST_SEAL = f"{codec.SEALS.select} ORDER BY last_id DESC LIMIT 1"


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


_UNREADABLE = (ValueError, TypeError, KeyError, OverflowError)


def _seal(row: Row) -> AuditSeal:
    """A seal row; one whose fields no longer parse reads as a seal of format 0, which never
    verifies (edited behind the broker's back), so every reader fails closed on it."""
    try:
        return codec.SEALS.from_row(row)
    except _UNREADABLE:
        return AuditSeal(int(row["last_id"]), "", "", "", codec.from_micros(0), format=0)


async def _seals(tx: Tx, after_id: int, up_to_id: int) -> list[AuditSeal]:
    """Seals of events with after_id < id <= up_to_id."""
    rows = await tx.fetch(
        f"{codec.SEALS.select} WHERE last_id > ? AND last_id <= ? ORDER BY last_id", after_id, up_to_id
    )
    return [_seal(row) for row in rows]


async def _newest_seal(tx: Tx) -> AuditSeal | None:
    rows = await tx.fetch(_NEWEST_SEAL)
    return _seal(rows[0]) if rows else None


async def _newest_checkpoint(tx: Tx) -> AuditCheckpoint | None:
    """The newest checkpoint; one whose fields no longer parse reads as unsigned (fails closed)."""
    rows = await tx.fetch(_NEWEST_CHECKPOINT)
    if not rows:
        return None
    try:
        return codec.CHECKPOINTS.from_row(rows[0])
    except _UNREADABLE:
        return AuditCheckpoint(int(rows[0]["id"]), int(rows[0]["last_id"]), "", 0, codec.from_micros(0))


def _start(checkpoint: AuditCheckpoint | None) -> tuple[int, str]:
    """Where a walk starts: after the checkpoint's last event, linked to its hash."""
    return (checkpoint.last_id, checkpoint.last_hash) if checkpoint else (0, chain.GENESIS)


async def _walk(
    tx: Tx, anchors: AnchorKeys, checkpoint: AuditCheckpoint | None, *, before: int | None = None
) -> chain.ChainWalk:
    """Walk the chain from `checkpoint` (which must pass `anchors`), in pages of `_AUDIT_PAGE`
    with the seals of each page's events; with `before` (microseconds), only the events before the
    first one at or after that time. The caller calls `finish` for the seals beyond the end."""
    after, expected = _start(checkpoint)
    walk = chain.ChainWalk(expected)
    problem = "" if checkpoint is None else anchors.checkpoint(checkpoint)
    if checkpoint is not None and problem:
        walk.broken(checkpoint.last_id, problem)
        return walk
    # Events numbered at or before the start are outside every walk: only an insertion puts one there.
    stray = await tx.fetchval("SELECT min(id) FROM audit_events")
    if stray is not None and stray <= after:
        walk.broken(int(stray), chain.PROBLEM_BEFORE_START)
        return walk
    while walk.ok:
        rows = await tx.fetch(f"{codec.AUDIT.select} WHERE id > ? ORDER BY id LIMIT ?", after, _AUDIT_PAGE)
        full = len(rows) == _AUDIT_PAGE
        if before is not None:
            young = next((i for i, row in enumerate(rows) if row["time"] >= before), None)
            if young is not None:
                rows, full = rows[:young], False
        if rows and not walk.add_seals(await _seals(tx, after, rows[-1]["id"]), anchors):
            break
        for row in rows:
            if not walk.check_row(row):
                break
        if not full:
            break
        after = rows[-1]["id"]
    return walk


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

    async def verify_audit_chain(self, anchors: AnchorKeys) -> AuditChainReport:
        """Walk the chain from the newest checkpoint, with the seals of each page's events, in
        pages of `_AUDIT_PAGE` (bounded memory), all in one snapshot.

        The snapshot holds still while the walk pages through it, so a prune or an append
        by anyone meanwhile cannot look like a break. Appends commit in id order (under
        the audit lock), so a snapshot always holds a prefix of the chain.
        """
        async with self._engine.snapshot() as tx:
            checkpoint = await _newest_checkpoint(tx)
            newest_seal = await _newest_seal(tx)
            walk = await _walk(tx, anchors, checkpoint)
            if walk.ok:
                sealed_up_to = newest_seal.last_id if newest_seal else 0
                start = _start(checkpoint)[0]
                walk.finish(await _seals(tx, max(start, walk.last_id), sealed_up_to), anchors)
        return walk.report(newest_seal)

    async def audit_anchors(self, at: Sequence[int] = ()) -> AuditAnchors:
        async with self._engine.snapshot() as tx:
            last_id, last_hash = chain.tail(await tx.fetch(chain.TAIL_QUERY))
            seal = await _newest_seal(tx)
            checkpoint = await _newest_checkpoint(tx)
            hashes = {}
            for event_id in {*at, *([seal.last_id] if seal else [])}:
                held = await tx.fetchval("SELECT hash FROM audit_events WHERE id = ?", event_id)
                if held is None and checkpoint is not None and checkpoint.last_id == event_id:
                    held = checkpoint.last_hash  # pruned behind the checkpoint, which says what it was
                elif held is None and event_id == 0:
                    held = chain.GENESIS  # before the first event
                if held is not None:
                    hashes[event_id] = str(held)
        return AuditAnchors(last_id, last_hash, seal, checkpoint, hashes)

    async def add_audit_seal(self, seal: AuditSeal) -> AuditSeal:
        async with self._engine.transaction() as tx:
            await tx.execute(
                codec.SEALS.insert + " ON CONFLICT (last_id) DO NOTHING", *codec.SEALS.params(seal)
            )
            rows = await tx.fetch(f"{codec.SEALS.select} WHERE last_id = ?", seal.last_id)
        return codec.SEALS.from_row(rows[0])

    async def replace_audit_seal(self, old_mac: str, seal: AuditSeal) -> bool:
        async with self._engine.transaction() as tx:
            replaced = await tx.execute(
                "UPDATE audit_seals SET kek_id = ?, mac = ?, sealed_at = ?, format = ?"
                " WHERE last_id = ? AND last_hash = ? AND mac = ?",
                seal.kek_id,
                seal.mac,
                codec.to_micros(seal.sealed_at),
                seal.format,
                seal.last_id,
                seal.last_hash,
                old_mac,
            )
        return replaced == 1

    async def replace_audit_checkpoint(self, old_mac: str | None, checkpoint: AuditCheckpoint) -> bool:
        async with self._engine.transaction() as tx:
            replaced = await tx.execute(
                "UPDATE audit_checkpoints SET newest_pruned_at = ?, kek_id = ?, mac = ?"
                " WHERE id = ? AND last_id = ? AND last_hash = ? AND coalesce(mac, '') = ?",
                None if checkpoint.newest_pruned_at is None else codec.to_micros(checkpoint.newest_pruned_at),
                checkpoint.kek_id,
                checkpoint.mac,
                checkpoint.id,
                checkpoint.last_id,
                checkpoint.last_hash,
                old_mac or "",
            )
        return replaced == 1

    async def prune_audit(
        self,
        before: datetime,
        now: datetime,
        anchors: AnchorKeys,
        batch_size: int = 1000,
    ) -> int:
        """Delete the oldest events before `before`, up to the newest one a verified seal matches,
        batch by batch, each with its checkpoint.

        The part to delete is walked first, in one snapshot, with its seals: a chain rewritten
        there (to make recent events look old, say) no longer matches them, and nothing is
        deleted. What a seal matched in that walk is fixed by the seal, so changes made after
        it cannot widen what is deleted. Each batch holds the audit lock (appends wait for it),
        so the chain's tail never moves under a prune; batches keep that wait short. A prune
        never continues from a checkpoint that `anchors` rejects: its own would vouch for one
        written by someone else.
        """
        check_limit(batch_size)
        cutoff = codec.to_micros(before)
        async with self._engine.snapshot() as tx:
            start = await _newest_checkpoint(tx)
            walk = await _walk(tx, anchors, start, before=cutoff)
        if not walk.ok:
            raise FailedPrecondition(
                f"the audit chain is broken at event {walk.broken_id} ({walk.problem}); "
                "nothing was pruned, so the evidence is kept"
            )
        through = walk.sealed_through
        pruned = 0
        run: AuditCheckpoint | None = None  # this run's checkpoint, once its first batch is written
        while True:
            async with self._engine.transaction() as tx:
                await tx.lock_audit()
                start = await _newest_checkpoint(tx)
                problem = "" if start is None else anchors.checkpoint(start)
                if start is not None and problem:
                    raise FailedPrecondition(
                        f"pruning refused: {problem} (the checkpoint at event {start.last_id})"
                    )
                after, expected = _start(start)
                batch = await tx.fetch(
                    f"{codec.AUDIT.select} WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                    after,
                    through,
                    batch_size,
                )
                if not batch:
                    return pruned
                batch_walk = chain.ChainWalk(expected)
                for row in batch:
                    if row["time"] >= cutoff or not batch_walk.check_row(row):
                        raise FailedPrecondition(
                            f"the audit chain changed at event {row['id']} while it was pruned; "
                            "pruning stopped there so the evidence is kept"
                        )
                newest = codec.from_micros(max(row["time"] for row in batch))
                if run is not None and run.newest_pruned_at is not None:
                    newest = max(newest, run.newest_pruned_at)
                run = anchors.sign_checkpoint(
                    AuditCheckpoint(
                        run.id if run else 0,
                        batch[-1]["id"],
                        batch[-1]["hash"],
                        len(batch) + (run.pruned_count if run else 0),
                        now,
                        newest,
                    )
                )
                await tx.execute("DELETE FROM audit_events WHERE id <= ?", run.last_id)
                # The seal of the last pruned event stays: it may be the newest, kept recent.
                await tx.execute("DELETE FROM audit_seals WHERE last_id < ?", run.last_id)
                if not run.id:
                    insert = f"{codec.CHECKPOINTS.insert} RETURNING id"
                    run = replace(run, id=await tx.fetchval(insert, *codec.CHECKPOINTS.params(run)))
                else:
                    await tx.execute(
                        "UPDATE audit_checkpoints SET last_id = ?, last_hash = ?, pruned_count = ?,"
                        " newest_pruned_at = ?, kek_id = ?, mac = ? WHERE id = ?",
                        *(run.last_id, run.last_hash, run.pruned_count, codec.to_micros(newest)),
                        *(run.kek_id, run.mac, run.id),
                    )
            pruned += len(batch)
            if run.last_id >= through:
                return pruned
