"""Rate limits per principal and class of call: exact under load, audited, counted, with a retry hint."""

from __future__ import annotations

import asyncio

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker import metrics
from broker._proto import broker_pb2 as pb
from tests.conftest import Running
from tests.helpers import EXECUTOR, EXECUTOR2, db_request, rpc_error


def limited(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("broker_rate_limited_total", {"kind": kind}) or 0.0


async def test_500_concurrent_resolves_never_overshoot_the_bucket(make_broker) -> None:  # type: ignore[no-untyped-def]
    running: Running = await make_broker(resolve_per_second=0.001, resolve_burst=100)
    admin = running.admin()
    created = await admin.CreateConnection(db_request())
    for principal in (EXECUTOR, EXECUTOR2):
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=principal))
    before = limited("resolve")
    stub = running.resolver()
    results = await asyncio.gather(
        *(stub.Resolve(pb.ResolveRequest(connection_id=created.id)) for _ in range(500)),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, pb.ResolveResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 100 and len(refused) == 400
    assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    status = rpc_status.from_call(refused[0])
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry) and retry.retry_delay.ToTimedelta().total_seconds() > 0
    assert limited("resolve") == before + 400
    # Audited one by one up to denied_audits_per_minute, then counted: a loop cannot flood the audit.
    events = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="rate_limited", page_size=1000))
    assert len(events.events) == 10
    assert {(e.actor, e.reason) for e in events.events} == {(EXECUTOR, "resolve")}
    await running.broker.services.denials.flush(everything=True)
    (summary,) = (
        await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="rate_limited.suppressed"))
    ).events
    assert (summary.actor, summary.reason, summary.details["count"]) == (EXECUTOR, "resolve", "390")
    # Buckets are per principal: another executor still gets through.
    other = await running.resolver("executor2").Resolve(pb.ResolveRequest(connection_id=created.id))
    assert other.connection_id == created.id
    await running.close()
    await running.broker.stop(grace=0)


async def test_admin_writes_are_limited_and_reads_are_not(make_broker) -> None:  # type: ignore[no-untyped-def]
    running: Running = await make_broker(admin_writes_per_minute=3)
    admin = running.admin()
    for i in range(3):
        await admin.CreateConnection(db_request(name=f"db-{i}"))
    error = await rpc_error(admin.CreateConnection(db_request(name="db-3")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in" in (error.details() or "")
    for _ in range(10):
        await admin.ListConnections(pb.ListConnectionsRequest())
    # The refused create wrote nothing.
    assert len((await admin.ListConnections(pb.ListConnectionsRequest())).connections) == 3
    # Another admin (another tenant) has its own bucket.
    await running.admin("admin_b").CreateConnection(db_request(name="theirs"))
    await running.close()
    await running.broker.stop(grace=0)
