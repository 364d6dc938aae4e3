"""The security monitor over real gRPC: each rule at its threshold and not below, suspension,
reinstatement, principal blocks, security events, alert webhook delivery, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import pytest

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.config import MonitorSettings
from broker.egress import EgressSettings
from broker.testers import webhook
from tests.conftest import Running
from tests.helpers import EXECUTOR, EXECUTOR2, ShiftedClock, db_request, rpc_error, struct
from tests.httpservers import Answer, LocalServer, Route, Seen, serve

CANARY = "CANARY-monitor-5e1b7a"
HOOK_SECRET = "whsec-monitor-alerts-42"
QUIET = {"new_principal_peer": False}  # most tests look at one rule at a time

Start = Callable[..., Any]


@pytest.fixture
async def start(make_broker: Start) -> AsyncIterator[Start]:
    """Start a broker with these monitor settings (and any other overrides); stopped at teardown."""
    started: list[Running] = []

    async def go(settings: dict[str, Any] | None = None, **overrides: Any) -> Running:
        monitor = MonitorSettings(**{**QUIET, **(settings or {})})
        running: Running = await make_broker(monitor=monitor, **overrides)
        started.append(running)
        return running

    yield go
    for running in started:
        await stop(running)


async def stop(running: Running) -> None:
    await running.close()
    await running.broker.stop(grace=0)


async def granted(running: Running, name: str = "prod-db", *principals: str) -> str:
    admin = running.admin()
    created = await admin.CreateConnection(db_request(name=name, password=CANARY))
    for principal in principals or (EXECUTOR, EXECUTOR2):
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=principal))
    return str(created.id)


async def resolve(running: Running, connection_id: str, who: str = "executor") -> pb.ResolveResponse:
    response: pb.ResolveResponse = await running.resolver(who).Resolve(
        pb.ResolveRequest(connection_id=connection_id)
    )
    return response


async def denied(running: Running, connection_id: str, who: str = "executor") -> None:
    error = await rpc_error(resolve(running, connection_id, who))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "not permitted to resolve this connection"


async def events(running: Running, who: str = "admin", **filters: Any) -> list[pb.SecurityEvent]:
    await running.broker.services.monitor.settle()
    reply = await running.admin(who).ListSecurityEvents(pb.ListSecurityEventsRequest(**filters))
    return list(reply.events)


async def audit_reasons(running: Running, action: str = "connection.resolve") -> list[str]:
    reply = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action=action))
    return [e.reason for e in reply.events]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------ failed tests


async def test_failed_tests_suspend_the_connection_until_reinstated(start: Start) -> None:
    running = await start({"failed_tests": 3}, egress=EgressSettings(allow_loopback=True))
    admin = running.admin()
    broken = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="bastion",
            type="ssh",
            config=struct({"host": "127.0.0.1", "port": closed_port(), "username": "deploy"}),
            secrets={"password": CANARY},
        )
    )
    for principal in (EXECUTOR, EXECUTOR2):
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=broken.id, principal=principal))
    for _ in range(2):
        result = await admin.TestConnection(pb.TestConnectionRequest(id=broken.id))
        assert not result.success
    assert await events(running, rule="failed_tests") == []
    await resolve(running, broken.id)  # two failures: still resolvable

    await admin.TestConnection(pb.TestConnectionRequest(id=broken.id))  # the third
    (event,) = await events(running, rule="failed_tests")
    assert (event.action, event.severity, event.connection_id) == (
        "connection_suspended",
        "critical",
        broken.id,
    )
    assert event.details["count"] == "3" and event.details["last_category"] == "connection_refused"
    fetched = await admin.GetConnection(pb.GetConnectionRequest(id=broken.id))
    assert fetched.status == pb.CONNECTION_STATUS_SUSPENDED
    listed = await admin.ListConnections(pb.ListConnectionsRequest(status=pb.CONNECTION_STATUS_SUSPENDED))
    assert [c.id for c in listed.connections] == [broken.id]
    active = await admin.ListConnections(pb.ListConnectionsRequest(status=pb.CONNECTION_STATUS_ACTIVE))
    assert broken.id not in [c.id for c in active.connections]
    for who in ("executor", "executor2"):
        await denied(running, broken.id, who)
    assert (await audit_reasons(running))[:2] == ["connection_suspended", "connection_suspended"]
    suspend_audit = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="connection.suspend"))
    assert [(e.actor, e.reason) for e in suspend_audit.events] == [("broker:monitor", "failed_tests")]

    reinstated = await admin.ReinstateConnection(pb.ReinstateConnectionRequest(id=broken.id, reason="fixed"))
    assert reinstated.status == pb.CONNECTION_STATUS_ACTIVE
    for who in ("executor", "executor2"):
        assert (await resolve(running, broken.id, who)).secrets["password"] == CANARY
    (audit,) = (await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="connection.reinstate"))).events
    assert audit.reason == "fixed" and audit.actor.endswith("/admin/cli")
    other_tenant = await rpc_error(
        running.admin("admin_b").ReinstateConnection(pb.ReinstateConnectionRequest(id=broken.id))
    )
    assert other_tenant.code() == grpc.StatusCode.NOT_FOUND
    await stop(running)


# ------------------------------------------------------------ denied burst


async def test_denied_burst_blocks_the_principal_for_the_cool_down(start: Start) -> None:
    clock = ShiftedClock()
    running = await start({"denied_resolves": 3, "block_seconds": 60}, clock=clock)
    good = await granted(running)
    for _ in range(2):
        await denied(running, "conn_does_not_exist")
    assert await events(running, rule="denied_burst") == []
    await resolve(running, good)  # two denials: not blocked

    await denied(running, "conn_does_not_exist")  # the third
    (event,) = await events(running, rule="denied_burst")
    assert (event.action, event.principal) == ("principal_blocked", EXECUTOR)
    assert event.peer.startswith("ipv4:127.0.0.1") and event.details["last_reason"] == "unknown_connection"
    await denied(running, good)  # granted, but blocked
    assert (await audit_reasons(running))[0] == "principal_blocked"
    await resolve(running, good, "executor2")  # only that principal
    clock.advance(50)
    await denied(running, good)  # still in the cool-down
    clock.advance(10)
    await resolve(running, good)  # the cool-down is over
    await stop(running)


async def test_denied_burst_without_block_only_alerts(start: Start) -> None:
    running = await start({"denied_resolves": 2})
    good = await granted(running, "db", EXECUTOR)
    await denied(running, good, "executor2")
    assert await events(running) == []
    await denied(running, good, "executor2")
    (event,) = await events(running, rule="denied_burst")
    assert (event.action, event.principal, event.details["last_reason"]) == ("alerted", EXECUTOR2, "no_grant")
    assert (await resolve(running, good)).name == "db"
    await stop(running)


# ------------------------------------------------------------ wrong role


WRONG_ROLE_CALLS = 1500


async def wrong_role_calls(running: Running, count: int) -> None:
    """`count` executor calls to the admin listener, 50 at a time: each PERMISSION_DENIED."""
    as_executor = broker_pb2_grpc.AdminServiceStub(
        running.channel(running.identities["executor"], running.broker.admin_port)
    )
    for start in range(0, count, 50):
        batch = [
            rpc_error(as_executor.ListConnections(pb.ListConnectionsRequest()))
            for _ in range(min(50, count - start))
        ]
        for error in await asyncio.gather(*batch):
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_wrong_role_calls_are_audited_up_to_a_limit_then_summarised_and_raise_an_event(
    start: Start,
) -> None:
    """Defaults: 10 full audit records per principal and minute, a security event from 20 in a minute."""
    clock = ShiftedClock()
    running = await start(clock=clock)
    good = await granted(running, "db", EXECUTOR)
    await wrong_role_calls(running, WRONG_ROLE_CALLS)

    admin = running.admin()
    listed = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="rpc.denied", page_size=1000))
    full = listed.events
    assert len(full) == 10  # not 1,500
    assert {(e.actor, e.reason, e.details["method"]) for e in full} == {
        (EXECUTOR, "wrong_role", "ListConnections")
    }
    (event,) = await events(running, rule="wrong_role_burst")  # one per principal and window
    assert (event.principal, event.severity, event.action) == (EXECUTOR, "warning", "alerted")
    assert event.details["count"] == "20" and event.details["last_method"] == "ListConnections"
    # The same principal's own listener still serves it: no block, no rate limit.
    assert (await resolve(running, good)).secrets["password"] == CANARY

    # The window passes: the next denial writes one summary of what was only counted.
    clock.advance(61)
    await wrong_role_calls(running, 1)
    (summary,) = (
        await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="rpc.denied.suppressed"))
    ).events
    assert (summary.actor, summary.outcome, summary.reason) == (EXECUTOR, "denied", "wrong_role")
    assert summary.details["count"] == str(WRONG_ROLE_CALLS - 10)
    assert summary.details["methods"] == "ListConnections"
    after = (await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="rpc.denied"))).events
    assert len(after) == 11  # a new window: audited in full again

    # A window still open at shutdown is summarised then, not lost.
    await wrong_role_calls(running, 14)
    await stop(running)
    again = await start()
    summaries = await again.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="rpc.denied.suppressed"))
    assert [e.details["count"] for e in summaries.events] == ["5", str(WRONG_ROLE_CALLS - 10)]


# ------------------------------------------------------------ volume spike


async def test_volume_spike_alerts_and_suspends_when_configured(start: Start) -> None:
    settings = {"spike_min_count": 4, "spike_window_seconds": 3600, "suspend_on_spike": True}
    running = await start(settings)
    hot = await granted(running)
    for _ in range(4):
        await resolve(running, hot)
    assert await events(running, rule="volume_spike") == []
    await resolve(running, hot)  # the fifth: above max(4, 10 x 0)
    (event,) = await events(running, rule="volume_spike")
    assert (event.action, event.principal, event.connection_id) == ("connection_suspended", EXECUTOR, hot)
    assert event.details["count"] == "5" and event.details["baseline"] == "0.0"
    for who in ("executor", "executor2"):
        await denied(running, hot, who)
    await running.admin().ReinstateConnection(pb.ReinstateConnectionRequest(id=hot))
    await resolve(running, hot, "executor2")
    await stop(running)


async def test_volume_spike_only_alerts_by_default(start: Start) -> None:
    running = await start({"spike_min_count": 2, "spike_window_seconds": 3600})
    hot = await granted(running)
    for _ in range(3):
        await resolve(running, hot)
    await resolve(running, hot, "executor2")  # its own baseline: below
    (event,) = await events(running, rule="volume_spike")
    assert (event.action, event.principal) == ("alerted", EXECUTOR)
    await resolve(running, hot)
    await stop(running)


# ------------------------------------------------------------ new principal, new peer


async def test_new_principal_from_a_new_peer_alerts_once_and_survives_a_restart(start: Start) -> None:
    running = await start({"new_principal_peer": True})
    a = await granted(running, "a")
    b = await granted(running, "b")
    await resolve(running, a)
    await resolve(running, a)
    await resolve(running, b)  # new for b, but executor's peer is known
    (first,) = await events(running, rule="new_principal_peer")
    assert (first.principal, first.connection_id, first.details["peer_host"]) == (EXECUTOR, a, "127.0.0.1")
    await resolve(running, a, "executor2")  # a new principal from a host never seen for it
    assert len(await events(running, rule="new_principal_peer")) == 2
    await stop(running)

    again = await start({"new_principal_peer": True})
    c = await granted(again, "c")
    await resolve(again, c)
    await resolve(again, b, "executor2")
    await resolve(again, a)
    assert len(await events(again, rule="new_principal_peer")) == 2  # nothing new after the restart
    await stop(again)


# ------------------------------------------------------------ oauth refresh failures


async def test_repeated_oauth_refresh_failures_alert(start: Start) -> None:
    refusing = serve(lambda seen: Answer.json({"error": "invalid_client"}, status=401))
    with refusing as token_server:
        running = await start({"oauth_refresh_failures": 3}, egress=EgressSettings(allow_loopback=True))
        config = {
            "client_id": "machine",
            "token_url": token_server.url + "/token",
            "grant_type": "client_credentials",
        }
        created = await running.admin().CreateConnection(
            pb.CreateConnectionRequest(
                name="machine", type="oauth2", provider="custom", config=struct(config),
                secrets={"client_secret": CANARY},
            )
        )  # fmt: skip
        await running.admin().GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
        for _ in range(2):
            error = await rpc_error(resolve(running, created.id))
            # Retrying will not help: the client is refused (not UNAVAILABLE, which invites retries).
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "invalid_client" in error.details()
        assert await events(running, rule="oauth_refresh_failures") == []
        await rpc_error(resolve(running, created.id))
        (event,) = await events(running, rule="oauth_refresh_failures")
        assert (event.connection_id, event.action, event.principal) == (created.id, "alerted", "")
        assert event.details["last_failure"] == "invalid_client"
        await stop(running)


# ------------------------------------------------------------ listing, tenancy, leaks, metrics


async def test_security_events_are_listed_per_tenant_paged_and_hold_no_secret(start: Start) -> None:
    running = await start({"denied_resolves": 1, "new_principal_peer": True}, metrics_listen="127.0.0.1:0")
    connection = await granted(running)
    await resolve(running, connection)
    for _ in range(3):
        await denied(running, "conn_nope", "executor2")
    await denied(running, "conn_nope_b", "executor_b")
    mine = await events(running)
    assert [e.rule for e in mine] == ["denied_burst"] * 3 + ["new_principal_peer"]  # newest first
    assert mine[0].id > mine[1].id
    theirs = await events(running, "admin_b")
    assert [(e.rule, e.principal) for e in theirs] == [
        ("denied_burst", "spiffe://broker.local/tenant/tenant-b/executor/demo")
    ]
    assert await events(running, principal=EXECUTOR, rule="denied_burst") == []
    assert [e.rule for e in await events(running, connection_id=connection)] == ["new_principal_peer"]

    admin = running.admin()
    page = await admin.ListSecurityEvents(pb.ListSecurityEventsRequest(page_size=2))
    assert len(page.events) == 2 and page.next_page_token
    rest = await admin.ListSecurityEvents(
        pb.ListSecurityEventsRequest(page_size=2, page_token=page.next_page_token)
    )
    assert [e.id for e in [*page.events, *rest.events]] == [e.id for e in mine] and not rest.next_page_token
    bad = await rpc_error(admin.ListSecurityEvents(pb.ListSecurityEventsRequest(page_token="nope")))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    for event in mine + theirs:
        assert CANARY not in str(event)
    assert CANARY not in running.logs.getvalue()

    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{running.broker.metrics_port}/metrics")).text
    line = next(
        ln for ln in text.splitlines() if ln.startswith('broker_security_events_total{rule="denied_burst"}')
    )
    assert float(line.split()[-1]) >= 4
    assert CANARY not in text
    await stop(running)


# ------------------------------------------------------------ alert webhook


def receiver(secret: str) -> Route:
    def route(seen: Seen) -> Answer:
        valid = webhook.verify_signature(
            secret,
            seen.headers.get("x-broker-timestamp", ""),
            seen.body,
            seen.headers.get("x-broker-signature", ""),
        )
        return Answer(204 if valid else 401)

    return route


async def test_alerts_are_posted_signed_to_the_alert_webhook(start: Start) -> None:
    with contextlib.ExitStack() as stack:
        hook: LocalServer = stack.enter_context(serve(receiver(HOOK_SECRET)))
        # First start: create the webhook connection; then restart with it named as the alert target.
        running = await start()
        created = await running.admin().CreateConnection(
            pb.CreateConnectionRequest(
                name="soc-alerts", type="webhook",
                config=struct({"url": hook.url + "/alerts", "auth_type": "hmac"}),
                secrets={"auth_secret": HOOK_SECRET},
            )
        )  # fmt: skip
        await stop(running)
        running = await start(
            {"denied_resolves": 2, "alert_webhook": f"default/{created.id}"},
            egress=EgressSettings(allow_loopback=True),
            metrics_listen="127.0.0.1:0",
        )
        for _ in range(2):
            await denied(running, "conn_probe")
        await events(running)
        for _ in range(100):
            if hook.requests:
                break
            await asyncio.sleep(0.05)
        (seen,) = hook.requests
        assert seen.method == "POST" and seen.path == "/alerts"
        assert webhook.verify_signature(
            HOOK_SECRET, seen.headers["x-broker-timestamp"], seen.body, seen.headers["x-broker-signature"]
        )
        body = json.loads(seen.body)
        assert body["type"] == "broker.security_event"
        assert body["event"]["rule"] == "denied_burst" and body["event"]["principal"] == EXECUTOR
        assert HOOK_SECRET not in seen.body.decode() and "x-test" not in seen.headers
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{running.broker.metrics_port}/metrics")).text
        assert 'broker_security_alert_deliveries_total{outcome="delivered"}' in text
        await stop(running)


async def test_an_unreachable_alert_webhook_is_counted_never_raised(start: Start) -> None:
    running = await start()
    created = await running.admin().CreateConnection(
        pb.CreateConnectionRequest(
            name="gone", type="webhook", config=struct({"url": f"http://127.0.0.1:{closed_port()}/x"})
        )
    )
    await stop(running)
    # Loopback is not allowed by the egress policy here: the delivery is blocked, and only counted.
    running = await start({"denied_resolves": 1, "alert_webhook": f"default/{created.id}"})
    await denied(running, "conn_probe")
    assert [e.rule for e in await events(running)] == ["denied_burst"]
    await running.broker.services.monitor.close()  # lets the queued alert go (and fail)
    assert "security_alert_failed" in running.logs.getvalue()
    await stop(running)
