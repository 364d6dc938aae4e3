"""What one executor can hold of the broker: proxied calls under way, connections, streams.

Found by a resource-exhaustion review: within its rate limit, one executor that never read its
answers (or that named a slow upstream) held every connection of the upstream pool all
principals share, so every other executor's proxied calls timed out, and held answers in
memory without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.egress import EgressSettings
from tests.conftest import Running
from tests.helpers import EXECUTOR, EXECUTOR2, struct
from tests.httpservers import Answer, LocalServer, serve

BIG = Answer(body=b"x" * (16 << 20))  # far more than gRPC's flow-control windows hold


async def grant(running: Running, name: str, upstream: LocalServer, *principals: str) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name=name,
            type="http",
            config=struct({"base_url": upstream.url, "auth_type": "bearer"}),
            secrets={"token": "t0k-canary-1"},
        )
    )
    for principal in principals:
        await admin.GrantAccess(
            pb.GrantAccessRequest(connection_id=created.id, principal=principal, mode=pb.GRANT_MODE_PROXY)
        )


def proxy(running: Running, who: str) -> broker_pb2_grpc.ProxyServiceStub:
    return broker_pb2_grpc.ProxyServiceStub(
        running.channel(running.identities[who], running.broker.resolve_port)
    )


def small(name: str) -> pb.ProxyHttpRequest:
    return pb.ProxyHttpRequest(name=name, method="GET", path="/")


async def test_an_executor_at_its_cap_of_calls_under_way_is_refused_and_others_are_not(
    make_broker: Callable[..., Awaitable[Running]],
) -> None:
    running = await make_broker(egress=EgressSettings(allow_loopback=True), proxy_in_flight=3)
    with serve(lambda _: BIG) as hostile, serve(lambda _: Answer(body=b"ok")) as other:
        await grant(running, "big", hostile, EXECUTOR)
        await grant(running, "other", other, EXECUTOR, EXECUTOR2)
        attacker, victim = proxy(running, "executor"), proxy(running, "executor2")
        held = [attacker.ProxyHttpStream(small("big")) for _ in range(3)]  # read once, then never again
        for call in held:
            await call.read()

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await attacker.ProxyHttp(small("other"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == (
            "at most 3 proxy calls may be under way at once; retry when one has ended"
        )
        assert (await victim.ProxyHttp(small("other"), timeout=10)).status == 200
        denied = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="rate_limited"))
        assert [(e.actor, e.reason) for e in denied.events] == [(EXECUTOR, "proxy_in_flight")]

        held[0].cancel()  # a call that ends gives its place back
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                assert (await attacker.ProxyHttp(small("other"), timeout=10)).status == 200
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and loop.time() < deadline
                await asyncio.sleep(0.1)
        for call in held:
            call.cancel()


async def test_a_full_upstream_pool_is_named_as_such(make_broker: Callable[..., Awaitable[Running]]) -> None:
    """Waiting for a connection of the pool used to end as "the upstream did not answer in time",
    although nothing was sent to it."""
    egress = EgressSettings(allow_loopback=True, proxy_connections=1, connect_timeout=0.5, total_timeout=5)
    running = await make_broker(egress=egress)
    with serve(lambda _: BIG) as hostile, serve(lambda _: Answer(body=b"ok")) as other:
        await grant(running, "big", hostile, EXECUTOR)
        await grant(running, "other", other, EXECUTOR2)
        holding = proxy(running, "executor").ProxyHttpStream(small("big"))
        await holding.read()  # the pool's one connection, held
        with pytest.raises(grpc.aio.AioRpcError) as waited:
            await proxy(running, "executor2").ProxyHttp(small("other"), timeout=10)
        assert waited.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (
            waited.value.details() == "every connection the broker keeps to upstreams is in use; retry later"
        )
        assert other.requests == []
        holding.cancel()


async def test_a_connection_past_its_age_is_closed_after_the_grace_with_what_nobody_read(
    make_broker: Callable[..., Awaitable[Running]],
) -> None:
    """Without a grace, gRPC's maximum age only asked the client to reconnect: calls whose answers
    it never read stayed under way, and held their place, for good."""
    running = await make_broker(
        egress=EgressSettings(allow_loopback=True),
        proxy_in_flight=1,
        max_connection_age_seconds=1,
        max_connection_age_grace_seconds=1,
    )
    with serve(lambda _: BIG) as hostile, serve(lambda _: Answer(body=b"ok")) as other:
        await grant(running, "big", hostile, EXECUTOR)
        await grant(running, "other", other, EXECUTOR)
        stuck = proxy(running, "executor").ProxyHttpStream(small("big"))
        await stuck.read()  # under way, and never read again
        again = proxy(running, "executor")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15  # 1 s of age with gRPC's jitter, 1 s of grace, a busy machine
        while True:
            try:
                assert (await again.ProxyHttp(small("other"), timeout=5)).status == 200
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
                assert loop.time() < deadline, "the unread call kept its place past the connection's grace"
                await asyncio.sleep(0.2)
        stuck.cancel()


async def test_an_idle_connection_is_closed_and_the_client_reconnects(
    make_broker: Callable[..., Awaitable[Running]],
) -> None:
    running = await make_broker(max_connection_idle_seconds=1)
    channel = running.channel(running.identities["admin"], running.broker.admin_port)
    admin = broker_pb2_grpc.AdminServiceStub(channel)
    await admin.ListConnections(pb.ListConnectionsRequest(), timeout=5)
    assert channel.get_state() is grpc.ChannelConnectivity.READY
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while channel.get_state() is grpc.ChannelConnectivity.READY:
        assert loop.time() < deadline, "an idle connection was kept open"
        await asyncio.sleep(0.2)
    await admin.ListConnections(pb.ListConnectionsRequest(), timeout=5)
