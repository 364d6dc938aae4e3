"""Master-key bookkeeping: broker-wide values (the key-check canary), which keys wrap the
stored data keys, re-wrapping, encryption counts and superseded secret versions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from broker.crypto import Sealed
from broker.store import _codec as codec
from broker.store import changes
from broker.store.engine import Tx
from broker.store.lifecycle import EngineStore, check_limit
from broker.store.protocols import WrappedDek

# Every stored data key as (kind, tenant, key), in byte order on both engines (one collation
# for the UNION too).
_DEKS_NOT_UNDER = (
    "SELECT * FROM (SELECT 'connection' COLLATE BINARY AS kind, tenant COLLATE BINARY AS tenant,"
    " id COLLATE BINARY AS key, secret_version, ciphertext, wrapped_dek, kek_id FROM connections"
    " WHERE kek_id IS NOT NULL AND kek_id <> ?"
    " UNION ALL SELECT 'oauth_state' COLLATE BINARY, tenant COLLATE BINARY, state_hash COLLATE BINARY, 0,"
    " ciphertext, wrapped_dek, kek_id FROM oauth_states WHERE kek_id <> ?) AS wrapped"
    " WHERE (kind, tenant, key) > (?, ?, ?) ORDER BY kind, tenant, key LIMIT ?"
)
# Compare-and-swap per row: a row re-sealed or purged meanwhile no longer matches. Both take
# the same parameters; a pending flow's secret version is always 0.
_REWRAP = {
    "connection": "UPDATE connections SET wrapped_dek = ?, kek_id = ? WHERE tenant = ? AND id = ?"
    " AND secret_version = ? AND kek_id = ? AND wrapped_dek = ? AND ciphertext = ?",
    "oauth_state": "UPDATE oauth_states SET wrapped_dek = ?, kek_id = ? WHERE tenant = ? AND state_hash = ?"
    " AND 0 = ? AND kek_id = ? AND wrapped_dek = ? AND ciphertext = ?",
}


class Keys(EngineStore):
    """Meta values and the master keys' view of the stored data keys (`protocols.KeyStore`)."""

    async def get_meta(self, key: str) -> bytes | None:
        rows = await self._engine.fetch("SELECT value FROM meta WHERE key = ?", key)
        return bytes(rows[0]["value"]) if rows else None

    async def put_meta(self, key: str, value: bytes) -> None:
        await self._write(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            key,
            value,
        )

    async def deks_by_kek(self) -> dict[str, int]:
        rows = await self._engine.fetch(
            "SELECT kek_id, COUNT(*) AS n FROM (SELECT kek_id FROM connections WHERE kek_id IS NOT NULL"
            " UNION ALL SELECT kek_id FROM oauth_states) AS wrapped GROUP BY kek_id"
        )
        return {row["kek_id"]: int(row["n"]) for row in rows}

    async def list_deks_not_under(
        self, kek_id: str, limit: int, after: tuple[str, str, str] | None = None
    ) -> list[WrappedDek]:
        check_limit(limit)
        rows = await self._engine.fetch(_DEKS_NOT_UNDER, kek_id, kek_id, *(after or ("", "", "")), limit)
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
        updated = 0
        async with self._engine.transaction() as tx:
            for old, new in rewrapped:
                if new.ciphertext != old.sealed.ciphertext:
                    raise ValueError("a re-wrap must keep the ciphertext")
                updated += await tx.execute(
                    _REWRAP[old.kind],
                    new.wrapped_dek,
                    new.kek_id,
                    old.tenant,
                    old.key,
                    old.secret_version,
                    old.sealed.kek_id,
                    old.sealed.wrapped_dek,
                    new.ciphertext,
                )
            if updated:
                # Cached records hold the old wrapped keys; one message rather than one per row.
                await tx.changed(changes.everything_changed())
            await _add_wraps(tx, wraps)
        return updated

    async def add_kek_wraps(self, wraps: Mapping[str, int]) -> None:
        if any(wraps.values()):
            async with self._engine.transaction() as tx:
                await _add_wraps(tx, wraps)

    async def kek_wraps(self) -> dict[str, int]:
        rows = await self._engine.fetch("SELECT kek_id, wraps FROM kek_wraps")
        return {row["kek_id"]: int(row["wraps"]) for row in rows}

    async def superseded_at(self, tenant: str, connection_id: str, secret_version: int) -> datetime | None:
        rows = await self._engine.fetch(
            "SELECT superseded_at FROM secret_versions WHERE tenant = ? AND connection_id = ?"
            " AND secret_version = ?",
            tenant,
            connection_id,
            secret_version,
        )
        return codec.from_micros(rows[0]["superseded_at"]) if rows else None

    async def purge_superseded(self, before: datetime) -> int:
        return await self._write(
            "DELETE FROM secret_versions WHERE superseded_at < ?", codec.to_micros(before)
        )


async def _add_wraps(tx: Tx, wraps: Mapping[str, int]) -> None:
    # Sorted, so replicas adding to the same keys lock the rows in one order.
    await tx.executemany(
        "INSERT INTO kek_wraps (kek_id, wraps) VALUES (?, ?)"
        " ON CONFLICT (kek_id) DO UPDATE SET wraps = kek_wraps.wraps + excluded.wraps",
        [(kek_id, n) for kek_id, n in sorted(wraps.items()) if n],
    )
