"""OAuth2 connections for audience-bound APIs and MCP servers, against the test authorization server:
RFC 8707 resource indicators on every request, why a connection is EXPIRED, and provider revocations
that a shutdown waits for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from datetime import UTC, timedelta
from typing import Any

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.cli._output import render_connection
from tests import oauthserver
from tests.conftest import Running
from tests.helpers import EXECUTOR, ShiftedClock, field_violations, rpc_error
from tests.integration import test_oauth_flow as flow
from tests.integration.test_oauth_flow import (
    REDIRECT,
    SHORT_LIFE,
    age_past_half_life,
    authorize,
    draft,
    follow_authorization,
    machine_connection,
    resolve,
)

# The OAuth2 flow tests' fixtures: a broker that may reach loopback on a shifted clock, the test server.
start, clock, server, broker = flow.start, flow.clock, flow.server, flow.broker

MCP = "https://mcp.example.com/mcp"
API = "https://api.example.com/v2?tenant=7"  # RFC 8707 allows a query, not a fragment


async def test_the_resource_goes_on_the_authorization_the_code_exchange_and_every_refresh(
    broker: Running, clock: ShiftedClock
) -> None:
    """MCP authorization, "Resource Parameter Implementation": `resource` on both the authorization
    and the token requests. Refreshes carry it too (RFC 8707 section 2.2), so a refreshed token keeps
    the audience: this server refuses (invalid_target) any resource it does not serve."""
    with oauthserver.running(resources=(MCP, API)) as server:
        server.expires_in = SHORT_LIFE
        created = await authorize(broker, server, resource=[MCP, API])
        assert list(created.config["resource"]) == [MCP, API]
        age_past_half_life(clock)
        released = await resolve(broker, created.id)
        assert server.token_requests["refresh_token"] == 1
        assert [kind for kind, _ in server.resources_seen] == [
            "authorize",
            "authorization_code",
            "refresh_token",
        ]
        assert {resources for _, resources in server.resources_seen} == {(MCP, API)}
        # The audience the provider bound to the refreshed token is the one asked for.
        assert server.access_tokens[released.secrets["access_token"]].resources == (MCP, API)


async def test_a_client_credentials_token_is_asked_for_the_resource(broker: Running) -> None:
    with oauthserver.running(resources=(MCP,)) as server:
        created = await machine_connection(broker, server, resource=[MCP])
        await broker.admin().GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
        released = await resolve(broker, created.id)
        assert server.resources_seen == [("client_credentials", (MCP,))]
        assert server.access_tokens[released.secrets["access_token"]].resources == (MCP,)


async def test_without_a_resource_no_request_carries_one(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    server.expires_in = SHORT_LIFE
    created = await authorize(broker, server)
    age_past_half_life(clock)
    await resolve(broker, created.id)
    assert [resources for _, resources in server.resources_seen] == [(), (), ()]


@pytest.mark.parametrize(
    ("resource", "says"),
    [
        (["https://mcp.example.com/mcp#tools"], "fragment"),
        (["mcp.example.com"], "absolute"),
        (["/mcp"], "absolute"),
        (["https:///mcp"], "http(s)"),
        (["https://mcp.example.com/ mcp"], "whitespace"),
        (["https://mcp.exämple.com/"], "non-ASCII"),
        ([MCP, MCP], "twice"),
        ([], "at least one"),
        ([f"https://mcp.example.com/{n}" for n in range(17)], "at most 16"),
        ("https://mcp.example.com/mcp", "list"),
    ],
)
async def test_an_invalid_resource_is_refused_naming_the_field_and_nothing_is_written(
    broker: Running, server: oauthserver.OAuthTestServer, resource: Any, says: str
) -> None:
    admin = broker.admin()
    begin = pb.BeginAuthorizationRequest(draft=draft(server, resource=resource), redirect_uri=REDIRECT)
    refused = await rpc_error(admin.BeginAuthorization(begin))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.resource" in field_violations(refused) and says in refused.details()
    created = await rpc_error(machine_connection(broker, server, resource=resource))
    assert created.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.resource" in field_violations(created)
    assert not (await admin.ListConnections(pb.ListConnectionsRequest())).connections
    assert server.resources_seen == []


async def test_a_resource_among_the_authorize_params_is_refused_for_the_field_that_keeps_it(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    """authorize_params reach the authorization request only: a resource there would be lost on the
    first refresh. The broker sets `resource` itself now, from the typed field."""
    for name in ("resource", "Resource"):
        begin = pb.BeginAuthorizationRequest(
            draft=draft(server, authorize_params={name: MCP}), redirect_uri=REDIRECT
        )
        refused = await rpc_error(broker.admin().BeginAuthorization(begin))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "config.authorize_params" in field_violations(refused)
        assert "resource field" in refused.details()


async def test_an_expired_connection_says_why_and_since_when_with_the_providers_text_scrubbed(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    server.expires_in = SHORT_LIFE
    created = await authorize(broker, server)
    released = await resolve(broker, created.id)
    (refresh_token,), access_token = server.refresh_tokens, released.secrets["access_token"]
    # A provider quoting what it refused, and the token it issued, in its error_description.
    server.error_next(
        "invalid_grant",
        description=f"refresh token {refresh_token} revoked;\naccess token {access_token} too, "
        f"client {server.client_secret}: user must sign in again",
    )
    age_past_half_life(clock)
    refused_at = clock()
    await rpc_error(resolve(broker, created.id))
    admin = broker.admin()
    got = await admin.GetConnection(pb.GetConnectionRequest(id=created.id))
    assert got.status == pb.CONNECTION_STATUS_EXPIRED
    why = got.reauthorization
    assert (why.reason, why.error) == ("refresh_refused", "invalid_grant")
    assert abs(why.since.ToDatetime(tzinfo=UTC) - refused_at) < timedelta(seconds=5)
    assert why.description == (
        "refresh token [redacted] revoked; access token [redacted] too, client [redacted]:"
        " user must sign in again"
    )
    (listed,) = (
        await admin.ListConnections(pb.ListConnectionsRequest(status=pb.CONNECTION_STATUS_EXPIRED))
    ).connections
    assert listed.reauthorization == why
    shown = render_connection(got)
    assert "expired:" in shown and "refresh_refused (invalid_grant) at " in shown
    for secret in (refresh_token, access_token, server.client_secret):
        assert secret not in str(got) + shown + broker.logs.getvalue()
        assert secret not in str(await admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000)))
    # Authorized again: active, and no reason left behind.
    begun = await admin.BeginAuthorization(
        pb.BeginAuthorizationRequest(connection_id=created.id, redirect_uri=REDIRECT)
    )
    code, state = await asyncio.to_thread(follow_authorization, begun.authorization_url)
    again = await admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    assert again.status == pb.CONNECTION_STATUS_ACTIVE and not again.HasField("reauthorization")


async def test_a_connection_needing_no_reauthorization_shows_no_reason(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    created = await authorize(broker, server)
    assert not created.HasField("reauthorization")
    assert "expired:" not in render_connection(created)


async def test_shutdown_waits_for_a_slow_provider_revocation_and_cuts_off_one_past_the_grace(
    start: Any,
) -> None:
    """Revoke answers after 5 s, the provider later: shutdown waits for that answer within the grace
    (audited `revoked`); one slower still is cut off at the grace, logged and audited as such."""
    running: Running = await start()
    with oauthserver.running() as slow, oauthserver.running() as stuck:
        slow_conn = await authorize(running, slow)
        stuck_conn = await authorize(running, stuck, name="stuck")
        slow.revoke_delay, stuck.revoke_delay = 6.5, 60.0
        admin = running.admin()
        await asyncio.gather(
            *(
                admin.RevokeConnection(pb.RevokeConnectionRequest(id=c.id, reason="leaked"), timeout=9)
                for c in (slow_conn, stuck_conn)
            )
        )
        assert not slow.revoked  # the 5 s the caller waits are over; the revocations go on
        await running.close()
        began = asyncio.get_running_loop().time()
        await running.broker.stop(grace=4.0)
        took = asyncio.get_running_loop().time() - began
        assert slow.revoked and not stuck.revoked
        assert took < 4.0
    logs = [json.loads(line) for line in running.logs.getvalue().splitlines() if line.startswith("{")]
    cut = [e for e in logs if e.get("event") == "upstream_revocation_cut_off"]
    assert [e["connection_id"] for e in cut] == [stuck_conn.id]
    (drained,) = [e for e in logs if e.get("event") == "upstream_revocations_drained"]
    assert (drained["completed"], drained["cut_off"]) == (1, 1)
    with contextlib.closing(sqlite3.connect(running.broker.settings.storage_path)) as db:
        rows = db.execute(
            "SELECT connection_id, outcome, reason FROM audit_events"
            " WHERE action = 'connection.upstream_revocation'"
        ).fetchall()
    assert sorted(rows) == sorted(
        [(slow_conn.id, "succeeded", ""), (stuck_conn.id, "failed", "cut_off_at_shutdown")]
    )
