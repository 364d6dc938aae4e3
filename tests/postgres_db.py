"""PostgreSQL databases for tests, on the server named by BROKER_TEST_POSTGRES_DSN.

Databases are created through the `postgres` maintenance database with unique names
and dropped (WITH (FORCE), so a leaked connection cannot keep one) at the end.
Without the variable, the test is skipped with the reason; CI sets it.

* `fresh_database()`: an empty database for one test (migrations, brokers).
* the `shared_postgres` fixture: one database for the whole session, emptied by
  `reset()` before each contract test (far cheaper than creating and migrating a
  database per test).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
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
