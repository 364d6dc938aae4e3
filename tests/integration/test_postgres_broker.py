"""End to end on PostgreSQL: brokers started with `storage.url`, driven over gRPC.

Each test gets a fresh database (skipped without BROKER_TEST_POSTGRES_DSN). Two
brokers in this process stand in for two replicas; tests/integration/test_replicas.py
runs three `broker serve` processes for what replicas must agree on (invalidation,
one token refresh, shared rate limits, a lost database session).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.config import MonitorSettings
from tests.conftest import Running
from tests.helpers import EXECUTOR, db_request, rpc_error
from tests.postgres_db import fresh_database

CANARY = "pg-canary-5b1e0d7c"


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with fresh_database() as dsn:
        yield dsn


@pytest.fixture
async def replicas(make_broker: Callable[..., Any], database: str) -> AsyncIterator[list[Running]]:
    started: list[Running] = []
    try:
        for _ in range(2):
            started.append(await make_broker(storage_path=None, storage_url=database, storage_pool_max=4))
        yield started
    finally:
        for running in started:
            await running.close()
            await running.broker.stop(grace=0)


async def test_create_grant_resolve_and_audit_across_two_replicas(
    replicas: list[Running], database: str
) -> None:
    a, b = replicas
    admin = a.admin()
    created = await admin.CreateConnection(db_request(name="warehouse", password=CANARY))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))

    # Replica B never saw the write: it reads the shared database.
    for running in (a, b):
        resolved = await running.resolver().Resolve(pb.ResolveRequest(name="warehouse"))
        assert resolved.connection_id == created.id and dict(resolved.secrets) == {"password": CANARY}

    # Both replicas' events (each Resolve awaited its own) joined the one chain.
    for running in (a, b):
        report = await running.admin().VerifyAuditLog(pb.VerifyAuditLogRequest())
        assert report.ok and report.events_checked >= 4, report
    page = await b.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="connection.resolve"))
    assert len(page.events) == 2

    # No plaintext secret at rest: no row of any table holds the canary.
    conn = await asyncpg.connect(database)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert {"connections", "audit_events", "schema_migrations"} <= {t["table_name"] for t in tables}
        for table in tables:
            dump = await conn.fetchval(f"SELECT coalesce(string_agg(t::text, ''), '') FROM \"{table[0]}\" t")
            assert CANARY not in dump, table[0]
            assert CANARY.encode().hex() not in dump, table[0]
    finally:
        await conn.close()


async def test_a_principal_blocked_by_one_replica_is_blocked_by_the_other(
    make_broker: Callable[..., Any], database: str
) -> None:
    monitor = MonitorSettings(denied_resolves=3, denied_window_seconds=60, block_seconds=60)
    a, b = [
        await make_broker(storage_path=None, storage_url=database, storage_pool_max=4, monitor=monitor)
        for _ in range(2)
    ]
    try:
        created = await a.admin().CreateConnection(db_request(name="warehouse", password=CANARY))
        await a.admin().GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
        assert (await b.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))).secrets
        for _ in range(3):  # probing through A: A's monitor blocks the executor...
            error = await rpc_error(a.resolver().Resolve(pb.ResolveRequest(connection_id="conn_nope")))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED

        async def denied_on_b() -> bool:  # ...and B hears of it: its granted Resolve is refused
            try:
                await b.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
            except grpc.aio.AioRpcError as error:
                return error.code() == grpc.StatusCode.PERMISSION_DENIED
            return False

        deadline = asyncio.get_running_loop().time() + 1
        while not await denied_on_b():
            assert asyncio.get_running_loop().time() < deadline, "B still serves the blocked principal"
            await asyncio.sleep(0.02)
        page = await b.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="connection.resolve"))
        assert page.events[0].reason == "principal_blocked"
    finally:
        for running in (a, b):
            await running.close()
            await running.broker.stop(grace=0)


async def test_a_database_that_cannot_be_written_is_unavailable_not_an_internal_error(
    make_broker: Callable[..., Any], database: str
) -> None:
    """A read-only server (a standby after a failover, a full disk set read-only) answers writes
    with 25006: the storage's fault, which a retry may cure (before: INTERNAL)."""
    running: Running = await make_broker(storage_path=None, storage_url=database, storage_pool_max=2)
    name = database.rsplit("/", 1)[1]
    root = await asyncpg.connect(database)
    try:
        await root.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        # The broker's sessions end, and the ones it opens next are read-only.
        await root.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        codes = set()
        for i in range(3):  # the first may meet a session that was just ended
            error = await rpc_error(running.admin().CreateConnection(db_request(name=f"ro-{i}")))
            codes.add(error.code())
        assert codes == {grpc.StatusCode.UNAVAILABLE}, codes
        assert "unexpected_error" not in running.logs.getvalue()
        await root.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
    finally:
        await root.close()
        await running.close()
        await running.broker.stop(grace=0)
