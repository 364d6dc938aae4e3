"""The audit log on SQLite: append, list, export, and verify or prune the hash chain."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from broker.errors import FailedPrecondition
from broker.model import AuditChainReport, AuditEvent, AuditFilter
from broker.store import _chain as chain
from broker.store import _codec as codec
from broker.store import _sql
from broker.store.sqlite._base import _AUDIT_PAGE, _AUDIT_SELECT, _CHECKPOINT_SELECT, SqliteBase


class Audit(SqliteBase):
    """Audit events; every change's own event is written by `_insert_audit`."""

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        """Append the batch in one transaction: one commit, one fsync."""
        if not events:
            return
        async with self._transaction() as conn:
            await self._insert_audit(conn, events)

    async def list_audit(
        self, tenant: str, filter: AuditFilter, limit: int, before_id: int | None
    ) -> list[AuditEvent]:
        """Up to `limit` events, newest first, with id < before_id when given."""
        _sql.check_limit(limit)
        arg = _sql.Params(numbered=False)
        where = _sql.event_where(arg, tenant, _sql.audit_equals(filter), filter.start_time, filter.end_time)
        if before_id is not None:
            where.append(f"id < {arg(before_id)}")
        statement = f"{_AUDIT_SELECT} WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT {arg(limit)}"
        rows = await self._read(statement, arg.values)
        return [codec.audit_from_row(row) for row in rows]

    async def export_audit(
        self, tenant: str, filter: AuditFilter, limit: int, after_id: int | None
    ) -> list[AuditEvent]:
        """Up to `limit` events, oldest first, with id > after_id when given."""
        _sql.check_limit(limit)
        arg = _sql.Params(numbered=False)
        where = _sql.event_where(arg, tenant, _sql.audit_equals(filter), filter.start_time, filter.end_time)
        if after_id is not None:
            where.append(f"id > {arg(after_id)}")
        statement = f"{_AUDIT_SELECT} WHERE {' AND '.join(where)} ORDER BY id LIMIT {arg(limit)}"
        rows = await self._read(statement, arg.values)
        return [codec.audit_from_row(row) for row in rows]

    async def verify_audit_chain(self) -> AuditChainReport:
        """Walk the chain from the newest checkpoint in pages of `_AUDIT_PAGE` (bounded memory)."""
        async with self._chain_lock:
            start = await self._read(_CHECKPOINT_SELECT, ())
            after, expected = (start[0]["last_id"], start[0]["last_hash"]) if start else (0, chain.GENESIS)
            walk = chain.ChainWalk(expected)
            while walk.ok:
                rows = await self._read(
                    f"{_AUDIT_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (after, _AUDIT_PAGE)
                )
                for row in rows:
                    if not walk.check_row(row):
                        break
                if len(rows) < _AUDIT_PAGE:
                    break
                after = rows[-1]["id"]
        return AuditChainReport(walk.ok, walk.checked, walk.broken_id, walk.problem)

    async def prune_audit(self, before: datetime, now: datetime, batch_size: int = 1000) -> int:
        """Delete the oldest events before `before`, batch by batch, each with its checkpoint."""
        _sql.check_limit(batch_size)
        cutoff = codec.to_micros(before)
        pruned = 0
        run_id: int | None = None
        async with self._chain_lock:
            while True:
                async with self._transaction() as conn:
                    start = list(await conn.execute_fetchall(_CHECKPOINT_SELECT))
                    after, expected = (
                        (start[0]["last_id"], start[0]["last_hash"]) if start else (0, chain.GENESIS)
                    )
                    rows = list(
                        await conn.execute_fetchall(
                            f"{_AUDIT_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (after, batch_size)
                        )
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
                    await conn.execute("DELETE FROM audit_events WHERE id <= ?", (last_id,))
                    if run_id is None:
                        async with conn.execute(
                            "INSERT INTO audit_checkpoints (last_id, last_hash, pruned_count, created_at)"
                            " VALUES (?, ?, ?, ?)",
                            (last_id, last_hash, len(batch), codec.to_micros(now)),
                        ) as cursor:
                            run_id = cursor.lastrowid
                    else:
                        await conn.execute(
                            "UPDATE audit_checkpoints SET last_id = ?, last_hash = ?,"
                            " pruned_count = pruned_count + ? WHERE id = ?",
                            (last_id, last_hash, len(batch), run_id),
                        )
                pruned += len(batch)
                if len(batch) < batch_size:
                    return pruned
