"""The leases scenario (issue 17): what a lease costs, and what outstanding leases cost Resolve.

A broker of its own (`leases.toml`: the bench's settings on a SQLite database of its own, loopback
allowed to the egress policy) with two connections granted to the bench executor: a static HTTP
one and a dynamic PostgreSQL one on the local server (BROKER_BENCH_POSTGRES_DSN, else
BROKER_TEST_POSTGRES_DSN), administered as that DSN's user, whose leases are login roles with
a group role made for the run. Every role the run makes carries a prefix unique to it
(`bl<hex>_`) and is dropped at the end, also on failure.

* creation: `creates` Resolves on the dynamic connection, one at a time, then `in_flight` at a
  time; p50 and p99 as the client sees them (Resolve, CREATE ROLE, GRANT, the audit), and the
  broker's own mean per phase (`broker_lease_create_duration_seconds`: session and statements).
  Then all of them are revoked (RevokeLeases) and the run waits until their roles are gone.
  The roles are dropped in a `finally`: a bench killed outright (SIGKILL) leaves them, unlike
  its temporary databases (`bench/postgres.py`'s janitor); the prefix tells them apart.
* outstanding: warm Resolve of the static connection, `in_flight` at a time for `seconds`, with
  an empty lease table, then again with `outstanding` active leases (not due for an hour) in it.
  They are written straight into the store while the broker is stopped (no roles behind them:
  only the lease table's size is measured), and the broker is restarted for both runs alike.
  Once on the SQLite store (the broker above), once on a PostgreSQL store (a temporary database,
  as replicas use): the revocation worker scans the lease table every `poll_seconds` on either.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from google.protobuf import struct_pb2

from bench import postgres, world
from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.model import Lease, LeaseState
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore

_TIMEOUT = 30.0


def leases_config(env: world.BenchEnv, name: str, database: Path | str) -> Path:
    """`<root>/<name>.toml`: the bench broker's settings on a store of its own (a SQLite file, or a
    PostgreSQL URL), loopback allowed (the local PostgreSQL is the dynamic connection's server)."""
    # A JSON string is a valid TOML basic string (same escapes), whatever the URL holds.
    storage = (
        f"path = {json.dumps(str(database))}"
        if isinstance(database, Path)
        else f"url = {json.dumps(database)}"
    )
    text = env.config.read_text().replace('path = "broker.db"', storage)
    path = env.root / f"{name}.toml"
    path.write_text(text + "[egress]\nallow_loopback = true\n")
    return path


def load_average() -> list[float]:
    return [float(part) for part in Path("/proc/loadavg").read_text().split()[:3]]


@contextmanager
def run_roles(dsn: str) -> Iterator[tuple[str, str]]:
    """A group role and a prefix unique to this run; afterwards every role with the prefix and the
    group are dropped (names quoted by the server's quote_ident)."""
    tag = secrets.token_hex(3)
    group, prefix = f"bench_lease_grp_{tag}", f"bl{tag}_"
    asyncio.run(_run(dsn, _create_group, group))
    try:
        yield group, prefix
    finally:
        asyncio.run(_run(dsn, _drop_roles, group, prefix))


async def _run(dsn: str, work: Callable[..., Awaitable[None]], *args: str) -> None:
    conn = await asyncpg.connect(postgres.with_database(dsn, "postgres"), timeout=_TIMEOUT)
    try:
        await work(conn, *args)
    finally:
        await conn.close(timeout=_TIMEOUT)


async def _create_group(conn: Any, group: str) -> None:
    quoted = await conn.fetchval("SELECT quote_ident($1::text)", group)
    await conn.execute(f"CREATE ROLE {quoted} NOLOGIN", timeout=_TIMEOUT)


async def _drop_roles(conn: Any, group: str, prefix: str) -> None:
    rows = await conn.fetch(
        "SELECT quote_ident(rolname) FROM pg_roles WHERE left(rolname, char_length($1::text)) = $1::text"
        " OR rolname = $2::text ORDER BY rolname = $2::text",  # the group last: members go first
        prefix,
        group,
    )
    for (quoted,) in rows:
        await conn.execute(f"DROP ROLE IF EXISTS {quoted}", timeout=_TIMEOUT)


async def roles_with_prefix(dsn: str, prefix: str) -> int:
    conn = await asyncpg.connect(postgres.with_database(dsn, "postgres"), timeout=_TIMEOUT)
    try:
        found = await conn.fetchval(
            "SELECT COUNT(*) FROM pg_roles WHERE left(rolname, char_length($1::text)) = $1::text", prefix
        )
    finally:
        await conn.close(timeout=_TIMEOUT)
    return int(found)


async def prepare(env: world.BenchEnv, admin_port: int, dsn: str, group: str, prefix: str) -> dict[str, str]:
    """The static and the dynamic connection, both granted to the bench executor; their ids."""
    server = urlsplit(dsn)
    config = struct_pb2.Struct()
    config.update(
        {
            "driver": "postgresql",
            "host": server.hostname or "127.0.0.1",
            "port": server.port or 5432,
            "database": server.path.lstrip("/") or "postgres",
            "username": server.username or "postgres",
            "dynamic": True,
            "group_role": group,
            "username_prefix": prefix,
            "default_ttl": 3600,
        }
    )
    # A trusting server ignores it; one that checks gets the DSN's.
    password = server.password or "unused"
    static = world.new_http_connection("static")
    async with world.channel(env, env.admin, admin_port) as channel:
        admin = broker_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        made = {
            "dynamic": await admin.CreateConnection(
                pb.CreateConnectionRequest(
                    name="pg-dynamic", type="database", config=config, secrets={"password": password}
                )
            ),
            "static": await admin.CreateConnection(world._create_request(static)),
        }
        for created in made.values():
            await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=world.EXECUTOR))
    return {kind: str(created.id) for kind, created in made.items()}


def _percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "calls": len(ordered),
        "p50_ms": round(ordered[len(ordered) // 2] * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def _each_at(
    call: Callable[[], Awaitable[None]], count: int, in_flight: int
) -> tuple[list[float], float]:
    """`count` calls, `in_flight` at a time; their latencies and the seconds for all."""
    latencies: list[float] = []
    left = iter(range(count))

    async def caller() -> None:
        for _ in left:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return latencies, time.perf_counter() - started


_CREATE_SECONDS = "broker_lease_create_duration_seconds"


def _server_mean_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """The broker's own mean time per user made between two metric samples (its connect and
    statements, without Resolve and the audit)."""
    count = after.get(f"{_CREATE_SECONDS}_count", 0.0) - before.get(f"{_CREATE_SECONDS}_count", 0.0)
    total = after.get(f"{_CREATE_SECONDS}_sum", 0.0) - before.get(f"{_CREATE_SECONDS}_sum", 0.0)
    return round(total / count * 1000, 2) if count else None


async def measure_creation(
    env: world.BenchEnv,
    resolve_port: int,
    admin_port: int,
    connection_id: str,
    count: int,
    in_flight: int,
    metrics: Callable[[], dict[str, float]],
) -> dict[str, Any]:
    """Lease creation one at a time, then `in_flight` at a time; then every lease revoked.
    `metrics` reads the broker's samples."""
    request = pb.ResolveRequest(connection_id=connection_id, purpose="bench lease")
    async with (
        world.channel(env, env.executor, resolve_port) as channel,
        world.channel(env, env.admin, admin_port) as admin_channel,
    ):
        resolve = broker_pb2_grpc.ResolveServiceStub(channel).Resolve  # type: ignore[no-untyped-call]

        async def create() -> None:
            answer = await resolve(request, timeout=_TIMEOUT)
            if not answer.lease.id:
                raise RuntimeError("Resolve on the dynamic connection returned no lease")

        await _each_at(create, 3, 1)  # warm-up: the channel, the connection's cache entry
        report: dict[str, Any] = {}
        for label, concurrency in (("sequential", 1), (f"in_flight_{in_flight}", in_flight)):
            before = await asyncio.to_thread(metrics)
            latencies, seconds = await _each_at(create, count, concurrency)
            report[label] = {
                "in_flight": concurrency,
                **_percentiles(latencies),
                "per_second": round(count / seconds, 1),
                "server_mean_ms": _server_mean_ms(before, await asyncio.to_thread(metrics)),
            }
        admin = broker_pb2_grpc.AdminServiceStub(admin_channel)  # type: ignore[no-untyped-call]
        started = time.perf_counter()
        revoked = await admin.RevokeLeases(pb.RevokeLeasesRequest(connection_id=connection_id))
        report["revoked"] = int(revoked.revoked)
        report["revoke_all_seconds"] = await _until_dropped(admin, connection_id, started)
    return report


async def _until_dropped(admin: Any, connection_id: str, started: float) -> float:
    """Seconds from `started` until no lease of the connection is left unrevoked (at most a minute)."""
    request = pb.ListLeasesRequest(connection_id=connection_id, state=pb.LEASE_STATE_REVOKING)
    while True:
        pending = await admin.ListLeases(request, timeout=_TIMEOUT)
        if not pending.leases:
            return round(time.perf_counter() - started, 2)
        if time.perf_counter() - started > 60:
            raise RuntimeError("the bench's leases were not all revoked within a minute")
        await asyncio.sleep(0.1)


async def measure_resolve(
    env: world.BenchEnv, resolve_port: int, connection_id: str, in_flight: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """Warm Resolve of one static connection, `in_flight` at a time for `seconds`, after `warmup` s."""
    request = pb.ResolveRequest(connection_id=connection_id, purpose="bench")
    async with world.channel(env, env.executor, resolve_port) as channel:
        resolve = broker_pb2_grpc.ResolveServiceStub(channel).Resolve  # type: ignore[no-untyped-call]

        async def window(length: float) -> list[float]:
            latencies: list[float] = []
            deadline = time.monotonic() + length

            async def caller() -> None:
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    await resolve(request, timeout=_TIMEOUT)
                    latencies.append(time.perf_counter() - started)

            await asyncio.gather(*(caller() for _ in range(in_flight)))
            return latencies

        await window(warmup)
        load = load_average()
        latencies = await window(seconds)
    return {
        "in_flight": in_flight,
        "seconds": seconds,
        **_percentiles(latencies),
        "per_second": round(len(latencies) / seconds, 1),
        "load_average_before": load,
    }


async def insert_outstanding(
    database: Path | str, connection_id: str, prefix: str, count: int
) -> dict[str, float]:
    """`count` active leases (due in an hour, for roles that do not exist) straight into the
    stopped broker's store (a SQLite file or a PostgreSQL URL): the seconds it took, and what one
    pass of the revocation worker's queries then costs (`worker_poll_ms`, it runs every
    `poll_seconds`: the claim of due leases, none here, and the count of pending revocations)."""
    store: SqliteStore | PostgresStore = (
        SqliteStore(database)
        if isinstance(database, Path)
        else PostgresStore(database, pool_min=1, pool_max=8)
    )
    await store.open()
    started = time.perf_counter()
    try:
        if isinstance(store, SqliteStore):
            # Throw-away data, as in world.seed: no fsync per row.
            await store.engine.writer.execute("PRAGMA synchronous = OFF")  # type: ignore[union-attr]
        now = datetime.now(UTC)
        for first in range(0, count, 200):
            await asyncio.gather(
                *(
                    store.insert_lease(_outstanding(connection_id, prefix, i, now))
                    for i in range(first, min(count, first + 200))
                )
            )
        inserted = time.perf_counter() - started
        passes = 20
        started = time.perf_counter()
        for _ in range(passes):
            now = datetime.now(UTC)
            claimed = await store.claim_due_leases(now, now - timedelta(minutes=1), now, 50)
            await store.pending_revocations(now)
            if claimed:
                raise RuntimeError("the bench's outstanding leases must not be due")
        poll = (time.perf_counter() - started) / passes
    finally:
        await store.close()
    return {"inserted_seconds": round(inserted, 1), "worker_poll_ms": round(poll * 1000, 2)}


def _outstanding(connection_id: str, prefix: str, index: int, now: datetime) -> Lease:
    return Lease(
        tenant="bench",
        id=f"lease_bench_{index:06d}",
        connection_id=connection_id,
        principal=world.EXECUTOR,
        username=f"{prefix}{index:016d}",
        state=LeaseState.ACTIVE,
        created_at=now,
        expires_at=now + timedelta(hours=1),
        max_expires_at=now + timedelta(hours=24),
    )
