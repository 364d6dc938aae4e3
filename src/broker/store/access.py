"""Who may use a connection, and how its use is watched and paced: grants, pending OAuth
flows, security events, the monitor's remembered facts and shared rate buckets."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from broker import tokenbucket
from broker.errors import NotFound
from broker.model import (
    AuditEvent,
    Grant,
    GrantFilter,
    PendingAuthorization,
    SecurityEvent,
    SecurityEventFilter,
    SeenFact,
)
from broker.store import _codec as codec
from broker.store import changes
from broker.store.audit import event_page
from broker.store.engine import MissingParent
from broker.store.lifecycle import EngineStore, Where, check_limit

_GRANT_BY_KEY = codec.GRANTS.select + " WHERE tenant = ? AND connection_id = ? AND principal = ?"
_GRANT_KEY = ("tenant", "connection_id", "principal")
_GRANT_UPSERT = f"{codec.GRANTS.insert} ON CONFLICT ({', '.join(_GRANT_KEY)}) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in codec.GRANTS.columns if c not in _GRANT_KEY
)


@functools.cache
def _bucket_take(now_sql: str) -> str:
    """Insert a full bucket, or lock the existing row (the no-op update), and read it with the
    engine's clock (`now_sql`), read after the lock was granted."""
    return (
        f"INSERT INTO rate_buckets (kind, principal, tokens, updated_at) VALUES (?, ?, ?, {now_sql})"  # noqa: S608
        " ON CONFLICT (kind, principal) DO UPDATE SET kind = excluded.kind"
        f" RETURNING tokens, updated_at, {now_sql} AS now"
    )


class Access(EngineStore):
    """Grants, OAuth states, security events, seen facts, rate buckets (contracts: `protocols`)."""

    # ---------------------------------------------------------------- grants

    async def put_grant(self, grant: Grant, event: AuditEvent) -> None:
        try:
            await self._write(
                _GRANT_UPSERT,
                *codec.GRANTS.params(grant),
                events=[event],
                change=changes.grant_changed(grant.tenant, grant.connection_id, grant.principal),
            )
        except MissingParent as exc:
            raise NotFound(f"connection {grant.connection_id} not found") from exc

    async def delete_grant(self, tenant: str, connection_id: str, principal: str, event: AuditEvent) -> bool:
        deleted = await self._write(
            "DELETE FROM grants WHERE tenant = ? AND connection_id = ? AND principal = ?",
            tenant,
            connection_id,
            principal,
            events=[event],
            change=changes.grant_changed(tenant, connection_id, principal),
        )
        return deleted > 0

    async def delete_principal_grants(self, tenant: str, principal: str, event: AuditEvent) -> list[str]:
        async with self._engine.transaction() as tx:
            # Locked in connection order first: a DELETE locks rows in whatever order its plan reads
            # them, and two replicas cutting the same principal off at once could take them in
            # opposite orders and deadlock (one aborted: UNAVAILABLE). Only the rows locked here
            # are deleted, so a grant made meanwhile cannot bring a second order back in.
            rows = await tx.fetch(
                "SELECT connection_id FROM grants WHERE tenant = ? AND principal = ?"  # noqa: S608
                f" ORDER BY connection_id{self._engine.lock_rows_sql}",
                tenant,
                principal,
            )
            locked = [str(row["connection_id"]) for row in rows]
            removed = []
            for connection_id in locked:
                # A row another caller deleted while this one waited for its lock is not ours to count.
                if await tx.execute(
                    "DELETE FROM grants WHERE tenant = ? AND connection_id = ? AND principal = ?",
                    tenant,
                    connection_id,
                    principal,
                ):
                    removed.append(connection_id)
            # What a single delete_grant says, once per grant: every replica's cache and lease
            # service hear exactly what they would from that many ungrants.
            for connection_id in removed:
                await tx.changed(changes.grant_changed(tenant, connection_id, principal))
            if removed:
                await self._insert_audit(tx, [replace(event, connection_id=c) for c in removed])
        return removed

    async def get_grant(self, tenant: str, connection_id: str, principal: str) -> Grant | None:
        rows = await self._engine.fetch_by_key(_GRANT_BY_KEY, tenant, connection_id, principal)
        return codec.GRANTS.from_row(rows[0]) if rows else None

    async def list_grants(
        self, tenant: str, filter: GrantFilter, limit: int, after: tuple[str, str] | None
    ) -> list[Grant]:
        where = Where("tenant = ?", tenant)
        where.equals("connection_id", filter.connection_id)
        where.equals("principal", filter.principal)
        if after is not None:
            where.add("(connection_id, principal) > (?, ?)", *after)
        sql, args = where.page(codec.GRANTS.select, "connection_id, principal", limit)
        return [codec.GRANTS.from_row(row) for row in await self._engine.fetch(sql, *args)]

    # ----------------------------------------------------------------- oauth

    async def put_oauth_state(self, pending: PendingAuthorization, event: AuditEvent) -> None:
        await self._write(codec.OAUTH_STATES.insert, *codec.OAUTH_STATES.params(pending), events=[event])

    async def take_oauth_state(self, state_hash: str, tenant: str, actor: str) -> PendingAuthorization | None:
        """Remove and return the caller's pending flow in one `DELETE ... RETURNING`: single use."""
        async with self._engine.transaction() as tx:
            rows = await tx.fetch(
                "DELETE FROM oauth_states WHERE state_hash = ? AND tenant = ? AND actor = ? RETURNING *",
                state_hash,
                tenant,
                actor,
            )
        return codec.OAUTH_STATES.from_row(rows[0]) if rows else None

    async def delete_expired_oauth_states(self, now: datetime) -> int:
        return await self._write("DELETE FROM oauth_states WHERE expires_at <= ?", codec.to_micros(now))

    # -------------------------------------------------------------- security

    async def add_security_event(self, event: SecurityEvent) -> SecurityEvent:
        async with self._engine.transaction() as tx:
            event_id = await tx.fetchval(
                codec.SECURITY_EVENTS.insert + " RETURNING id", *codec.SECURITY_EVENTS.params(event)
            )
        return replace(event, id=int(event_id))

    async def list_security_events(
        self, tenant: str, filter: SecurityEventFilter, limit: int, before_id: int | None
    ) -> list[SecurityEvent]:
        sql, args = event_page(
            codec.SECURITY_EVENTS.select, tenant, filter, limit, cursor=before_id, oldest_first=False
        )
        return [codec.SECURITY_EVENTS.from_row(row) for row in await self._engine.fetch(sql, *args)]

    async def remember_seen(self, facts: Sequence[SeenFact], keep: int) -> None:
        """Insert new facts (existing ones keep their first_seen), then trim each subject to `keep`."""
        if not facts:
            return
        check_limit(keep)
        # Sorted (and unique), so replicas remembering overlapping facts lock rows in one order.
        rows = sorted({(f.tenant, f.kind, f.subject, f.object): f for f in facts}.items())
        async with self._engine.transaction() as tx:
            await tx.executemany(
                "INSERT INTO monitor_seen (tenant, kind, subject, object, first_seen) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, kind, subject, object) DO NOTHING",
                [(*key, codec.to_micros(f.first_seen)) for key, f in rows],
            )
            subjects = sorted({(f.tenant, f.kind, f.subject) for f in facts})
            await tx.executemany(
                "DELETE FROM monitor_seen WHERE tenant = ? AND kind = ? AND subject = ? AND object NOT IN"
                " (SELECT object FROM monitor_seen WHERE tenant = ? AND kind = ? AND subject = ?"
                " ORDER BY first_seen DESC, object LIMIT ?)",
                [(*key, *key, keep) for key in subjects],
            )

    async def load_seen(self, limit: int) -> list[SeenFact]:
        check_limit(limit)
        rows = await self._engine.fetch(codec.SEEN.select + " ORDER BY first_seen DESC LIMIT ?", limit)
        return [codec.SEEN.from_row(row) for row in rows]

    # ----------------------------------------------------------- rate limits

    async def take_rate_token(self, kind: str, principal: str, rate_per_second: float, burst: int) -> float:
        """Take one token from the shared bucket under its row lock, on the database's clock."""
        async with self._engine.transaction() as tx:
            [row] = await tx.fetch(_bucket_take(self._engine.now_sql), kind, principal, float(burst))
            tokens, wait = tokenbucket.take(
                row["tokens"], row["updated_at"], row["now"], rate_per_second, burst
            )
            await tx.execute(
                "UPDATE rate_buckets SET tokens = ?, updated_at = ? WHERE kind = ? AND principal = ?",
                tokens,
                row["now"],
                kind,
                principal,
            )
        return wait
