"""Who may use a connection, and how its use is watched and paced, on PostgreSQL: grants,
pending OAuth flows, security events, the monitor's remembered facts and rate buckets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

import asyncpg

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
from broker.store import _pg_changes as changes
from broker.store import _sql
from broker.store.postgres._base import PostgresBase, _row_count

# Statements are assembled from the constant column lists in `_codec`, never from input.
_GRANT_SELECT = "SELECT " + ", ".join(codec.GRANT_COLUMNS) + " FROM grants"  # noqa: S608
_GRANT_UPSERT = (
    f"INSERT INTO grants ({', '.join(codec.GRANT_COLUMNS)}) VALUES ($1, $2, $3, $4, $5, $6) "  # noqa: S608
    "ON CONFLICT (tenant, connection_id, principal) DO UPDATE SET "
    "created_at = excluded.created_at, created_by = excluded.created_by, expires_at = excluded.expires_at"
)
_SECURITY_EVENT_SELECT = "SELECT id, " + ", ".join(codec.SECURITY_EVENT_COLUMNS) + " FROM security_events"  # noqa: S608
_SECURITY_EVENT_INSERT = (
    f"INSERT INTO security_events ({', '.join(codec.SECURITY_EVENT_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(codec.SECURITY_EVENT_COLUMNS) + 1))}) RETURNING id"
)


class Access(PostgresBase):
    """Grants, OAuth states, security events, seen facts and rate buckets."""

    # ---------------------------------------------------------------- grants

    async def put_grant(self, grant: Grant, event: AuditEvent) -> None:
        """Insert or replace the grant and write `event`; `NotFound` when the connection is unknown."""
        try:
            async with self._transaction() as conn:
                await conn.execute(_GRANT_UPSERT, *codec.grant_params(grant))
                await changes.notify(
                    conn, changes.grant_changed(grant.tenant, grant.connection_id, grant.principal)
                )
                await self._insert_audit(conn, [event])
        except asyncpg.ForeignKeyViolationError as exc:
            raise NotFound(f"connection {grant.connection_id} not found") from exc

    async def delete_grant(self, tenant: str, connection_id: str, principal: str, event: AuditEvent) -> bool:
        """Delete one grant and write `event`; False and nothing written when there was none."""
        async with self._transaction() as conn:
            done = await conn.execute(
                "DELETE FROM grants WHERE tenant = $1 AND connection_id = $2 AND principal = $3",
                tenant,
                connection_id,
                principal,
            )
            if _row_count(done) == 0:
                return False
            await changes.notify(conn, changes.grant_changed(tenant, connection_id, principal))
            await self._insert_audit(conn, [event])
        return True

    async def get_grant(self, tenant: str, connection_id: str, principal: str) -> Grant | None:
        """The grant, expired or not, or None."""
        rows = await self._fetch(
            _GRANT_SELECT + " WHERE tenant = $1 AND connection_id = $2 AND principal = $3",
            tenant,
            connection_id,
            principal,
        )
        return codec.grant_from_row(rows[0]) if rows else None

    async def list_grants(
        self, tenant: str, filter: GrantFilter, limit: int, after: tuple[str, str] | None
    ) -> list[Grant]:
        """Up to `limit` grants ordered by (connection_id, principal), after that pair when given."""
        _sql.check_limit(limit)
        arg = _sql.Params(numbered=True)
        where = [f"tenant = {arg(tenant)}"]
        if filter.connection_id:
            where.append(f"connection_id = {arg(filter.connection_id)}")
        if filter.principal:
            where.append(f"principal = {arg(filter.principal)}")
        if after is not None:
            where.append(f"(connection_id, principal) > ({arg(after[0])}, {arg(after[1])})")
        order = f"ORDER BY connection_id, principal LIMIT {arg(limit)}"
        sql = f"{_GRANT_SELECT} WHERE {' AND '.join(where)} {order}"
        rows = await self._fetch(sql, *arg.values)
        return [codec.grant_from_row(row) for row in rows]

    # ----------------------------------------------------------------- oauth

    async def put_oauth_state(self, pending: PendingAuthorization, event: AuditEvent) -> None:
        """Store a pending authorization-code flow and its audit event."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO oauth_states (state_hash, tenant, actor, connection_id, created_at, expires_at,"
                " ciphertext, wrapped_dek, kek_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                *codec.oauth_state_params(pending),
            )
            await self._insert_audit(conn, [event])

    async def take_oauth_state(self, state_hash: str, tenant: str, actor: str) -> PendingAuthorization | None:
        """Remove and return the caller's pending flow in one `DELETE ... RETURNING`: single use."""
        rows = await self._fetch(
            "DELETE FROM oauth_states WHERE state_hash = $1 AND tenant = $2 AND actor = $3 RETURNING *",
            state_hash,
            tenant,
            actor,
        )
        return codec.oauth_state_from_row(rows[0]) if rows else None

    async def delete_expired_oauth_states(self, now: datetime) -> int:
        """Forget flows that were never completed; returns how many."""
        async with self._transaction() as conn:
            done = await conn.execute("DELETE FROM oauth_states WHERE expires_at <= $1", codec.to_micros(now))
        return _row_count(done)

    # -------------------------------------------------------------- security

    async def add_security_event(self, event: SecurityEvent) -> SecurityEvent:
        """Store a security event; returns it with the id the database gave it."""
        async with self._transaction() as conn:
            event_id = await conn.fetchval(_SECURITY_EVENT_INSERT, *codec.security_event_params(event))
        return replace(event, id=int(event_id))

    async def list_security_events(
        self, tenant: str, filter: SecurityEventFilter, limit: int, before_id: int | None
    ) -> list[SecurityEvent]:
        """Up to `limit` of the tenant's events, newest first, with id < before_id when given."""
        arg = _sql.Params(numbered=True)
        sql = _sql.event_page(
            arg, _SECURITY_EVENT_SELECT, tenant, filter, limit, cursor=before_id, oldest_first=False
        )
        rows = await self._fetch(sql, *arg.values)
        return [codec.security_event_from_row(row) for row in rows]

    async def remember_seen(self, facts: Sequence[SeenFact], keep: int) -> None:
        """Insert new facts (existing ones keep their first_seen), then trim each subject to `keep`."""
        if not facts:
            return
        _sql.check_limit(keep)
        rows = sorted({(f.tenant, f.kind, f.subject, f.object): f for f in facts}.items())
        async with self._transaction() as conn:
            await conn.executemany(
                "INSERT INTO monitor_seen (tenant, kind, subject, object, first_seen)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, kind, subject, object) DO NOTHING",
                [(*key, codec.to_micros(f.first_seen)) for key, f in rows],
            )
            subjects = sorted({(f.tenant, f.kind, f.subject) for f in facts})
            await conn.executemany(
                "DELETE FROM monitor_seen WHERE tenant = $1 AND kind = $2 AND subject = $3 AND object NOT IN"
                " (SELECT object FROM monitor_seen WHERE tenant = $1 AND kind = $2 AND subject = $3"
                " ORDER BY first_seen DESC, object LIMIT $4)",
                [(*key, keep) for key in subjects],
            )

    async def load_seen(self, limit: int) -> list[SeenFact]:
        """Up to `limit` remembered facts, newest first."""
        _sql.check_limit(limit)
        rows = await self._fetch(
            "SELECT tenant, kind, subject, object, first_seen FROM monitor_seen"
            " ORDER BY first_seen DESC LIMIT $1",
            limit,
        )
        return [codec.seen_fact_from_row(row) for row in rows]

    # ----------------------------------------------------------- rate limits

    async def take_rate_token(self, kind: str, principal: str, rate_per_second: float, burst: int) -> float:
        """Take from the shared bucket under its row lock, on the database server's clock."""
        async with self._transaction() as conn:
            # Insert a full bucket, or lock the existing row (the no-op update) and read it;
            # `now` is read after the lock was granted.
            row = await conn.fetchrow(
                "INSERT INTO rate_buckets (kind, principal, tokens, updated_at)"
                " VALUES ($1, $2, $3, extract(epoch FROM clock_timestamp()))"
                " ON CONFLICT (kind, principal) DO UPDATE SET kind = excluded.kind"
                " RETURNING tokens, updated_at, extract(epoch FROM clock_timestamp())::float8 AS now",
                kind,
                principal,
                float(burst),
            )
            now = row["now"]
            tokens, wait = tokenbucket.take(row["tokens"], row["updated_at"], now, rate_per_second, burst)
            await conn.execute(
                "UPDATE rate_buckets SET tokens = $3, updated_at = $4 WHERE kind = $1 AND principal = $2",
                kind,
                principal,
                tokens,
                now,
            )
        return wait
