"""PostgreSQL migrations: the one list (`store/_migrate.py`) rendered for PostgreSQL, applied at start.

Several replicas may start at once: the whole run holds a session-level advisory
lock, so exactly one applies a pending migration and the others then find it
recorded. Each migration runs in its own transaction (PostgreSQL DDL is
transactional) together with its row in `schema_migrations`, whose checksum
refuses a script edited after it was applied, as on SQLite.
"""

from __future__ import annotations

import asyncpg

from broker.store._migrate import BOOTSTRAP, RECORDED, Migration, check_recorded

# Advisory lock keys (one 64-bit namespace per database); "broker" in ASCII, then a number.
MIGRATION_LOCK = 0x62726F6B65720001
AUDIT_LOCK = 0x62726F6B65720002
# The two-key form (class, key) is a separate space from the one-key form above:
# (REFRESH_LOCK_CLASS, a 32-bit hash of the connection) per OAuth2 token refresh.
REFRESH_LOCK_CLASS = 0x62726F6B  # "brok"


async def apply_postgres(conn: asyncpg.Connection, migrations: list[Migration]) -> list[int]:
    """Apply the pending migrations under the migration lock; return the versions applied now.

    Refuses a database whose recorded migrations differ from the shipped ones
    (edited after release) or are newer than this code knows.
    """
    # Session-level, so it spans the bootstrap and every migration's own transaction;
    # released explicitly, or by the server when this connection dies.
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(BOOTSTRAP)
        done = check_recorded(migrations, await conn.fetch(RECORDED))

        applied: list[int] = []
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                # A script without parameters runs as one simple-protocol batch. One that has no
                # statement for PostgreSQL (all `{sqlite: ... | postgres: }`) is only recorded:
                # asyncpg fails on a batch of comments alone (MagicStack/asyncpg#1259).
                if migration.statements():
                    await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum, applied_at)"
                    " VALUES ($1, $2, $3, $4)",
                    *migration.record(),
                )
            applied.append(migration.version)
        return applied
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
