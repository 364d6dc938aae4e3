"""The one migration list builds the same schema on both engines, and keeps old databases opening.

* Both live schemas, migrated from empty, read from each engine's catalog (tests/schema_facts.py)
  and compared: any difference not in ACCEPTED fails, and so does an ACCEPTED entry that is no
  longer true, so the list stays as short as the truth.
* Databases migrated by the scripts as first released (two trees, kept in
  tests/vectors/migrations_0008.json) open with today's runners: nothing applied, nothing changed,
  and a database migrated from empty today has exactly their schema.
* Migrations that rebuild or fill in existing rows keep them: grants from before grant modes,
  and the SQLite tables rebuilt by 0011 so that their key cannot be NULL.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import aiosqlite
import asyncpg
import pytest

from broker.model import Grant, GrantMode
from broker.store._codec import GRANTS, from_micros
from broker.store._migrate import Engine, Migration, apply_sqlite, load_migrations
from broker.store.postgres.migrate import apply_postgres
from broker.store.sqlite import SqliteStore
from tests.postgres_db import fresh_database
from tests.schema_facts import Facts, postgres_exact, postgres_facts, sqlite_exact, sqlite_facts

T = TypeVar("T")
RELEASED = json.loads(
    (Path(__file__).resolve().parent.parent / "vectors" / "migrations_0008.json").read_text(encoding="utf-8")
)

_EQUALITY_ONLY = (
    "only ever compared for equality, never ordered or paged on, so the database's default"
    " collation cannot change a result"
)

# Every difference between the engines' schemas, fact by fact: (SQLite, PostgreSQL, why).
ACCEPTED: dict[str, tuple[str | None, str | None, str]] = {
    "audit_events.id default": (
        "generated",
        None,
        "both stores write the id (tail + 1, as part of the hashed chain form; on PostgreSQL under"
        " the audit advisory lock); SQLite's AUTOINCREMENT predates the chain and is never used",
    ),
    "schema_migrations.version type": (
        "int",
        "int32",
        "created by each runner's bootstrap as INTEGER, which is 64 bits on SQLite and 32 on"
        " PostgreSQL; versions have four digits",
    ),
    "meta.key order": ("bytes", "database default", _EQUALITY_ONLY),
    "kek_wraps.kek_id order": ("bytes", "database default", _EQUALITY_ONLY),
    "connections.kek_id order": ("bytes", "database default", _EQUALITY_ONLY),
    "oauth_states.kek_id order": ("bytes", "database default", _EQUALITY_ONLY),
    "oauth_states.state_hash order": (
        "bytes",
        "database default",
        "compared for equality, and the one query that pages over it (master-key rewrap) says"
        ' COLLATE "C" itself',
    ),
    "secret_versions.tenant order": ("bytes", "database default", _EQUALITY_ONLY),
    "secret_versions.connection_id order": ("bytes", "database default", _EQUALITY_ONLY),
    "rate_buckets.kind order": ("bytes", "database default", _EQUALITY_ONLY),
    "rate_buckets.principal order": ("bytes", "database default", _EQUALITY_ONLY),
}


# Migrations written after the one list replaced the two released trees.
LATER = [m.version for m in load_migrations("sqlite") if m.version > 8]


def released(engine: Engine) -> list[Migration]:
    """The scripts 0001-0008 as first released for `engine`, exactly as they were checksummed."""
    return [Migration(int(stem[:4]), stem[5:], sql) for stem, sql in sorted(RELEASED[engine].items())]


async def migrate_sqlite(path: Path, migrations: list[Migration]) -> list[int]:
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        return await apply_sqlite(conn, migrations)


def read_sqlite(path: Path, reading: Callable[[sqlite3.Connection], T]) -> T:
    db = sqlite3.connect(path)
    try:
        return reading(db)
    finally:
        db.close()


def history(db: sqlite3.Connection) -> list[tuple[object, ...]]:
    return db.execute("SELECT * FROM schema_migrations ORDER BY version").fetchall()


def differences(sqlite: Facts, postgres: Facts) -> dict[str, tuple[str | None, str | None]]:
    return {
        key: (sqlite.get(key), postgres.get(key))
        for key in sorted(sqlite.keys() | postgres.keys())
        if sqlite.get(key) != postgres.get(key)
    }


async def test_both_engines_build_one_schema_but_for_the_declared_differences(tmp_path: Path) -> None:
    await migrate_sqlite(tmp_path / "parity.db", load_migrations("sqlite"))
    sqlite = read_sqlite(tmp_path / "parity.db", sqlite_facts)
    async with fresh_database() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await apply_postgres(conn, load_migrations("postgres"))
            postgres = await postgres_facts(conn)
        finally:
            await conn.close()

    # The reading is not vacuous: it sees the tables, keys, indexes and constraints.
    assert sqlite["connections primary key"] == postgres["connections primary key"] == "tenant, id"
    assert (
        postgres["connections index connections_live_name"]
        == "unique (tenant, name) where deleted_at is null"
    )
    assert postgres["grants foreign key (tenant, connection_id)"] == (
        "connections (tenant, id) on delete CASCADE on update NO ACTION"
    )
    assert postgres["connections check (status)"] == "active deleted revoked"
    assert postgres["rate_buckets.tokens type"] == "float"
    assert postgres["security_events.details default"] == "'{}'"

    found = differences(sqlite, postgres)
    undeclared = {k: v for k, v in found.items() if ACCEPTED.get(k, (None, None))[:2] != v}
    stale = sorted(ACCEPTED.keys() - found.keys())
    assert not undeclared, (
        "the engines' schemas differ where no difference is declared (SQLite, PostgreSQL); fix the"
        f" migration, or add the difference to ACCEPTED with its reason: {undeclared}"
    )
    assert not stale, f"declared differences that are no longer there; remove them from ACCEPTED: {stale}"


async def test_a_sqlite_database_from_the_released_scripts_opens_unchanged(tmp_path: Path) -> None:
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    assert await migrate_sqlite(old, released("sqlite")) == list(range(1, 9))
    schema, recorded = read_sqlite(old, sqlite_exact), read_sqlite(old, history)

    # The rewritten 0001-0008 build what the released ones built, and are not applied again.
    await migrate_sqlite(new, load_migrations("sqlite")[:8])
    assert read_sqlite(new, sqlite_exact) == schema
    assert await migrate_sqlite(old, load_migrations("sqlite")) == LATER
    assert read_sqlite(old, history)[:8] == recorded
    await migrate_sqlite(new, load_migrations("sqlite"))
    assert read_sqlite(old, sqlite_exact) == read_sqlite(new, sqlite_exact)


async def test_grants_made_before_grant_modes_are_resolve_grants(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    await migrate_sqlite(path, released("sqlite"))

    def add_grant(db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT INTO grants (tenant, connection_id, principal, created_at, created_by)"
            " VALUES ('t', 'conn_1', 'p', 0, 'admin')"
        )
        db.commit()

    read_sqlite(path, add_grant)
    await migrate_sqlite(path, load_migrations("sqlite"))

    def grants(db: sqlite3.Connection) -> list[Grant]:
        db.row_factory = sqlite3.Row
        return [GRANTS.from_row(row) for row in db.execute(GRANTS.select)]

    assert read_sqlite(path, grants) == [Grant("t", "conn_1", "p", from_micros(0), "admin")]
    assert read_sqlite(path, grants)[0].mode is GrantMode.RESOLVE


# Migration 0011 rebuilds these SQLite tables so that their key is NOT NULL: (key column, a row).
KEY_NOT_NULL = 11
KEYED_TABLES: dict[str, tuple[str, tuple[object, ...]]] = {
    "meta": ("key", ("key_check", b"\x00sealed")),
    "oauth_states": ("state_hash", ("9f86d0", "t", "admin", "conn_1", 1, 2, b"ct", b"dek", "kek-1")),
    "kek_wraps": ("kek_id", ("kek-1", 7)),
    "audit_seals": ("last_id", (5, "ab" * 32, "kek-1", "cd" * 32, 3)),
}


def insert(db: sqlite3.Connection, table: str, row: tuple[object, ...]) -> None:
    """Insert `row` into the table's first columns (later migrations add columns with defaults)."""
    columns = [info[1] for info in db.execute(f"PRAGMA table_info('{table}')")][: len(row)]
    db.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(row))})", row)


async def test_sqlite_keys_refuse_null_after_0011_and_the_rows_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    await migrate_sqlite(path, load_migrations("sqlite")[: KEY_NOT_NULL - 1])

    def fill(db: sqlite3.Connection) -> dict[str, list[tuple[object, ...]]]:
        # Nothing refers to these tables, so rebuilding them leaves no foreign key, trigger or view behind.
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        parents = {fk[2] for table in tables for fk in db.execute(f"PRAGMA foreign_key_list('{table}')")}
        assert "connections" in parents
        assert not parents & KEYED_TABLES.keys()
        others = db.execute("SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'view')")
        assert others.fetchall() == []
        for table, (_, row) in KEYED_TABLES.items():
            insert(db, table, row)
            insert(db, table, (None, *row[1:]))  # taken before 0011; such a row is not kept
        db.commit()
        return {table: db.execute(f"SELECT * FROM {table}").fetchall() for table in KEYED_TABLES}

    before = read_sqlite(path, fill)
    assert all(len(rows) == 2 for rows in before.values())

    store = SqliteStore(path)  # migrates as the broker does: foreign keys on, secure_delete
    await store.open()
    try:
        assert await store.get_meta("key_check") == b"\x00sealed"
        assert await store.kek_wraps() == {"kek-1": 7}
    finally:
        await store.close()

    def check(db: sqlite3.Connection) -> None:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA index_info('oauth_states_by_kek')").fetchall() == [(0, 8, "kek_id")]
        for table, (key, row) in KEYED_TABLES.items():
            kept = [
                stored[: len(row)] for stored in db.execute(f"SELECT * FROM {table}")
            ]  # later columns aside
            assert kept == [row] == before[table][:1]
            with pytest.raises(sqlite3.IntegrityError) as refused:
                insert(db, table, (None, *row[1:]))
            assert str(refused.value) == f"NOT NULL constraint failed: {table}.{key}"

    read_sqlite(path, check)


async def test_the_sqlite_key_rebuild_changes_nothing_on_postgres() -> None:
    async with fresh_database() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await apply_postgres(conn, load_migrations("postgres")[: KEY_NOT_NULL - 1])
            schema = await postgres_exact(conn)
            assert await apply_postgres(conn, load_migrations("postgres")[:KEY_NOT_NULL]) == [KEY_NOT_NULL]
            assert await postgres_exact(conn) == schema
        finally:
            await conn.close()


async def test_a_postgres_database_from_the_released_scripts_opens_unchanged() -> None:
    async with fresh_database() as old, fresh_database() as new:
        conn = await asyncpg.connect(old)
        try:
            assert await apply_postgres(conn, released("postgres")) == list(range(1, 9))
            schema = await postgres_exact(conn)
            recorded = await conn.fetch("SELECT * FROM schema_migrations ORDER BY version")

            assert await apply_postgres(conn, load_migrations("postgres")) == LATER
            assert (await conn.fetch("SELECT * FROM schema_migrations ORDER BY version"))[:8] == recorded
            upgraded = await postgres_exact(conn)
        finally:
            await conn.close()
        conn = await asyncpg.connect(new)
        try:
            # The rewritten 0001-0008 build what the released ones built; the rest the same as above.
            await apply_postgres(conn, load_migrations("postgres")[:8])
            assert await postgres_exact(conn) == schema
            await apply_postgres(conn, load_migrations("postgres"))
            assert await postgres_exact(conn) == upgraded
        finally:
            await conn.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_the_released_checksums_are_the_only_aliases(engine: Engine) -> None:
    shipped = load_migrations(engine)
    old = released(engine)
    assert [(m.version, m.name) for m in shipped[: len(old)]] == [(m.version, m.name) for m in old]
    for then, now in zip(old, shipped, strict=False):
        # Each released checksum is accepted, and an alias is kept only where the text changed.
        assert now.released_checksums == ({then.checksum} - {now.checksum})
    assert all(not m.released_checksums for m in shipped[len(old) :])
