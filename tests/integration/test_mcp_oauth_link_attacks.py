"""The MCP connection's link to an oauth2 connection (`service.linked`) attacked: by a hostile MCP
server, and by an admin who may edit connections but never read a secret and wants a token sent
to a server it was not asked for.

Same servers as tests/integration/test_mcp_oauth_link.py: tests/oauthserver.py as the
authorization server, tests/mcpserver.py as a resource server that asks it about each token.
"""

from __future__ import annotations

from typing import Any

import mcp_types as types
import pytest

from broker._proto import broker_pb2 as pb
from tests import oauthserver
from tests.conftest import Running
from tests.helpers import EXECUTOR, struct
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
