"""Master-key bookkeeping on PostgreSQL: broker-wide values (the key-check canary), which keys
wrap the stored data keys, re-wrapping, encryption counts and superseded secret versions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import asyncpg

from broker.crypto import Sealed
from broker.store import _codec as codec
from broker.store import _pg_changes as changes
from broker.store import _sql
from broker.store.postgres._base import PostgresBase, _row_count
from broker.store.protocols import WrappedDek


class Keys(PostgresBase):
    """Meta values and the master keys' view of the stored data keys."""

    # ------------------------------------------------------------------ meta

    async def get_meta(self, key: str) -> bytes | None:
        """A broker-wide value, or None."""
        rows = await self._fetch("SELECT value FROM meta WHERE key = $1", key)
        return bytes(rows[0]["value"]) if rows else None

    async def put_meta(self, key: str, value: bytes) -> None:
        """Insert or replace a broker-wide value."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                key,
                value,
            )

    async def kek_ids_in_use(self) -> set[str]:
        """Ids of the master keys that wrap a stored data key, across all tenants."""
        rows = await self._fetch(
            "SELECT kek_id FROM connections WHERE kek_id IS NOT NULL UNION SELECT kek_id FROM oauth_states"
        )
        return {row["kek_id"] for row in rows}

    # ----------------------------------------------------------- master keys

    async def deks_by_kek(self) -> dict[str, int]:
        """How many stored data keys each master key wraps (connections and pending flows)."""
        rows = await self._fetch(
            "SELECT kek_id, COUNT(*) AS n FROM (SELECT kek_id FROM connections WHERE kek_id IS NOT NULL"
            " UNION ALL SELECT kek_id FROM oauth_states) AS wrapped GROUP BY kek_id"
        )
        return {row["kek_id"]: int(row["n"]) for row in rows}

    async def list_deks_not_under(
        self, kek_id: str, limit: int, after: tuple[str, str, str] | None = None
    ) -> list[WrappedDek]:
        """Up to `limit` stored data keys wrapped by another master key, by (kind, tenant, key)."""
        _sql.check_limit(limit)
        cursor = after or ("", "", "")
        # COLLATE "C" throughout: byte order, as on SQLite, and one collation for the UNION.
        rows = await self._fetch(
            'SELECT * FROM (SELECT \'connection\' COLLATE "C" AS kind, tenant COLLATE "C" AS tenant,'
            ' id COLLATE "C" AS key, secret_version, ciphertext, wrapped_dek, kek_id FROM connections'
            " WHERE kek_id IS NOT NULL AND kek_id <> $1"
            ' UNION ALL SELECT \'oauth_state\' COLLATE "C", tenant COLLATE "C", state_hash COLLATE "C", 0,'
            " ciphertext, wrapped_dek, kek_id FROM oauth_states WHERE kek_id <> $1) AS wrapped"
            " WHERE (kind, tenant, key) > ($2, $3, $4) ORDER BY kind, tenant, key LIMIT $5",
            kek_id,
            *cursor,
            limit,
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

        A compare-and-swap per row on (kek_id, wrapped_dek, ciphertext), READ COMMITTED:
        a row re-sealed or purged meanwhile (by any replica) no longer matches and is
        left alone. Never changes the version or the ciphertext.
        """
        updated = 0
        async with self._transaction() as conn:
            for old, new in rewrapped:
                if new.ciphertext != old.sealed.ciphertext:
                    raise ValueError("a re-wrap must keep the ciphertext")
                if old.kind == "connection":
                    done = await conn.execute(
                        "UPDATE connections SET wrapped_dek = $1, kek_id = $2 WHERE tenant = $3 AND id = $4"
                        " AND secret_version = $5 AND kek_id = $6 AND wrapped_dek = $7 AND ciphertext = $8",
                        new.wrapped_dek,
                        new.kek_id,
                        old.tenant,
                        old.key,
                        old.secret_version,
                        old.sealed.kek_id,
                        old.sealed.wrapped_dek,
                        new.ciphertext,
                    )
                else:
                    done = await conn.execute(
                        "UPDATE oauth_states SET wrapped_dek = $1, kek_id = $2 WHERE tenant = $3"
                        " AND state_hash = $4 AND kek_id = $5 AND wrapped_dek = $6 AND ciphertext = $7",
                        new.wrapped_dek,
                        new.kek_id,
                        old.tenant,
                        old.key,
                        old.sealed.kek_id,
                        old.sealed.wrapped_dek,
                        new.ciphertext,
                    )
                updated += _row_count(done)
            if updated:
                # Cached records hold the old wrapped keys; one message rather than one per row.
                await changes.notify(conn, changes.everything_changed())
            await self._add_wraps(conn, wraps)
        return updated

    async def add_kek_wraps(self, wraps: Mapping[str, int]) -> None:
        """Add to the persisted count of encryptions under each master key (an atomic increment)."""
        if any(wraps.values()):
            async with self._transaction() as conn:
                await self._add_wraps(conn, wraps)

    @staticmethod
    async def _add_wraps(conn: asyncpg.Connection, wraps: Mapping[str, int]) -> None:
        # Sorted, so replicas adding to the same keys lock the rows in one order.
        await conn.executemany(
            "INSERT INTO kek_wraps (kek_id, wraps) VALUES ($1, $2)"
            " ON CONFLICT (kek_id) DO UPDATE SET wraps = kek_wraps.wraps + excluded.wraps",
            [(kek_id, n) for kek_id, n in sorted(wraps.items()) if n],
        )

    async def kek_wraps(self) -> dict[str, int]:
        """The persisted count of encryptions under each master key."""
        rows = await self._fetch("SELECT kek_id, wraps FROM kek_wraps")
        return {row["kek_id"]: int(row["wraps"]) for row in rows}

    async def superseded_at(self, tenant: str, connection_id: str, secret_version: int) -> datetime | None:
        """When this secret version of the connection was replaced, if still remembered."""
        rows = await self._fetch(
            "SELECT superseded_at FROM secret_versions WHERE tenant = $1 AND connection_id = $2"
            " AND secret_version = $3",
            tenant,
            connection_id,
            secret_version,
        )
        return codec.from_micros(rows[0]["superseded_at"]) if rows else None

    async def purge_superseded(self, before: datetime) -> int:
        """Forget secret versions replaced before `before`; returns how many."""
        async with self._transaction() as conn:
            done = await conn.execute(
                "DELETE FROM secret_versions WHERE superseded_at < $1", codec.to_micros(before)
            )
        return _row_count(done)
