"""Leases: database users made for executors, and the durable queue that drops them.

A lease row is written (`creating`) before its user exists and turned `active` with the
audit events of its release in one transaction. From then on the row is its own
revocation queue: expiry or a revocation makes it due, `claim_due_leases` hands a batch
to exactly one worker (the due rows are read locked, skipping those another replica's
claim holds on PostgreSQL, then claimed by a conditional UPDATE: a row claimed by another
replica, whose claim has not run out, is not claimed again), and the worker either finishes it
(`revoked`, with its audit event) or records the failure and when to try again. Nothing
here gives up on a lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from broker.model import AuditEvent, Lease, LeaseFilter
from broker.store import _codec as codec
from broker.store.lifecycle import EngineStore, Where, check_limit

_BY_ID = codec.LEASES.select + " WHERE tenant = ? AND id = ?"
_LIVE = "state IN ('creating', 'active')"
_NOT_REVOKED = "state <> 'revoked'"
# Due: an active lease past its expiry, a revoking one whose retry time came, or a lease
# stuck in `creating` past the creation grace (its creator died): none claimed by another
# worker right now. A revoking lease without a retry time was claimed straight from `active`
# or `creating` by a worker that never recorded an outcome (it died): due once that claim ran out.
_DUE = (
    "((state = 'active' AND expires_at <= ?)"
    " OR (state = 'revoking' AND (next_attempt_at IS NULL OR next_attempt_at <= ?))"
    " OR (state = 'creating' AND created_at <= ?)) AND (claimed_until IS NULL OR claimed_until <= ?)"
)


def _matching(tenant: str, filter: LeaseFilter) -> Where:
    where = Where("tenant = ?", tenant)
    where.equals("id", filter.lease_id)
    where.equals("connection_id", filter.connection_id)
    where.equals("principal", filter.principal)
    where.equals("run_id", filter.run_id)
    if filter.state is not None:
        where.add("state = ?", filter.state.value)
    if filter.live:
        where.add(_LIVE)
    if filter.username_prefix:
        # Not LIKE: `_` and `%` would be wildcards.
        where.add("substr(username, 1, ?) = ?", len(filter.username_prefix), filter.username_prefix)
    return where


class Leases(EngineStore):
    """The lease rows and their revocation queue (contracts: `protocols.LeaseStore` and
    `protocols.RevocationQueue`)."""

    async def insert_lease(self, lease: Lease) -> None:
        await self._write(codec.LEASES.insert, *codec.LEASES.params(lease))

    async def activate_lease(self, tenant: str, lease_id: str, events: Sequence[AuditEvent]) -> bool:
        # Only while the grant it was made under is there: one revoked while the user was being
        # created must not see its lease handed out (the change feed's check may have run before
        # this row was written, or while it was still `creating`).
        activated = await self._write(
            "UPDATE leases SET state = 'active' WHERE tenant = ? AND id = ? AND state = 'creating'"
            " AND claimed_until IS NULL AND EXISTS (SELECT 1 FROM grants WHERE grants.tenant = leases.tenant"
            " AND grants.connection_id = leases.connection_id AND grants.principal = leases.principal)",
            tenant,
            lease_id,
            events=events,
        )
        return activated > 0

    async def get_lease(self, tenant: str, lease_id: str) -> Lease | None:
        rows = await self._engine.fetch(_BY_ID, tenant, lease_id)
        return codec.LEASES.from_row(rows[0]) if rows else None

    async def list_leases(
        self, tenant: str, filter: LeaseFilter, limit: int, after: str | None
    ) -> list[Lease]:
        where = _matching(tenant, filter)
        if after is not None:
            where.add("id > ?", after)
        sql, args = where.page(codec.LEASES.select, "id", limit)
        return [codec.LEASES.from_row(row) for row in await self._engine.fetch(sql, *args)]

    async def renew_lease(
        self, tenant: str, lease_id: str, expires_at: datetime, now: datetime, event: AuditEvent
    ) -> bool:
        renewed = await self._write(
            "UPDATE leases SET expires_at = ? WHERE tenant = ? AND id = ? AND state = 'active'"
            " AND expires_at > ? AND max_expires_at >= ?",
            codec.to_micros(expires_at),
            tenant,
            lease_id,
            codec.to_micros(now),
            codec.to_micros(expires_at),
            events=[event],
        )
        return renewed > 0

    async def revoke_leases(
        self,
        tenant: str,
        filter: LeaseFilter,
        reason: str,
        now: datetime,
        event: AuditEvent | None,
        *,
        abandon: bool = False,
    ) -> int:
        where = _matching(tenant, filter)
        if abandon:  # revoked at once, nothing dropped: queued leases too, and claims dropped
            where.add(_NOT_REVOKED)
            change = "state = 'revoked', revoke_reason = ?, revoked_at = ?, claimed_until = NULL"
        else:
            where.add(_LIVE)
            change = "state = 'revoking', revoke_reason = ?, next_attempt_at = ?"
        return await self._write(
            f"UPDATE leases SET {change} WHERE {' AND '.join(where.conditions)}",  # noqa: S608
            reason,
            codec.to_micros(now),
            *where.args,
            events=[] if event is None else [event],
        )

    async def claim_due_leases(
        self,
        now: datetime,
        creating_before: datetime,
        claim_until: datetime,
        limit: int,
        only: tuple[str, str] | None = None,
    ) -> list[Lease]:
        """Claim up to `limit` due leases (any tenant; or only the lease `only`: tenant, id) until
        `claim_until`; they come back `revoking`, with why. Concurrent claimers never get the same lease."""
        at, before = codec.to_micros(now), codec.to_micros(creating_before)
        due = [at, at, before, at]  # `_DUE`'s parameters
        where = _DUE
        args: list[int | str] = [*due]
        if only is not None:
            where += " AND tenant = ? AND id = ?"
            args += only
        # A read first: most passes find nothing due, and need no write transaction (on SQLite,
        # the one writer's lock).
        if not await self._engine.fetch(f"SELECT 1 FROM leases WHERE {where} LIMIT 1", *args):  # noqa: S608
            return []
        async with self._engine.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT tenant, id FROM leases WHERE {where} ORDER BY expires_at, id LIMIT ?"  # noqa: S608
                + self._engine.skip_locked_sql,
                *args,
                limit,
            )
            claimed = []
            for row in rows:
                # Re-checks the condition on the locked row: if another replica claimed it since
                # the SELECT, nothing changes here and the lease is not ours.
                found = await tx.fetch(
                    "UPDATE leases SET claimed_until = ?, state = 'revoking',"  # noqa: S608
                    " revoke_reason = CASE WHEN revoke_reason <> '' THEN revoke_reason"
                    " WHEN state = 'creating' THEN 'creation_abandoned' ELSE 'expired' END"
                    f" WHERE tenant = ? AND id = ? AND {_DUE} RETURNING *",
                    codec.to_micros(claim_until),
                    row["tenant"],
                    row["id"],
                    *due,
                )
                claimed += [codec.LEASES.from_row(r) for r in found]
        return claimed

    async def lease_revoked(self, tenant: str, lease_id: str, now: datetime, event: AuditEvent) -> bool:
        # Only the first to finish records it (the event goes only with a row changed): a worker whose
        # claim ran out mid-batch may drop a user that another replica has taken over and dropped since
        # (idempotent on the server).
        return (
            await self._write(
                "UPDATE leases SET state = 'revoked', revoked_at = ?, claimed_until = NULL,"
                " next_attempt_at = NULL WHERE tenant = ? AND id = ? AND state = 'revoking'",
                codec.to_micros(now),
                tenant,
                lease_id,
                events=[event],
            )
            > 0
        )

    async def lease_revocation_failed(
        self, tenant: str, lease_id: str, error: str, next_attempt_at: datetime
    ) -> None:
        await self._write(
            "UPDATE leases SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?,"
            " claimed_until = NULL WHERE tenant = ? AND id = ? AND state = 'revoking'",
            error,
            codec.to_micros(next_attempt_at),
            tenant,
            lease_id,
        )

    async def live_lease_usernames(self, usernames: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(usernames), 500):
            chunk = list(usernames[start : start + 500])
            marks = ", ".join("?" * len(chunk))
            rows = await self._engine.fetch(
                f"SELECT username FROM leases WHERE {_NOT_REVOKED} AND username IN ({marks})",  # noqa: S608
                *chunk,
            )
            found.update(str(row["username"]) for row in rows)
        return found

    async def lease_connections(self) -> list[tuple[str, str]]:
        rows = await self._engine.fetch("SELECT DISTINCT tenant, connection_id FROM leases")
        return [(str(row["tenant"]), str(row["connection_id"])) for row in rows]

    async def pending_revocations(self, now: datetime) -> int:
        rows = await self._engine.fetch(
            "SELECT COUNT(*) AS n FROM leases"
            " WHERE state = 'revoking' OR (state = 'active' AND expires_at <= ?)",
            codec.to_micros(now),
        )
        return int(rows[0]["n"])

    async def prune_revoked_leases(self, before: datetime, limit: int) -> int:
        check_limit(limit)
        return await self._write(
            "DELETE FROM leases WHERE (tenant, id) IN (SELECT tenant, id FROM leases"
            " WHERE state = 'revoked' AND revoked_at < ? LIMIT ?)",
            codec.to_micros(before),
            limit,
        )
