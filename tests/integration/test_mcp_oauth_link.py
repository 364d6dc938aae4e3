"""MCP servers that require OAuth (the MCP authorization spec): an `mcp` connection with auth_type
oauth2 borrows the access token of the oauth2 connection it names, asked for the server with an
RFC 8707 resource indicator and kept fresh by the broker.

Against the test authorization server (tests/oauthserver.py) and an MCP server (tests/mcpserver.py)
that, as a resource server does, accepts only live tokens whose audience is its own URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from tests import mcpserver, oauthserver
from tests.conftest import Running
from tests.helpers import EXECUTOR, ShiftedClock, field_violations, rpc_error, struct
from tests.integration import test_oauth_flow as flow
from tests.integration.test_oauth_flow import age_past_half_life, authorize
from tests.integration.test_proxy_api import proxy

# The OAuth2 flow tests' fixtures: a broker that may reach loopback on a shifted clock.
start, clock, broker = flow.start, flow.clock, flow.broker


class Servers:
    """An authorization server and an MCP server that asks it whether a token is good for itself."""

    def __init__(self, auth: oauthserver.OAuthTestServer, mcp: mcpserver.McpTestServer) -> None:
        self.auth, self.mcp = auth, mcp

    def refuse_current_tokens(self) -> None:
        """The authorization server forgets the access tokens it issued (revoked, say)."""
        self.auth.access_tokens.clear()


@pytest.fixture
def servers() -> Iterator[Servers]:
    with oauthserver.running() as auth:
        holder: list[mcpserver.McpTestServer] = []

        def accepts(token: str | None) -> bool:
            issued = auth.access_tokens.get(token or "")
            return (
                token in auth.valid_access_tokens()
                and issued is not None
                and holder[0].url in issued.resources
            )

        with mcpserver.running(tool_count=2, accepts=accepts) as mcp:
            holder.append(mcp)
            yield Servers(auth, mcp)


async def _linked(
    running: Running, s: Servers, oauth_connection: str = "calendar", **more: Any
) -> pb.Connection:
    config = {"server_url": s.mcp.url, "auth_type": "oauth2", "oauth_connection": oauth_connection, **more}
    created = await running.admin().CreateConnection(
        pb.CreateConnectionRequest(name="tools", type="mcp", config=struct(config))
    )
    return created


async def _ready(running: Running, s: Servers) -> tuple[pb.Connection, pb.Connection]:
    """The oauth2 connection "calendar" for the MCP server, and the MCP connection "tools" linked to it
    by name, its tools approved and granted to the executor in proxy mode."""
    oauth = await authorize(running, s.auth, resource=[s.mcp.url])
    tools = await _linked(running, s)
    refreshed = await running.admin().RefreshMcpTools(pb.RefreshMcpToolsRequest(id=tools.id))
    assert refreshed.result.success, refreshed.result
    await running.admin().GrantAccess(
        pb.GrantAccessRequest(connection_id=tools.id, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY)
    )
    return oauth, tools


def _call(running: Running) -> Any:
    request = pb.CallMcpToolRequest(name="tools", tool="tool_00", arguments=struct({"x": 1}))
    return proxy(running).CallMcpTool(request, timeout=20)


async def _call_events(running: Running) -> list[pb.AuditEvent]:
    events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="mcp.call_tool"))
    return list(reversed(events.events))


async def test_a_linked_mcp_connection_calls_tools_with_the_oauth2_connections_token(
    broker: Running, servers: Servers
) -> None:
    oauth, tools = await _ready(broker, servers)
    # Named by name, kept as the id: a rename of the oauth2 connection does not break the link.
    assert tools.config["oauth_connection"] == oauth.id
    assert list(tools.secret_fields) == []

    answer = await _call(broker)
    assert not answer.is_error
    (token,) = servers.auth.valid_access_tokens()
    sent = [s.headers.get("authorization") for s in servers.mcp.seen if s.method == "POST"]
    assert sent and set(sent) == {f"Bearer {token}"}
    # The test server echoes the token it was sent, as a careless server might: it never comes back.
    assert token not in str(answer)
    (event,) = await _call_events(broker)
    assert (event.outcome, event.details["oauth_connection"]) == ("allowed", oauth.id)


async def test_resolve_on_a_linked_mcp_connection_releases_no_token(
    broker: Running, servers: Servers
) -> None:
    _, tools = await _ready(broker, servers)
    await broker.admin().GrantAccess(pb.GrantAccessRequest(connection_id=tools.id, principal=EXECUTOR))
    released = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=tools.id))
    assert dict(released.secrets) == {}
    assert released.config["oauth_connection"]


async def test_a_due_token_is_refreshed_before_the_session(
    broker: Running, servers: Servers, clock: ShiftedClock
) -> None:
    servers.auth.expires_in = flow.SHORT_LIFE
    await _ready(broker, servers)
    age_past_half_life(clock)
    servers.refuse_current_tokens()  # only a refreshed token gets through now
    answer = await _call(broker)
    assert not answer.is_error
    assert servers.auth.token_requests["refresh_token"] == 1
    # The refresh asked for the MCP server again, so the new token is for it.
    assert servers.auth.resources_seen[-1] == ("refresh_token", (servers.mcp.url,))


async def test_a_token_the_server_refuses_is_refreshed_once_and_the_call_tried_once_more(
    broker: Running, servers: Servers
) -> None:
    await _ready(broker, servers)
    servers.refuse_current_tokens()
    answer = await _call(broker)
    assert not answer.is_error
    assert servers.auth.token_requests["refresh_token"] == 1
    (event,) = await _call_events(broker)
    assert (event.outcome, event.details["retried"]) == ("allowed", "after_401")

    # A server that refuses the new token too: one refresh, one more try, never more.
    servers.mcp.accepts = lambda token: False
    before = len(servers.mcp.seen)
    error = await rpc_error(_call(broker))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert "auth_failed" in (error.details() or "")
    assert servers.auth.token_requests["refresh_token"] == 2
    initializes = [s for s in servers.mcp.seen[before:] if s.method == "POST"]
    assert len(initializes) == 2


async def test_the_link_must_name_an_oauth2_connection_whose_tokens_are_for_the_server(
    broker: Running, servers: Servers
) -> None:
    admin = broker.admin()
    await authorize(broker, servers.auth)  # "calendar", with no resource indicator
    elsewhere = await authorize(
        broker, servers.auth, name="elsewhere", resource=["https://mcp.example.com/mcp"]
    )
    http = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="api", type="http", config=struct({"base_url": "https://api.example"})
        )
    )
    theirs = await authorize(broker, servers.auth, name="theirs", resource=[servers.mcp.url])
    await admin.DeleteConnection(pb.DeleteConnectionRequest(id=theirs.id))
    for ref, problem in [
        ("calendar", "do not list"),
        (elsewhere.id, "do not list"),
        ("api", "names a http connection"),
        (http.id, "names a http connection"),
        ("nothing-by-this-name", "names no oauth2 connection"),
        (theirs.id, "which is deleted"),
        ("theirs", "names no oauth2 connection"),  # a deleted connection's name is free
    ]:
        error = await rpc_error(_linked(broker, servers, ref))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = field_violations(error)
        assert list(violations) == ["config.oauth_connection"], violations
        assert problem in violations["config.oauth_connection"], violations
    names = [c.name for c in (await admin.ListConnections(pb.ListConnectionsRequest())).connections]
    assert "tools" not in names

    # Another tenant's oauth2 connection, by id or by name, is no connection at all.
    mine = await authorize(broker, servers.auth, name="mine", resource=[servers.mcp.url])
    config = {"server_url": servers.mcp.url, "auth_type": "oauth2"}
    for ref in (mine.id, "mine"):
        error = await rpc_error(
            broker.admin("admin_b").CreateConnection(
                pb.CreateConnectionRequest(
                    name="stolen", type="mcp", config=struct({**config, "oauth_connection": ref})
                )
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "names no oauth2 connection" in field_violations(error)["config.oauth_connection"]


async def test_a_revoked_oauth2_connection_stops_the_calls_before_any_reaches_the_server(
    broker: Running, servers: Servers
) -> None:
    oauth, _ = await _ready(broker, servers)
    await broker.admin().RevokeConnection(pb.RevokeConnectionRequest(id=oauth.id, reason="left the team"))
    before = len(servers.mcp.seen)
    error = await rpc_error(_call(broker))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"oauth2 connection {oauth.id}" in (error.details() or "") and "revoked" in (error.details() or "")
    assert len(servers.mcp.seen) == before
    (event,) = await _call_events(broker)
    assert (event.outcome, event.reason) == ("failed", "oauth_link_broken")


async def test_changing_the_resource_drops_the_tokens_and_breaks_the_link(
    broker: Running, servers: Servers
) -> None:
    """An admin who may edit but never read a secret must not be able to have the broker send a
    token to a server it was not asked for: pointing the oauth2 connection's resource elsewhere
    drops its tokens, and the link no longer holds."""
    oauth, _ = await _ready(broker, servers)
    admin = broker.admin()
    wider = [servers.mcp.url, "https://attacker.example/mcp"]
    updated = await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=oauth.id, config=struct({"resource": wider}))
    )
    assert updated.status == pb.CONNECTION_STATUS_EXPIRED
    assert updated.reauthorization.reason == "resource_changed"
    assert sorted(updated.secret_fields) == ["client_secret"]
    error = await rpc_error(_call(broker))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in (error.details() or "")

    # Signing in again (for the indicators it now lists) brings the link back.
    begun = await admin.BeginAuthorization(
        pb.BeginAuthorizationRequest(connection_id=oauth.id, redirect_uri=flow.REDIRECT)
    )
    code, state = await asyncio.to_thread(flow.follow_authorization, begun.authorization_url)
    await admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    assert not (await _call(broker)).is_error


async def test_a_linked_connection_is_tested_and_discovered_with_the_token(
    broker: Running, servers: Servers
) -> None:
    _, tools = await _ready(broker, servers)
    tested = await broker.admin().TestConnection(pb.TestConnectionRequest(id=tools.id))
    assert tested.success, tested
    servers.refuse_current_tokens()  # a test uses the token as it is; a 401 is its result
    tested = await broker.admin().TestConnection(pb.TestConnectionRequest(id=tools.id))
    assert not tested.success and tested.category == pb.TEST_CATEGORY_AUTH_FAILED


async def test_a_draft_linked_by_name_is_tested_with_the_token(broker: Running, servers: Servers) -> None:
    await authorize(broker, servers.auth, resource=[servers.mcp.url])
    config = {"server_url": servers.mcp.url, "auth_type": "oauth2", "oauth_connection": "calendar"}
    draft = pb.ConnectionDraft(name="tools", type="mcp", config=struct(config))
    tested = await broker.admin().TestConnection(pb.TestConnectionRequest(draft=draft))
    assert tested.success, tested
    discovered = await broker.admin().DiscoverMcpTools(pb.DiscoverMcpToolsRequest(draft=draft))
    assert [t.name for t in discovered.tools] == ["tool_00", "tool_01"]
