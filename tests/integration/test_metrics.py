"""/metrics after a scripted session: the families are there, and nothing that identifies or leaks."""

from __future__ import annotations

import re

import httpx

from broker._proto import broker_pb2 as pb
from tests.conftest import Running
from tests.helpers import EXECUTOR, db_request, rpc_error, struct

CANARY = "CANARY-metrics-9c1d0e"


async def test_metrics_after_a_session(make_broker) -> None:  # type: ignore[no-untyped-def]
    running: Running = await make_broker(metrics_listen="127.0.0.1:0")
    admin = running.admin()
    created = await admin.CreateConnection(db_request(name="payroll-db-prod", password=CANARY))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
    await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
    await rpc_error(running.resolver("executor2").Resolve(pb.ResolveRequest(connection_id=created.id)))
    await rpc_error(admin.CreateConnection(pb.CreateConnectionRequest(name="x", type="nope")))
    draft = pb.ConnectionDraft(type="http", config=struct({"base_url": "http://169.254.169.254/"}))
    await admin.TestConnection(pb.TestConnectionRequest(draft=draft))

    await running.broker._refresh_gauges()  # the store probe does this every few seconds
    port = running.broker.metrics_port
    assert port
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    text = response.text
    for family in (
        "broker_rpcs_total",
        "broker_rpc_duration_seconds_bucket",
        "broker_resolves_total",
        "broker_resolve_cache_lookups_total",
        "broker_connection_tests_total",
        "broker_audit_write_duration_seconds_bucket",
        "broker_audit_batch_size_bucket",
        "broker_connections",
        "broker_rate_limited",
        "broker_oauth_refreshes",
        "broker_security_events",
        "broker_denials_not_audited",
        "broker_kek_wraps",
        "broker_deks_by_kek",
    ):
        base = family.removesuffix("_total").removesuffix("_bucket")
        assert re.search(rf"^# TYPE {base}(_total)? ", text, re.MULTILINE), family
    assert 'broker_connections{status="active",type="database"} 1.0' in text
    assert (
        'broker_rpcs_total{code="INVALID_ARGUMENT",method="CreateConnection",service="AdminService"}' in text
    )
    assert 'broker_resolves_total{outcome="denied",reason="no_grant"}' in text
    assert 'broker_connection_tests_total{category="blocked_by_policy",type="http"}' in text
    for forbidden in (CANARY, "payroll-db-prod", created.id, "spiffe://", "executor/demo"):
        assert forbidden not in text, forbidden
    await running.close()
    await running.broker.stop(grace=0)
