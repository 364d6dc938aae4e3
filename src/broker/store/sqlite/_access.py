"""Who may use a connection, and how its use is watched and paced, on SQLite: grants,
pending OAuth flows, security events, the monitor's remembered facts and rate buckets."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

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
from broker.store import _sql
from broker.store.sqlite._base import SqliteBase

# Statements are assembled from the constant column lists in `_codec`, never from input.
_GRANT_SELECT = "SELECT " + ", ".join(codec.GRANT_COLUMNS) + " FROM grants"  # noqa: S608
_GRANT_UPSERT = (
    f"INSERT INTO grants ({', '.join(codec.GRANT_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?) "  # noqa: S608
    "ON CONFLICT (tenant, connection_id, principal) DO UPDATE SET "
    "created_at = excluded.created_at, created_by = excluded.created_by, expires_at = excluded.expires_at"
)
_SECURITY_EVENT_SELECT = "SELECT id, " + ", ".join(codec.SECURITY_EVENT_COLUMNS) + " FROM security_events"  # noqa: S608
_SECURITY_EVENT_INSERT = (
    f"INSERT INTO security_events ({', '.join(codec.SECURITY_EVENT_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in codec.SECURITY_EVENT_COLUMNS)})"
)
_OAUTH_STATE_SELECT = "SELECT * FROM oauth_states WHERE state_hash = ? AND tenant = ? AND actor = ?"
_OAUTH_STATE_DELETE = "DELETE FROM oauth_states WHERE state_hash = ? AND tenant = ? AND actor = ?"


class Access(SqliteBase):
    """Grants, OAuth states, security events, seen facts and rate buckets."""

    # ---------------------------------------------------------------- grants

    async def put_grant(self, grant: Grant, event: AuditEvent) -> None:
        """Insert or replace the grant and write `event`; `NotFound` when the connection is unknown."""
        params = codec.grant_params(grant)
        try:
            async with self._transaction() as conn:
                await conn.execute(_GRANT_UPSERT, params)
                await self._insert_audit(conn, [event])
        except sqlite3.IntegrityError as exc:
            if "FOREIGN KEY" in str(exc):
                raise NotFound(f"connection {grant.connection_id} not found") from exc
            raise

    async def delete_grant(self, tenant: str, connection_id: str, principal: str, event: AuditEvent) -> bool:
        """Delete one grant and write `event`; False and nothing written when there was none."""
        async with self._transaction() as conn:
            async with conn.execute(
                "DELETE FROM grants WHERE tenant = ? AND connection_id = ? AND principal = ?",
                (tenant, connection_id, principal),
            ) as cursor:
                deleted = cursor.rowcount
            if deleted == 0:
                return False
            await self._insert_audit(conn, [event])
        return True

    async def get_grant(self, tenant: str, connection_id: str, principal: str) -> Grant | None:
        """The grant, expired or not, or None."""
        rows = await self._read(
            _GRANT_SELECT + " WHERE tenant = ? AND connection_id = ? AND principal = ?",
            (tenant, connection_id, principal),
        )
        return codec.grant_from_row(rows[0]) if rows else None

    async def list_grants(
        self, tenant: str, filter: GrantFilter, limit: int, after: tuple[str, str] | None
    ) -> list[Grant]:
        """Up to `limit` grants ordered by (connection_id, principal), after that pair when given."""
        _sql.check_limit(limit)
        where = ["tenant = ?"]
        params: list[Any] = [tenant]
        if filter.connection_id:
            where.append("connection_id = ?")
            params.append(filter.connection_id)
        if filter.principal:
            where.append("principal = ?")
            params.append(filter.principal)
        if after is not None:
            where.append("(connection_id > ? OR (connection_id = ? AND principal > ?))")
            params += [after[0], after[0], after[1]]
        sql = f"{_GRANT_SELECT} WHERE {' AND '.join(where)} ORDER BY connection_id, principal LIMIT ?"
        rows = await self._read(sql, [*params, limit])
        return [codec.grant_from_row(row) for row in rows]

    # ----------------------------------------------------------------- oauth

    async def put_oauth_state(self, pending: PendingAuthorization, event: AuditEvent) -> None:
        """Store a pending authorization-code flow and its audit event."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO oauth_states (state_hash, tenant, actor, connection_id, created_at, expires_at,"
                " ciphertext, wrapped_dek, kek_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                codec.oauth_state_params(pending),
            )
            await self._insert_audit(conn, [event])

    async def take_oauth_state(self, state_hash: str, tenant: str, actor: str) -> PendingAuthorization | None:
        """Remove and return the caller's pending flow: a state can be used once, by its owner."""
        key = (state_hash, tenant, actor)
        async with self._transaction() as conn:
            rows = list(await conn.execute_fetchall(_OAUTH_STATE_SELECT, key))
            if not rows:
                return None
            await conn.execute(_OAUTH_STATE_DELETE, key)
        return codec.oauth_state_from_row(rows[0])

    async def delete_expired_oauth_states(self, now: datetime) -> int:
        """Forget flows that were never completed; returns how many."""
        async with (
            self._transaction() as conn,
            conn.execute("DELETE FROM oauth_states WHERE expires_at <= ?", (codec.to_micros(now),)) as cursor,
        ):
            return int(cursor.rowcount)

    # -------------------------------------------------------------- security

    async def add_security_event(self, event: SecurityEvent) -> SecurityEvent:
        """Store a security event; returns it with the id the database gave it."""
        params = codec.security_event_params(event)
        async with self._transaction() as conn, conn.execute(_SECURITY_EVENT_INSERT, params) as cursor:
            event_id = cursor.lastrowid
        return replace(event, id=int(event_id or 0))

    async def list_security_events(
        self, tenant: str, filter: SecurityEventFilter, limit: int, before_id: int | None
    ) -> list[SecurityEvent]:
        """Up to `limit` of the tenant's events, newest first, with id < before_id when given."""
        arg = _sql.Params(numbered=False)
        sql = _sql.event_page(
            arg, _SECURITY_EVENT_SELECT, tenant, filter, limit, cursor=before_id, oldest_first=False
        )
        rows = await self._read(sql, arg.values)
        return [codec.security_event_from_row(row) for row in rows]

    async def remember_seen(self, facts: Sequence[SeenFact], keep: int) -> None:
        """Insert new facts (existing ones keep their first_seen), then trim each subject to `keep`."""
        if not facts:
            return
        _sql.check_limit(keep)
        async with self._transaction() as conn:
            await conn.executemany(
                "INSERT INTO monitor_seen (tenant, kind, subject, object, first_seen) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, kind, subject, object) DO NOTHING",
                [(f.tenant, f.kind, f.subject, f.object, codec.to_micros(f.first_seen)) for f in facts],
            )
            subjects = sorted({(f.tenant, f.kind, f.subject) for f in facts})
            await conn.executemany(
                "DELETE FROM monitor_seen WHERE tenant = ? AND kind = ? AND subject = ? AND object NOT IN"
                " (SELECT object FROM monitor_seen WHERE tenant = ? AND kind = ? AND subject = ?"
                " ORDER BY first_seen DESC, object LIMIT ?)",
                [(*key, *key, keep) for key in subjects],
            )

    async def load_seen(self, limit: int) -> list[SeenFact]:
        """Up to `limit` remembered facts, newest first."""
        _sql.check_limit(limit)
        rows = await self._read(
            "SELECT tenant, kind, subject, object, first_seen FROM monitor_seen"
            " ORDER BY first_seen DESC LIMIT ?",
            (limit,),
        )
        return [codec.seen_fact_from_row(row) for row in rows]

    # ----------------------------------------------------------- rate limits

    async def take_rate_token(self, kind: str, principal: str, rate_per_second: float, burst: int) -> float:
        """Read, refill, take and write back under the write lock (one writer: atomic)."""
        async with self._transaction() as conn:
            now = time.time()
            cursor = await conn.execute(
                "SELECT tokens, updated_at FROM rate_buckets WHERE kind = ? AND principal = ?",
                (kind, principal),
            )
            row = await cursor.fetchone()
            tokens, updated = (row[0], row[1]) if row is not None else (float(burst), now)
            tokens, wait = tokenbucket.take(tokens, updated, now, rate_per_second, burst)
            await conn.execute(
                "INSERT INTO rate_buckets (kind, principal, tokens, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (kind, principal) DO UPDATE SET tokens = excluded.tokens,"
                " updated_at = excluded.updated_at",
                (kind, principal, tokens, now),
            )
        return wait
