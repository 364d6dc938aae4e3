"""The MCP connection's link to an oauth2 connection (`service.linked`) attacked: by a hostile MCP
server, and by an admin who may edit connections but never read a secret and wants a token sent
to a server it was not asked for.

Same servers as tests/integration/test_mcp_oauth_link.py: tests/oauthserver.py as the
authorization server, tests/mcpserver.py as a resource server that asks it about each token.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import mcp_types as types
import pytest

from broker._proto import broker_pb2 as pb
from tests import mcpserver, oauthserver
from tests.conftest import Running
from tests.helpers import EXECUTOR, rpc_error, struct
from tests.httpservers import Answer, Seen, serve
from tests.integration import test_mcp_oauth_link as link
from tests.integration import test_oauth_flow as flow
from tests.integration.test_proxy_api import proxy

pytestmark = pytest.mark.integration

# The link tests' fixtures: a broker that may reach loopback on a shifted clock, and the servers.
start, clock, broker, servers = flow.start, flow.clock, flow.broker, link.servers
Servers = link.Servers


async def test_a_token_refused_with_401_then_echoed_by_the_server_after_the_retry_never_reaches_the_executor(
    broker: Running, servers: Servers
) -> None:
    """A server that answers 401 to a good token makes the broker refresh and try again with a new
    one; if it then quotes the first token in its answer, that token, still good at the
    authorization server, must be scrubbed as the one sent second is."""
    quoted: list[str] = []

    async def quote(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        return types.CallToolResult(content=[types.TextContent(type="text", text=f"you sent {quoted}")])

    servers.mcp.behaviours["quote"] = quote
    await link._ready(broker, servers)
    (first,) = servers.auth.valid_access_tokens()
    good = servers.mcp.accepts
    assert good is not None

    def refuse_the_first(token: str | None) -> bool:
        if token == first:
            quoted.append(first)
            return False
        return good(token)

    servers.mcp.accepts = refuse_the_first
    request = pb.CallMcpToolRequest(name="tools", tool="quote", arguments=struct({}))
    answer = await proxy(broker).CallMcpTool(request, timeout=20)
    *_, event = await link._call_events(broker)
    assert event.details["retried"] == "after_401"
    assert quoted == [first]
    assert first not in str(answer), answer


async def test_a_resource_changed_while_the_code_is_exchanged_leaves_no_token_for_the_new_list(
    broker: Running, servers: Servers
) -> None:
    """Signing in again asks for the resource the connection lists when it begins; an admin who
    adds their own server to `resource` while the code is at the token endpoint must not end up
    with the new token on a connection that lists their server (and a link to it)."""
    oauth, _ = await link._ready(broker, servers)
    admin = broker.admin()
    arrived, release = threading.Event(), threading.Event()

    async def hold(grant: str) -> None:
        if grant == "authorization_code":
            arrived.set()
            await asyncio.to_thread(release.wait, 10)

    with mcpserver.running(tool_count=1) as theirs:
        begun = await admin.BeginAuthorization(
            pb.BeginAuthorizationRequest(connection_id=oauth.id, redirect_uri=flow.REDIRECT)
        )
        code, state = await asyncio.to_thread(flow.follow_authorization, begun.authorization_url)
        servers.auth.before_reply = hold
        completing = asyncio.ensure_future(
            admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
        )
        assert await asyncio.to_thread(arrived.wait, 10)
        wider = struct({"resource": [servers.mcp.url, theirs.url]})
        updated = await admin.UpdateConnection(pb.UpdateConnectionRequest(id=oauth.id, config=wider))
        assert updated.status == pb.CONNECTION_STATUS_EXPIRED
        release.set()
        error = await rpc_error(completing)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert "start the authorization again" in (error.details() or "")
        servers.auth.before_reply = None
        assert servers.auth.revocation_requests  # the tokens nobody keeps are given back

        now = await admin.GetConnection(pb.GetConnectionRequest(id=oauth.id))
        assert now.status == pb.CONNECTION_STATUS_EXPIRED, now
        assert sorted(now.secret_fields) == ["client_secret"]
        config = {"server_url": theirs.url, "auth_type": "oauth2", "oauth_connection": oauth.id}
        linked = await admin.CreateConnection(
            pb.CreateConnectionRequest(name="theirs", type="mcp", config=struct(config))
        )
        tested = await rpc_error(admin.TestConnection(pb.TestConnectionRequest(id=linked.id)))
        assert tested.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert not [s for s in theirs.seen if s.headers.get("authorization")]


async def test_an_api_that_refuses_a_token_then_quotes_it_after_the_retry_gives_nothing_away(
    broker: Running,
) -> None:
    """The same for ProxyHttp on an oauth2 connection, whose 401 retry the MCP one copies."""
    sent: list[str] = []

    def refuse_then_quote(seen: Seen) -> Answer:
        sent.append(seen.headers.get("authorization", ""))
        if len(sent) == 1:
            return Answer.json({"error": "invalid_token"}, status=401)
        return Answer.json({"you_sent": sent}, status=200)

    admin = broker.admin()
    with oauthserver.running() as provider, serve(refuse_then_quote) as api:
        config = {
            "client_id": provider.client_id,
            "token_url": provider.token_url,
            "grant_type": "client_credentials",
            "verify_url": f"{api.url}/me",  # a custom provider's API is the origin of this URL
        }
        created = await admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="machine", type="oauth2", provider="custom", config=struct(config),
                secrets={"client_secret": provider.client_secret},
            )
        )  # fmt: skip
        await admin.GrantAccess(
            pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY)
        )
        answer = await proxy(broker).ProxyHttp(pb.ProxyHttpRequest(name="machine", method="GET", path="/me"))
    assert answer.status == 200 and len(sent) == 2 and sent[0] != sent[1]
    first = sent[0].removeprefix("Bearer ")
    assert first and first.encode() not in answer.SerializeToString(), answer.body


async def test_a_resource_changed_while_a_client_credentials_token_is_fetched_keeps_no_token_for_the_old_list(
    broker: Running, servers: Servers
) -> None:
    """The same race on a client credentials connection, whose resource change fetches a new token
    at the next use: the token asked for the old list must not land on the new one."""
    admin = broker.admin()
    machine = await flow.machine_connection(broker, servers.auth, resource=[servers.mcp.url])
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=machine.id, principal=EXECUTOR))
    arrived, release = threading.Event(), threading.Event()

    async def hold(grant: str) -> None:
        if grant == "client_credentials" and not arrived.is_set():
            arrived.set()
            await asyncio.to_thread(release.wait, 10)

    servers.auth.before_reply = hold
    resolving = asyncio.ensure_future(flow.resolve(broker, machine.id))
    assert await asyncio.to_thread(arrived.wait, 10)
    wider = [servers.mcp.url, "https://theirs.example/mcp"]
    await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=machine.id, config=struct({"resource": wider}))
    )
    release.set()
    try:
        await resolving
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    servers.auth.before_reply = None

    token = (await flow.resolve(broker, machine.id)).secrets["access_token"]
    assert servers.auth.access_tokens[token].resources == tuple(wider)
