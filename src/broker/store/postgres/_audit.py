"""The audit log on PostgreSQL: append, list, export, and verify or prune the hash chain."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

from broker.errors import FailedPrecondition, Unavailable
from broker.model import AuditChainReport, AuditEvent, AuditFilter, AuditSeal, SealCheck
from broker.store import _chain as chain
from broker.store import _codec as codec
from broker.store import _sql
from broker.store.postgres._base import _CHECKPOINT_SELECT, _UNAVAILABLE, PostgresBase, _chain_tail
from broker.store.postgres.migrate import AUDIT_LOCK

# Statements are assembled from the constant column lists in `_codec`, never from input.
_AUDIT_SELECT = (
    "SELECT id, " + ", ".join(codec.AUDIT_COLUMNS) + ", prev_hash, hash FROM audit_events"  # noqa: S608
)
_AUDIT_PAGE = 1000
_SEAL_SELECT = "SELECT " + ", ".join(codec.SEAL_COLUMNS) + " FROM audit_seals"  # noqa: S608
_SEAL_INSERT = f"INSERT INTO audit_seals ({', '.join(codec.SEAL_COLUMNS)}) VALUES ($1, $2, $3, $4, $5)"  # noqa: S608


async def _seals(conn: asyncpg.Connection, after_id: int, up_to_id: int) -> list[AuditSeal]:
    """Seals of events with after_id < id <= up_to_id."""
    rows = await conn.fetch(
        f"{_SEAL_SELECT} WHERE last_id > $1 AND last_id <= $2 ORDER BY last_id", after_id, up_to_id
    )
    return [codec.seal_from_row(row) for row in rows]


class Audit(PostgresBase):
    """Audit events; every change's own event is written by `_insert_audit`."""

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        """Append the batch in one transaction: one commit, one WAL flush, one turn of the audit lock."""
        if not events:
            return
        async with self._transaction() as conn:
            await self._insert_audit(conn, events)

    async def list_audit(
        self, tenant: str, filter: AuditFilter, limit: int, before_id: int | None
    ) -> list[AuditEvent]:
        """Up to `limit` events, newest first, with id < before_id when given."""
        arg = _sql.Params(numbered=True)
        sql = _sql.event_page(arg, _AUDIT_SELECT, tenant, filter, limit, cursor=before_id, oldest_first=False)
        rows = await self._fetch(sql, *arg.values)
        return [codec.audit_from_row(row) for row in rows]

    async def export_audit(
        self, tenant: str, filter: AuditFilter, limit: int, after_id: int | None
    ) -> list[AuditEvent]:
        """Up to `limit` events, oldest first, with id > after_id when given."""
        arg = _sql.Params(numbered=True)
        sql = _sql.event_page(arg, _AUDIT_SELECT, tenant, filter, limit, cursor=after_id, oldest_first=True)
        rows = await self._fetch(sql, *arg.values)
        return [codec.audit_from_row(row) for row in rows]

    async def verify_audit_chain(self, seal_ok: SealCheck) -> AuditChainReport:
        """Walk the chain, with the seals of each page's events, in pages inside one
        REPEATABLE READ, READ ONLY transaction.

        The snapshot holds still while the walk pages through it, so a prune or an
        append by any replica meanwhile cannot look like a break. Appends commit in id
        order under the audit lock, so a snapshot always holds a prefix of the chain.
        """
        pool = self._require_pool()
        try:
            async with (
                pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                start = await conn.fetch(_CHECKPOINT_SELECT)
                after, expected = (
                    (start[0]["last_id"], start[0]["last_hash"]) if start else (0, chain.GENESIS)
                )
                sealed_up_to = await conn.fetchval("SELECT coalesce(max(last_id), 0) FROM audit_seals")
                walk = chain.ChainWalk(expected)
                while walk.ok:
                    rows = await conn.fetch(
                        f"{_AUDIT_SELECT} WHERE id > $1 ORDER BY id LIMIT $2", after, _AUDIT_PAGE
                    )
                    if rows and not walk.add_seals(await _seals(conn, after, rows[-1]["id"]), seal_ok):
                        break
                    for row in rows:
                        if not walk.check_row(row):
                            break
                    if len(rows) < _AUDIT_PAGE:
                        break
                    after = rows[-1]["id"]
                walk.finish(await _seals(conn, max(after, walk.last_id), sealed_up_to), seal_ok)
        except _UNAVAILABLE as exc:
            raise Unavailable("the database is unavailable; retry shortly") from exc
        return walk.report()

    async def audit_tail(self) -> tuple[int, str]:
        """(id, hash) of the newest committed event, or of the newest checkpoint, or (0, GENESIS)."""
        try:
            async with self._require_pool().acquire() as conn:
                return await _chain_tail(conn)
        except _UNAVAILABLE as exc:
            raise Unavailable("the database is unavailable; retry shortly") from exc

    async def add_audit_seal(self, seal: AuditSeal) -> None:
        """Insert the seal unless its event is sealed already (by another replica, say)."""
        async with self._transaction() as conn:
            await conn.execute(_SEAL_INSERT + " ON CONFLICT (last_id) DO NOTHING", *codec.seal_params(seal))

    async def prune_audit(self, before: datetime, now: datetime, batch_size: int = 1000) -> int:
        """Delete the oldest events before `before`, batch by batch, each with its checkpoint.

        Each batch holds the audit lock (appends of every replica wait for it), so the
        chain's tail never moves under a prune; batches keep that wait short.
        """
        _sql.check_limit(batch_size)
        cutoff = codec.to_micros(before)
        pruned = 0
        run_id: int | None = None
        while True:
            async with self._transaction() as conn:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", AUDIT_LOCK)
                start = await conn.fetch(_CHECKPOINT_SELECT)
                after, expected = (
                    (start[0]["last_id"], start[0]["last_hash"]) if start else (0, chain.GENESIS)
                )
                rows = await conn.fetch(
                    f"{_AUDIT_SELECT} WHERE id > $1 ORDER BY id LIMIT $2", after, batch_size
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
                await conn.execute("DELETE FROM audit_events WHERE id <= $1", last_id)
                await conn.execute("DELETE FROM audit_seals WHERE last_id <= $1", last_id)
                if run_id is None:
                    run_id = await conn.fetchval(
                        "INSERT INTO audit_checkpoints (last_id, last_hash, pruned_count, created_at)"
                        " VALUES ($1, $2, $3, $4) RETURNING id",
                        last_id,
                        last_hash,
                        len(batch),
                        codec.to_micros(now),
                    )
                else:
                    await conn.execute(
                        "UPDATE audit_checkpoints SET last_id = $1, last_hash = $2,"
                        " pruned_count = pruned_count + $3 WHERE id = $4",
                        last_id,
                        last_hash,
                        len(batch),
                        run_id,
                    )
            pruned += len(batch)
            if len(batch) < batch_size:
                return pruned
