"""The change listener and the Resolve cache as its sink, without a database.

The PostgreSQL side (NOTIFY on commit, a terminated session) is covered in
tests/integration/test_store_replicas.py; here: what the cache does when told,
what an unreadable message does, and a heartbeat that goes unanswered (a silent
network partition, which no error ever reports).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from broker import metrics
from broker.api import resolve_public_part
from broker.model import ConnectionRecord, ConnectionStatus, Grant
from broker.service.cache import MISSING, ResolveCache
from broker.service.monitor import Monitor
from broker.service.replicas import ReplicaChanges
from broker.store.changes import connection_changed, deliver, grant_changed, principal_blocked
from broker.store.postgres.changes import Listener
from tests.helpers import Recorder, eventually

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(connection_id: str = "conn_1", name: str = "db") -> ConnectionRecord:
    return ConnectionRecord(
        id=connection_id,
        tenant="acme",
        name=name,
        type="postgres",
        provider="",
        config={},
        secret_fields=(),
        labels={},
        status=ConnectionStatus.ACTIVE,
        version=1,
        secret_version=1,
        sealed=None,
        created_at=T0,
        updated_at=T0,
        created_by="alice",
    )


def grant(principal: str = "etl") -> Grant:
    return Grant(
        tenant="acme", connection_id="conn_1", principal=principal, created_at=T0, created_by="alice"
    )


def replica(cache: ResolveCache, leases: Recorder | None = None) -> tuple[ReplicaChanges, Monitor]:
    """The sink the server builds; the monitor needs no store for blocks."""
    monitor = Monitor(None, None, None, lambda: T0)  # type: ignore[arg-type]
    return ReplicaChanges(cache, monitor, leases or Recorder()), monitor


def test_messages_invalidate_exactly_what_they_name() -> None:
    cache = ResolveCache(public_part=resolve_public_part)
    leases = Recorder()
    sink, _ = replica(cache, leases)
    cache.put_connection(record(), cache.generation)
    cache.put_connection(record("conn_2", "other"), cache.generation)
    cache.put_grant("acme", "conn_2", "etl", grant(), cache.generation)
    deliver(sink, grant_changed("acme", "conn_2", "etl"))
    assert cache.grant("acme", "conn_2", "etl") is MISSING and cache.connection("acme", "conn_2") is not None
    deliver(sink, connection_changed("acme", "conn_1"))
    assert cache.connection("acme", "conn_1") is None and cache.connection_id_by_name("acme", "db") is None
    assert cache.connection("acme", "conn_2") is not None
    # The lease service hears the same changes: each may end leases (a grant gone, a connection revoked).
    assert leases.calls == [("grant", "acme", "conn_2", "etl"), ("connection", "acme", "conn_1")]


def test_a_block_announced_by_another_replica_blocks_here_until_the_same_time() -> None:
    leases = Recorder()
    sink, monitor = replica(ResolveCache(public_part=resolve_public_part), leases)
    until = T0.timestamp() + 60
    deliver(sink, principal_blocked("acme", "spiffe://x/tenant/acme/executor/etl", until))
    assert leases.calls == [("blocked", "acme", "spiffe://x/tenant/acme/executor/etl", str(until))]
    assert monitor.blocked("acme", "spiffe://x/tenant/acme/executor/etl", T0)
    assert not monitor.blocked("other", "spiffe://x/tenant/acme/executor/etl", T0)
    assert not monitor.blocked("acme", "spiffe://x/tenant/acme/executor/etl", T0 + timedelta(seconds=61))
    # An earlier end never shortens a longer block already held.
    monitor.block("acme", "p", until)
    monitor.block("acme", "p", until - 30)
    assert monitor.blocked("acme", "p", T0 + timedelta(seconds=45))


def test_an_unreadable_message_forgets_everything() -> None:
    cache = ResolveCache(public_part=resolve_public_part)
    sink, _ = replica(cache)
    cache.put_connection(record(), cache.generation)
    deliver(sink, '{"not": "a list"}')
    assert cache.connection("acme", "conn_1") is None
    cache.put_connection(record(), cache.generation)  # and keeps caching
    assert cache.connection("acme", "conn_1") is not None


def test_cache_holds_nothing_while_changes_are_unseen() -> None:
    cache = ResolveCache(public_part=resolve_public_part)
    cache.put_connection(record(), cache.generation)
    cache.changes_unseen()
    assert cache.connection("acme", "conn_1") is None
    assert metrics.REGISTRY.get_sample_value("broker_change_listener_connected") == 0
    cache.put_connection(record(), cache.generation)
    cache.put_grant("acme", "conn_1", "etl", grant(), cache.generation)
    assert cache.connection("acme", "conn_1") is None and cache.grant("acme", "conn_1", "etl") is MISSING
    generation = cache.generation
    cache.changes_seen()
    cache.put_connection(record(), generation)  # read before the feed came back: still refused
    assert cache.connection("acme", "conn_1") is None
    cache.put_connection(record(), cache.generation)
    assert cache.connection("acme", "conn_1") is not None
    assert metrics.REGISTRY.get_sample_value("broker_change_listener_connected") == 1


class SilentConnection:
    """Accepts LISTEN, then never answers the heartbeat: a partition with no error."""

    def __init__(self) -> None:
        self.terminated = False

    def get_server_pid(self) -> int:
        return 4242

    def add_termination_listener(self, callback: Any) -> None:
        pass

    async def add_listener(self, channel: str, callback: Any) -> None:
        pass

    async def fetchval(self, query: str) -> Any:
        await asyncio.sleep(3600)

    def terminate(self) -> None:
        self.terminated = True


async def test_an_unanswered_heartbeat_stops_the_cache_and_reconnects() -> None:
    sink = Recorder()
    connections: list[SilentConnection] = []

    async def connect() -> SilentConnection:
        connections.append(SilentConnection())
        return connections[-1]

    listener = Listener(connect, sink, heartbeat_seconds=0.05, max_backoff_seconds=0.05)
    await listener.start(first_attempt_timeout=1)
    try:
        assert sink.calls == [("unseen",), ("seen",)] and listener.listening
        # One heartbeat interval of waiting plus one unanswered heartbeat.
        waited = await eventually(lambda: len(sink.calls) >= 3, 1, "silence noticed")
        assert sink.calls[2] == ("unseen",) and waited < 0.5
        await eventually(lambda: len(connections) >= 2 and sink.calls[-1] == ("seen",), 1, "reconnected")
        assert connections[0].terminated
    finally:
        await listener.close()


def test_a_change_the_sink_failed_to_apply_forgets_everything() -> None:
    class Failing(Recorder):
        def connection_changed(self, tenant: str, connection_id: str) -> None:
            raise RuntimeError("a bug")

    sink = Failing()
    deliver(sink, connection_changed("acme", "conn_1"))
    assert sink.calls == [("seen",)]  # the safe reading: nothing cached survives
