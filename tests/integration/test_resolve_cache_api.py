"""Resolve through the bounded cache, over the wire: updates are never answered from the old
serialised part, and a cache smaller than the working set still answers every call correctly."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from broker import metrics
from broker._proto import broker_pb2 as pb
from tests.conftest import Running
from tests.helpers import EXECUTOR, db_request, rpc_error, struct


async def test_an_update_is_answered_with_the_new_fields_never_the_cached_ones(running: Running) -> None:
    admin, resolver = running.admin(), running.resolver()
    created = await admin.CreateConnection(db_request(name="warehouse", password="pw-1"))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    first = await resolver.Resolve(pb.ResolveRequest(connection_id=created.id))
    assert (await resolver.Resolve(pb.ResolveRequest(connection_id=created.id))) == first  # cached
    assert first.config["host"] == "db.internal" and first.secret_version == 1

    config = {"driver": "postgresql", "host": "db.internal", "database": "lake", "username": "app"}
    update = pb.UpdateConnectionRequest(id=created.id, name="lake", config=struct(config))
    await admin.UpdateConnection(update)
    moved = await resolver.Resolve(pb.ResolveRequest(connection_id=created.id))
    assert moved.config["database"] == "lake" and moved.name == "lake"
    assert dict(moved.secrets) == {"password": "pw-1"} and moved.secret_version == 1
    assert (await resolver.Resolve(pb.ResolveRequest(name="lake"))) == moved

    await admin.UpdateConnection(pb.UpdateConnectionRequest(id=created.id, secrets={"password": "pw-2"}))
    rotated = await resolver.Resolve(pb.ResolveRequest(connection_id=created.id))
    assert dict(rotated.secrets) == {"password": "pw-2"} and rotated.secret_version == 2
    assert rotated.config["database"] == "lake" and rotated.connection_id == created.id
    assert rotated.type == "database" and rotated.cache_ttl_seconds == 60


async def test_a_small_cache_evicts_and_still_answers_every_connection(
    make_broker: Callable[..., object],
) -> None:
    running: Running = await make_broker(resolve_cache_entries=2)  # type: ignore[assignment]
    admin, resolver = running.admin(), running.resolver()
    ids = []
    for n in range(4):
        created = await admin.CreateConnection(db_request(name=f"db-{n}", password=f"pw-{n}"))
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
        ids.append(created.id)
    evicted = metrics.REGISTRY.get_sample_value("broker_resolve_cache_evictions_total") or 0.0
    for _ in range(2):
        for n, connection_id in enumerate(ids):
            answer = await resolver.Resolve(pb.ResolveRequest(connection_id=connection_id))
            assert answer.name == f"db-{n}" and dict(answer.secrets) == {"password": f"pw-{n}"}
            assert len(running.broker.services.cache) <= 2
    # Round-robin over 4 with room for 2: every lookup after the first two evicts one.
    assert metrics.REGISTRY.get_sample_value("broker_resolve_cache_evictions_total") == evicted + 6
    # A revoke reaches an evicted connection too (it is read again from the store).
    await admin.RevokeAccess(pb.RevokeAccessRequest(connection_id=ids[0], principal=EXECUTOR))
    for connection_id in ids[1:]:
        await resolver.Resolve(pb.ResolveRequest(connection_id=connection_id))
    denied = await rpc_error(resolver.Resolve(pb.ResolveRequest(connection_id=ids[0])))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_cache_miss_reads_the_record_and_the_callers_grant_in_one_statement(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin, resolver = running.admin(), running.resolver()
    created = await admin.CreateConnection(db_request(name="warehouse", password="pw-1"))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    running.broker.services.cache.clear()
    engine = running.broker.store.engine
    reads: list[str] = []

    def counted(read: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def fetch(sql: str, *args: Any) -> Any:
            if "FROM connections" in sql or "FROM grants" in sql:
                reads.append(sql)
            return await read(sql, *args)

        return fetch

    for name in ("fetch", "fetch_by_key"):
        monkeypatch.setattr(engine, name, counted(getattr(engine, name)))
    answer = await resolver.Resolve(pb.ResolveRequest(connection_id=created.id))
    # A miss waits for one turn of the store, not one for the record and then one for the grant.
    assert dict(answer.secrets) == {"password": "pw-1"} and len(reads) == 1
    # Both are cached now: the next Resolve reads neither.
    assert await resolver.Resolve(pb.ResolveRequest(connection_id=created.id)) == answer
    assert len(reads) == 1
