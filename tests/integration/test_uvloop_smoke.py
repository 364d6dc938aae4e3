"""The broker on uvloop's event loop, in every run of the suite: start, Resolve (durably audited),
a refused call, a clean stop. `BROKER_TEST_LOOP=uvloop` runs the whole suite on it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.server import event_loop_name, loop_factory
from tests.conftest import Running
from tests.helpers import EXECUTOR, db_request, rpc_error

pytestmark = pytest.mark.uvloop


def test_the_server_entry_picks_uvloop_when_it_is_installed() -> None:
    factory = loop_factory()
    assert factory is not None
    loop = factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()


async def test_a_broker_on_uvloop_serves_audits_refuses_and_stops(make_broker: Callable[..., object]) -> None:
    assert event_loop_name() == "uvloop"
    running: Running = await make_broker()  # type: ignore[misc]
    assert '"event_loop": "uvloop"' in running.logs.getvalue()
    created = await running.admin().CreateConnection(db_request(password="pw-uv"))
    await running.admin().GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    resolver = running.resolver()
    answers = await asyncio.gather(
        *(resolver.Resolve(pb.ResolveRequest(connection_id=created.id)) for _ in range(20))
    )
    assert {a.secrets["password"] for a in answers} == {"pw-uv"}
    refused = await rpc_error(
        running.resolver("executor2").Resolve(pb.ResolveRequest(connection_id=created.id))
    )
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    events = await running.admin().ListAuditEvents(
        pb.ListAuditEventsRequest(action="connection.resolve", page_size=100)
    )
    assert len(events.events) == 21
    await running.broker.stop(grace=1.0)
