"""What several replicas on one store need from it: a change feed, a refresh lock, shared buckets.

The shared rate bucket is part of the contract (both backends). The change feed
and the refresh lock only do something on PostgreSQL (SQLite has one process);
those tests run several `PostgresStore`s on one fresh database, as replicas would.
"""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
import pytest

from broker.crypto.envelope import Sealed
from broker.store import Store
from broker.store.postgres import PostgresStore
from tests.helpers import Recorder, eventually
from tests.integration import test_store as contract
from tests.integration.test_store import TENANT, create, make_event, make_grant, replicas
from tests.postgres_db import shared_postgres, with_database  # noqa: F401 (fixture)

# The contract suite's fixtures: `store` is each backend in turn, `pg_dsn` a fresh database.
store = contract.store
pg_dsn = contract.pg_dsn

EXECUTOR = "spiffe://example.org/tenant/acme/executor/etl"


# ------------------------------------------------------- shared rate buckets


async def test_shared_bucket_gives_its_burst_to_concurrent_takers_then_refuses(store: Store) -> None:
    takes = (store.take_rate_token("admin_write", "alice", 0.001, 5) for _ in range(20))
    waits = await asyncio.gather(*takes)
    assert sum(1 for w in waits if w == 0.0) == 5
    # Refused takes say how long until a token is back (about 1/rate), and took nothing.
    assert all(900 < w < 1001 for w in waits if w > 0)
    assert await store.take_rate_token("admin_write", "bob", 0.001, 5) == 0.0  # per principal
    assert await store.take_rate_token("test", "alice", 0.001, 5) == 0.0  # per class


async def test_shared_bucket_refills_at_its_rate(store: Store) -> None:
    # 2/s: each take must come within half a second of the last for a token not to refill
    # between them, slack enough for a loaded machine.
    for _ in range(2):
        assert await store.take_rate_token("test", "alice", 2.0, 2) == 0.0
    assert await store.take_rate_token("test", "alice", 2.0, 2) > 0
    await asyncio.sleep(1.1)  # more than two tokens' worth, capped at the burst of 2
    assert [await store.take_rate_token("test", "alice", 2.0, 2) == 0.0 for _ in range(3)] == [
        True,
        True,
        False,
    ]


async def test_postgres_replicas_draw_from_one_bucket(pg_dsn: str) -> None:
    async with replicas(pg_dsn, 3) as stores:
        takes = [s.take_rate_token("admin_write", "alice", 0.001, 7) for s in stores for _ in range(10)]
        waits = await asyncio.gather(*takes)
    assert sum(1 for w in waits if w == 0.0) == 7  # 7 in total, not 7 per replica


# ---------------------------------------------------------------- refresh lock


async def test_postgres_refresh_lock_lets_one_replica_in_at_a_time(pg_dsn: str) -> None:
    async with replicas(pg_dsn, 2) as (a, b):
        order: list[str] = []

        async def hold(store: PostgresStore, name: str, connection_id: str, seconds: float) -> None:
            async with store.refresh_lock(TENANT, connection_id):
                order.append(f"{name} in")
                await asyncio.sleep(seconds)
                order.append(f"{name} out")

        first = asyncio.create_task(hold(a, "a", "conn_1", 0.3))
        await eventually(lambda: order == ["a in"], 2, "a holds the lock")
        second = asyncio.create_task(hold(b, "b", "conn_1", 0))
        other = asyncio.create_task(hold(b, "b-other", "conn_2", 0))
        await other  # another connection's lock is not held up
        await asyncio.gather(first, second)
        assert order.index("b in") > order.index("a out")

        # A body that fails releases the lock too.
        with pytest.raises(RuntimeError):
            async with a.refresh_lock(TENANT, "conn_1"):
                raise RuntimeError("token endpoint said no")
        async with asyncio.timeout(2):
            async with b.refresh_lock(TENANT, "conn_1"):
                pass


# ----------------------------------------------------------------- change feed


async def test_a_stores_own_committed_writes_reach_its_sink_before_the_call_returns(store: Store) -> None:
    # One feed for this process's writes and other replicas': the Resolve cache is told
    # nowhere else, so a read right after a write is never served stale. (On PostgreSQL the
    # replica's own NOTIFY arrives again later: harmless, it only forgets again.)
    sink = Recorder()
    await store.watch(sink)
    record, untouched = await create(store), await create(store)
    moved = dataclasses.replace(record, version=record.version + 1, labels={"moved": "yes"})
    await store.replace_connection(moved, record.version, make_event(connection_id=record.id))
    assert ("connection", TENANT, record.id) in sink.calls
    sink.calls.clear()
    await store.put_grant(make_grant(record.id, EXECUTOR), make_event(action="grant.create"))
    assert ("grant", TENANT, record.id, EXECUTOR) in sink.calls
    sink.calls.clear()
    await store.delete_grant(TENANT, record.id, EXECUTOR, make_event(action="grant.delete"))
    assert ("grant", TENANT, record.id, EXECUTOR) in sink.calls
    await store.announce_block(TENANT, EXECUTOR, 1_900_000_000.5)
    assert ("blocked", TENANT, EXECUTOR, "1900000000.5") in sink.calls

    # Writes that did not commit (or changed nothing) say nothing.
    stale = dataclasses.replace(untouched, version=untouched.version + 5, labels={"stale": "yes"})
    with pytest.raises(Exception, match="changed since it was read"):
        await store.replace_connection(stale, untouched.version + 1, make_event(connection_id=untouched.id))
    assert not await store.delete_grant(TENANT, untouched.id, EXECUTOR, make_event(action="grant.delete"))
    await asyncio.sleep(0.1)
    assert [call for call in sink.calls if untouched.id in call] == []


async def test_postgres_writes_of_one_replica_reach_the_others_sink(pg_dsn: str) -> None:
    async with replicas(pg_dsn, 2) as (a, b):
        sink = Recorder()
        await b.watch(sink)
        assert sink.calls == [("unseen",), ("seen",)]  # nothing is cached before LISTEN is in effect
        sink.calls.clear()

        record = await create(a)
        moved = dataclasses.replace(record, version=record.version + 1, labels={"moved": "yes"})
        await a.replace_connection(moved, record.version, make_event(connection_id=record.id))
        await eventually(lambda: ("connection", TENANT, record.id) in sink.calls, 1, "update notified")

        grant = make_grant(record.id, EXECUTOR)
        await a.put_grant(grant, make_event(action="grant.create"))
        await a.delete_grant(TENANT, record.id, EXECUTOR, make_event(action="grant.delete"))
        expected = ("grant", TENANT, record.id, EXECUTOR)
        await eventually(lambda: sink.calls.count(expected) == 2, 1, "grant changes notified")

        # A rolled-back write says nothing.
        sink.calls.clear()
        stale = dataclasses.replace(moved, version=moved.version + 1)
        with pytest.raises(Exception, match="changed since it was read"):
            await a.replace_connection(stale, record.version, make_event(connection_id=record.id))
        await asyncio.sleep(0.2)
        assert sink.calls == []

        # A block is not a row, but the other replicas hear of it the same way.
        await a.announce_block(TENANT, EXECUTOR, 1_900_000_000.5)
        blocked = ("blocked", TENANT, EXECUTOR, "1900000000.5")
        await eventually(lambda: blocked in sink.calls, 1, "block announced")

        # Re-wrapped keys: every cached record is out of date; the sink forgets everything.
        [dek] = await a.list_deks_not_under("kek-2", 10)
        new = Sealed(dek.sealed.ciphertext, b"rewrapped", "kek-2")
        assert await a.rewrap_deks([(dek, new)], {"kek-2": 1}) == 1
        await eventually(lambda: ("seen",) in sink.calls, 1, "rewrap notified")


async def test_postgres_lost_listener_stops_the_cache_until_it_listens_again(pg_dsn: str) -> None:
    async with replicas(pg_dsn, 2) as (a, b):
        sink = Recorder()
        await b.watch(sink)
        listener = b.listener
        assert listener is not None and listener.listening and listener.server_pid is not None
        sink.calls.clear()
        admin = await asyncpg.connect(with_database(pg_dsn, "postgres"))
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", listener.server_pid)
        finally:
            await admin.close()
        # Told at once (asyncpg sees the server close the session), not at the next heartbeat.
        await eventually(lambda: ("unseen",) in sink.calls, 0.5, "loss noticed")
        await eventually(lambda: ("seen",) in sink.calls, 5, "listening again")
        assert sink.calls.index(("unseen",)) < sink.calls.index(("seen",)) and listener.listening

        record = await create(a)
        moved = dataclasses.replace(record, version=record.version + 1, labels={"moved": "again"})
        await a.replace_connection(moved, record.version, make_event(connection_id=record.id))
        await eventually(lambda: ("connection", TENANT, record.id) in sink.calls, 1, "notified again")
