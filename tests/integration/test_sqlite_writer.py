"""The SQLite writer's transactions: statements whose result nobody reads are sent with the next
one that returns something (or the COMMIT), and a transaction still commits or rolls back whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.errors import Unavailable
from broker.store.engine import Duplicate
from broker.store.sqlite.engine import SqliteEngine


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[SqliteEngine]:
    engine = SqliteEngine(tmp_path / "broker.db")
    await engine.open()
    async with engine.transaction() as tx:
        await tx.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    yield engine
    await engine.close()


async def _keys(engine: SqliteEngine) -> list[str]:
    return [row[0] for row in await engine.fetch("SELECT k FROM t ORDER BY k")]


async def test_queued_rows_are_visible_to_the_transactions_own_reads_and_committed(
    engine: SqliteEngine,
) -> None:
    async with engine.transaction() as tx:
        await tx.executemany("INSERT INTO t (k) VALUES (?)", [("a",), ("b",)])
        assert await tx.fetchval("SELECT count(*) FROM t") == 2
        await tx.executemany("INSERT INTO t (k) VALUES (?)", [("c",)])
    assert await _keys(engine) == ["a", "b", "c"]


async def test_a_queued_statement_that_fails_rolls_back_the_whole_transaction(engine: SqliteEngine) -> None:
    with pytest.raises(Duplicate):
        async with engine.transaction() as tx:
            await tx.execute("INSERT INTO t (k) VALUES ('x')")
            await tx.executemany("INSERT INTO t (k) VALUES (?)", [("y",), ("x",)])  # fails at COMMIT
    assert await _keys(engine) == []
    async with engine.transaction() as tx:  # the writer is clean for the next one
        await tx.executemany("INSERT INTO t (k) VALUES (?)", [("z",)])
    assert await _keys(engine) == ["z"]


async def test_a_body_that_fails_or_is_cancelled_leaves_nothing_behind(engine: SqliteEngine) -> None:
    with pytest.raises(RuntimeError):
        async with engine.transaction() as tx:
            await tx.executemany("INSERT INTO t (k) VALUES (?)", [("never",)])
            raise RuntimeError("before anything was sent")

    async def stuck() -> None:
        async with engine.transaction() as tx:
            await tx.execute("INSERT INTO t (k) VALUES ('sent')")
            await asyncio.sleep(3600)

    task = asyncio.create_task(stuck())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _keys(engine) == []
    async with engine.transaction() as tx:
        await tx.execute("INSERT INTO t (k) VALUES ('after')")
    assert await _keys(engine) == ["after"]


async def test_a_database_that_cannot_be_written_is_unavailable_not_an_internal_error(
    engine: SqliteEngine,
) -> None:
    # A failing or full disk, or a file made read-only: the storage's fault, not the call's, and
    # the caller may retry (before: the raw sqlite3 error, INTERNAL at the API).
    assert engine.writer is not None
    await engine.writer.execute("PRAGMA query_only = ON")  # SQLITE_READONLY, as a real error
    with pytest.raises(Unavailable, match="cannot be written"):
        async with engine.transaction() as tx:
            await tx.execute("INSERT INTO t (k) VALUES ('lost')")
    await engine.writer.execute("PRAGMA query_only = OFF")
    async with engine.transaction() as tx:
        await tx.execute("INSERT INTO t (k) VALUES ('kept')")
    assert await _keys(engine) == ["kept"]
