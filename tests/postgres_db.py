"""PostgreSQL databases for tests, on the server named by BROKER_TEST_POSTGRES_DSN.

Databases are created through the `postgres` maintenance database with unique names
and dropped (WITH (FORCE), so a leaked connection cannot keep one) at the end.
Without the variable, the test is skipped with the reason; CI sets it.

* `fresh_database()`: an empty database for one test (migrations, brokers).
* the `shared_postgres` fixture: one database for the whole session, emptied by
  `reset()` before each contract test (far cheaper than creating and migrating a
  database per test).
* `lease_roles(tag)`: a group role and a user-name prefix of their own on the server, for
  tests whose leases create database users; every role left with the prefix is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

DSN_VARIABLE = "BROKER_TEST_POSTGRES_DSN"
T = TypeVar("T")


def base_dsn() -> str:
    """The server's DSN, or skip the test."""
    dsn = os.environ.get(DSN_VARIABLE, "").strip()
    if not dsn:
        pytest.skip(f"{DSN_VARIABLE} is not set (e.g. postgresql://postgres@127.0.0.1:5432/test); CI sets it")
    return dsn


def with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at another database on the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def _create(dsn: str) -> str:
    name = f"broker_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(with_database(dsn, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name


async def _drop(dsn: str, name: str) -> None:
    admin = await asyncpg.connect(with_database(dsn, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """Create an empty, uniquely named database; yield its DSN; drop it afterwards."""
    dsn = base_dsn()
    name = await _create(dsn)
    try:
        yield with_database(dsn, name)
    finally:
        await _drop(dsn, name)


async def reset(dsn: str) -> None:
    """Empty every table but `schema_migrations` and restart the identity counters, in one commit."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
        )
        sequences = await conn.fetch("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'")
        # DELETE, not TRUNCATE: on tables this small it is much cheaper (no new files to sync).
        async with conn.transaction():
            for table in tables:
                await conn.execute(f'DELETE FROM "{table["tablename"]}"')
            for sequence in sequences:
                await conn.execute(f'ALTER SEQUENCE "{sequence["sequencename"]}" RESTART')
    finally:
        await conn.close()


def _in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on its own loop in its own thread, away from the test's loop."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


@contextlib.contextmanager
def fresh_database_blocking() -> Iterator[str]:
    """`fresh_database()` for fixtures that run outside an event loop (module or session scope)."""
    dsn = base_dsn()
    name = _in_thread(_create(dsn))
    try:
        yield with_database(dsn, name)
    finally:
        _in_thread(_drop(dsn, name))


@pytest.fixture(scope="session")
def shared_postgres() -> Iterator[str]:
    """One database for the session's contract tests; dropped at the end."""
    with fresh_database_blocking() as dsn:
        yield dsn


@dataclass(frozen=True)
class Roles:
    """A group role for leased users, and the prefix their names carry."""

    dsn: str  # the shared server, `postgres` maintenance database
    group: str
    prefix: str

    async def named(self) -> set[str]:
        """Roles on the server that carry this prefix."""
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                "SELECT rolname FROM pg_roles WHERE left(rolname, char_length($1)) = $1", self.prefix
            )
        finally:
            await conn.close()
        return {str(row[0]) for row in rows}


async def as_postgres(dsn: str, *statements: str) -> None:
    """Run `statements` in order on one connection to `dsn`."""
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def lease_roles(tag: str) -> Iterator[Roles]:
    """A fresh group role `<tag>_grp_<hex>` and user prefix `<tag[0]><hex>_` (skips without the server);
    the group and every role with the prefix are dropped afterwards. For module-scoped fixtures."""
    dsn = with_database(base_dsn(), "postgres")
    unique = secrets.token_hex(3)
    found = Roles(dsn, f"{tag}_grp_{unique}", f"{tag[0]}{unique}_")
    asyncio.run(as_postgres(dsn, f'CREATE ROLE "{found.group}" NOLOGIN'))
    try:
        yield found
    finally:
        left = sorted(asyncio.run(found.named()))
        drops = (f'DROP ROLE IF EXISTS "{name}"' for name in left)
        asyncio.run(as_postgres(dsn, *drops, f'DROP ROLE "{found.group}"'))
