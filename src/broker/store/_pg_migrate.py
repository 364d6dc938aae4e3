"""PostgreSQL migrations: `migrations/postgres/NNNN_name.sql`, applied at start.

The same versions and names as the SQLite scripts (`migrations/NNNN_name.sql`),
translated where the engines differ; each script's header lists its differences.
Several replicas may start at once: the whole run holds a session-level advisory
lock, so exactly one applies a pending migration and the others then find it
recorded. Each migration runs in its own transaction (PostgreSQL DDL is
transactional) together with its row in `schema_migrations`, whose checksum
refuses a script edited after it was applied, as on SQLite.
"""

from __future__ import annotations

import time

import asyncpg

from broker.store._migrate import Migration, load_migrations

# Advisory lock keys (one 64-bit namespace per database); "broker" in ASCII, then a number.
MIGRATION_LOCK = 0x62726F6B65720001
AUDIT_LOCK = 0x62726F6B65720002
# The two-key form (class, key) is a separate space from the one-key form above:
# (REFRESH_LOCK_CLASS, a 32-bit hash of the connection) per OAuth2 token refresh.
REFRESH_LOCK_CLASS = 0x62726F6B  # "brok"

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    checksum    TEXT    NOT NULL,
    applied_at  BIGINT  NOT NULL
)
"""


def load_postgres_migrations() -> list[Migration]:
    """Every PostgreSQL migration shipped with the package, in version order."""
    return load_migrations("broker.store", "migrations/postgres")


async def apply_postgres(conn: asyncpg.Connection, migrations: list[Migration]) -> list[int]:
    """Apply the pending migrations under the migration lock; return the versions applied now.

    Refuses a database whose recorded migrations differ from the shipped ones
    (edited after release) or are newer than this code knows.
    """
    # Session-level, so it spans the bootstrap and every migration's own transaction;
    # released explicitly, or by the server when this connection dies.
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(_BOOTSTRAP)
        known = {m.version: m for m in migrations}
        recorded = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        done = set()
        for row in recorded:
            version, name = int(row["version"]), str(row["name"])
            shipped = known.get(version)
            if shipped is None:
                raise RuntimeError(
                    f"the database has migration {version:04d}_{name}, which this broker does not know; "
                    "it was written by a newer version"
                )
            if shipped.checksum != row["checksum"]:
                raise RuntimeError(f"migration {version:04d}_{name} was changed after it was applied")
            done.add(version)

        applied: list[int] = []
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                # A script without parameters runs as one simple-protocol batch.
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum, applied_at)"
                    " VALUES ($1, $2, $3, $4)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                    time.time_ns() // 1000,
                )
            applied.append(migration.version)
        return applied
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
