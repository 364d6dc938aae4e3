"""The audit log on SQLite: append, list, export, and verify or prune the hash chain."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from broker.errors import FailedPrecondition
from broker.model import AuditChainReport, AuditEvent, AuditFilter, AuditSeal, SealCheck
from broker.store import _chain as chain
from broker.store import _codec as codec
from broker.store import _sql
from broker.store.sqlite._base import (
    _AUDIT_PAGE,
    _AUDIT_SELECT,
    _CHECKPOINT_SELECT,
    SqliteBase,
    _chain_tail,
)

# Statements are assembled from the constant column lists in `_codec`, never from input.
_SEAL_SELECT = "SELECT " + ", ".join(codec.SEAL_COLUMNS) + " FROM audit_seals"  # noqa: S608
_SEALED_UP_TO = "SELECT max(last_id) FROM audit_seals"
_SEAL_INSERT = f"INSERT INTO audit_seals ({', '.join(codec.SEAL_COLUMNS)}) VALUES (?, ?, ?, ?, ?)"  # noqa: S608


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
        arg = _sql.Params(numbered=False)
        sql = _sql.event_page(arg, _AUDIT_SELECT, tenant, filter, limit, cursor=before_id, oldest_first=False)
        rows = await self._read(sql, arg.values)
        return [codec.audit_from_row(row) for row in rows]

    async def export_audit(
        self, tenant: str, filter: AuditFilter, limit: int, after_id: int | None
    ) -> list[AuditEvent]:
        """Up to `limit` events, oldest first, with id > after_id when given."""
        arg = _sql.Params(numbered=False)
        sql = _sql.event_page(arg, _AUDIT_SELECT, tenant, filter, limit, cursor=after_id, oldest_first=True)
        rows = await self._read(sql, arg.values)
        return [codec.audit_from_row(row) for row in rows]

    async def verify_audit_chain(self, seal_ok: SealCheck) -> AuditChainReport:
        """Walk the chain from the newest checkpoint in pages of `_AUDIT_PAGE` (bounded memory),
        with the seals of each page's events."""
        async with self._chain_lock:
            start = await self._read(_CHECKPOINT_SELECT, ())
            after, expected = (start[0]["last_id"], start[0]["last_hash"]) if start else (0, chain.GENESIS)
            # Seals made from here on may name events appended meanwhile; those before must find theirs.
            sealed_up_to = (await self._read(_SEALED_UP_TO, ()))[0][0] or 0
            walk = chain.ChainWalk(expected)
            while walk.ok:
                rows = await self._read(
                    f"{_AUDIT_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (after, _AUDIT_PAGE)
                )
                if rows and not walk.add_seals(await self._seals(after, rows[-1]["id"]), seal_ok):
                    break
                for row in rows:
                    if not walk.check_row(row):
                        break
                if len(rows) < _AUDIT_PAGE:
                    break
                after = rows[-1]["id"]
            walk.finish(await self._seals(max(after, walk.last_id), sealed_up_to), seal_ok)
        return walk.report()

    async def _seals(self, after_id: int, up_to_id: int) -> list[AuditSeal]:
        """Seals of events with after_id < id <= up_to_id."""
        rows = await self._read(
            f"{_SEAL_SELECT} WHERE last_id > ? AND last_id <= ? ORDER BY last_id", (after_id, up_to_id)
        )
        return [codec.seal_from_row(row) for row in rows]

    async def audit_tail(self) -> tuple[int, str]:
        """(id, hash) of the newest event, or of the newest checkpoint, or (0, GENESIS)."""
        async with self._transaction() as conn:
            return await _chain_tail(conn)

    async def add_audit_seal(self, seal: AuditSeal) -> None:
        """Insert the seal unless its event is sealed already."""
        async with self._transaction() as conn:
            await conn.execute(_SEAL_INSERT + " ON CONFLICT (last_id) DO NOTHING", codec.seal_params(seal))

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
                    await conn.execute("DELETE FROM audit_seals WHERE last_id <= ?", (last_id,))
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
