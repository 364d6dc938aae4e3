"""Master-key bookkeeping on SQLite: broker-wide values (the key-check canary), which keys
wrap the stored data keys, re-wrapping, encryption counts and superseded secret versions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import aiosqlite

from broker.crypto import Sealed
from broker.store import _codec as codec
from broker.store import _sql
from broker.store.protocols import WrappedDek
from broker.store.sqlite._base import SqliteBase


class Keys(SqliteBase):
    """Meta values and the master keys' view of the stored data keys."""

    # ------------------------------------------------------------------ meta

    async def get_meta(self, key: str) -> bytes | None:
        """A broker-wide value, or None."""
        rows = await self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return bytes(rows[0]["value"]) if rows else None

    async def put_meta(self, key: str, value: bytes) -> None:
        """Insert or replace a broker-wide value."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    async def kek_ids_in_use(self) -> set[str]:
        """Ids of the master keys that wrap a stored data key, across all tenants."""
        rows = await self._read(
            "SELECT kek_id FROM connections WHERE kek_id IS NOT NULL UNION SELECT kek_id FROM oauth_states",
            (),
        )
        return {row["kek_id"] for row in rows}

    # ----------------------------------------------------------- master keys

    async def deks_by_kek(self) -> dict[str, int]:
        """How many stored data keys each master key wraps (connections and pending flows)."""
        rows = await self._read(
            "SELECT kek_id, COUNT(*) AS n FROM (SELECT kek_id FROM connections WHERE kek_id IS NOT NULL"
            " UNION ALL SELECT kek_id FROM oauth_states) GROUP BY kek_id",
            (),
        )
        return {row["kek_id"]: int(row["n"]) for row in rows}

    async def list_deks_not_under(
        self, kek_id: str, limit: int, after: tuple[str, str, str] | None = None
    ) -> list[WrappedDek]:
        """Up to `limit` stored data keys wrapped by another master key, by (kind, tenant, key)."""
        _sql.check_limit(limit)
        cursor = after or ("", "", "")
        rows = await self._read(
            "SELECT * FROM (SELECT 'connection' AS kind, tenant, id AS key, secret_version, ciphertext,"
            " wrapped_dek, kek_id FROM connections WHERE kek_id IS NOT NULL AND kek_id <> ?"
            " UNION ALL SELECT 'oauth_state', tenant, state_hash, 0, ciphertext, wrapped_dek, kek_id"
            " FROM oauth_states WHERE kek_id <> ?) WHERE (kind, tenant, key) > (?, ?, ?)"
            " ORDER BY kind, tenant, key LIMIT ?",
            (kek_id, kek_id, *cursor, limit),
        )
        return [
            WrappedDek(
                kind=row["kind"],
                tenant=row["tenant"],
                key=row["key"],
                secret_version=int(row["secret_version"]),
                sealed=codec.sealed_from_row(row),
            )
            for row in rows
        ]

    async def rewrap_deks(
        self, rewrapped: Sequence[tuple[WrappedDek, Sealed]], wraps: Mapping[str, int]
    ) -> int:
        """Store re-wrapped keys, each only if its row still holds the key read; one transaction.

        Only wrapped_dek and kek_id change (never the version, the ciphertext or anything
        else); `wraps` is added to the per-key counts in the same transaction. Returns
        how many rows were updated: a row re-sealed or purged meanwhile is left alone.
        """
        updated = 0
        async with self._transaction() as conn:
            for old, new in rewrapped:
                if new.ciphertext != old.sealed.ciphertext:
                    raise ValueError("a re-wrap must keep the ciphertext")
                if old.kind == "connection":
                    sql = (
                        "UPDATE connections SET wrapped_dek = ?, kek_id = ? WHERE tenant = ? AND id = ?"
                        " AND secret_version = ? AND kek_id = ? AND wrapped_dek = ? AND ciphertext = ?"
                    )
                    params: tuple[Any, ...] = (new.wrapped_dek, new.kek_id, old.tenant, old.key)
                    params += (old.secret_version, old.sealed.kek_id, old.sealed.wrapped_dek, new.ciphertext)
                else:
                    sql = (
                        "UPDATE oauth_states SET wrapped_dek = ?, kek_id = ?"
                        " WHERE tenant = ? AND state_hash = ? AND kek_id = ? AND wrapped_dek = ?"
                        " AND ciphertext = ?"
                    )
                    params = (new.wrapped_dek, new.kek_id, old.tenant, old.key)
                    params += (old.sealed.kek_id, old.sealed.wrapped_dek, new.ciphertext)
                async with conn.execute(sql, params) as cursor:
                    updated += cursor.rowcount
            await self._add_wraps(conn, wraps)
        return updated

    async def add_kek_wraps(self, wraps: Mapping[str, int]) -> None:
        """Add to the persisted count of encryptions under each master key."""
        if any(wraps.values()):
            async with self._transaction() as conn:
                await self._add_wraps(conn, wraps)

    @staticmethod
    async def _add_wraps(conn: aiosqlite.Connection, wraps: Mapping[str, int]) -> None:
        await conn.executemany(
            "INSERT INTO kek_wraps (kek_id, wraps) VALUES (?, ?)"
            " ON CONFLICT (kek_id) DO UPDATE SET wraps = wraps + excluded.wraps",
            [(kek_id, n) for kek_id, n in sorted(wraps.items()) if n],
        )

    async def kek_wraps(self) -> dict[str, int]:
        """The persisted count of encryptions under each master key."""
        rows = await self._read("SELECT kek_id, wraps FROM kek_wraps", ())
        return {row["kek_id"]: int(row["wraps"]) for row in rows}

    async def superseded_at(self, tenant: str, connection_id: str, secret_version: int) -> datetime | None:
        """When this secret version of the connection was replaced, if still remembered."""
        rows = await self._read(
            "SELECT superseded_at FROM secret_versions WHERE tenant = ? AND connection_id = ?"
            " AND secret_version = ?",
            (tenant, connection_id, secret_version),
        )
        return codec.from_micros(rows[0]["superseded_at"]) if rows else None

    async def purge_superseded(self, before: datetime) -> int:
        """Forget secret versions replaced before `before`; returns how many."""
        async with (
            self._transaction() as conn,
            conn.execute(
                "DELETE FROM secret_versions WHERE superseded_at < ?", (codec.to_micros(before),)
            ) as cursor,
        ):
            return int(cursor.rowcount)
