"""An MCP server that requires OAuth, written by others: the TypeScript SDK's own example.

tests/integration/test_mcp_oauth_link.py drives the link between an `mcp` connection and an
`oauth2` connection against our own servers (tests/oauthserver.py, tests/mcpserver.py). Here the
other side is the MCP TypeScript SDK's example server `simpleStreamableHttp` run with
`--oauth --oauth-strict` (`@modelcontextprotocol/sdk`, pinned): its resource server checks each
token by introspection at the demo authorization server it starts beside itself
(`demoInMemoryOAuthProvider`, the SDK's `mcpAuthRouter`), and in strict mode both refuse a token
not asked for the server's URL (RFC 8707). What it does that ours do not, and what it does not do,
is in the README ("MCP servers that require OAuth").

The client is registered by hand (RFC 7591) and the endpoints read from the metadata by hand
(RFC 9728, RFC 8414), as an administrator would do before the broker discovers them.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import grpc
import httpx
import pytest
from google.protobuf.json_format import MessageToDict

from broker._proto import broker_pb2 as pb
from tests import nodeservers
from tests.conftest import Running
from tests.helpers import EXECUTOR, ShiftedClock, free_port, rpc_error, struct
from tests.integration import test_oauth_flow as flow
from tests.integration.test_proxy_api import proxy

pytestmark = pytest.mark.integration

# The OAuth2 flow tests' fixtures: a broker that may reach loopback on a shifted clock.
start, clock, broker = flow.start, flow.clock, flow.broker

PACKAGE, VERSION = "@modelcontextprotocol/sdk", "1.32.2"
EXAMPLE = "dist/esm/examples/server/simpleStreamableHttp.js"
REDIRECT = "http://127.0.0.1:9/callback"  # never reached: the "browser" below stops at it
DEMO_TOKEN_LIFE = 3600  # seconds: fixed in demoInMemoryOAuthProvider.js, and no refresh token


@dataclass(frozen=True)
class Reference:
    """The example's MCP server and its demo authorization server, as their metadata describe them."""

    mcp_url: str
    resource_metadata: dict[str, Any]
    server_metadata: dict[str, Any]

    def register(self, **metadata: Any) -> dict[str, Any]:
        """A client registered at the demo authorization server (RFC 7591), as an admin would."""
        asked = {
            "client_name": "secrets broker",
            "redirect_uris": [REDIRECT],
            "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "client_secret_post",
            **metadata,
        }
        answer = httpx.post(self.server_metadata["registration_endpoint"], json=asked)
        assert answer.status_code == 201, answer.text
        document: dict[str, Any] = answer.json()
        return document


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"the demo authorization server did not listen on {port}")


@contextmanager
def _serving(mcp_port: int, auth_port: int) -> Iterator[Reference]:
    """The example with its demo authorization server on these ports, until the block ends."""
    home = nodeservers.installed(PACKAGE, VERSION)
    entry = home / "node_modules" / PACKAGE / EXAMPLE
    env = {"MCP_PORT": str(mcp_port), "MCP_AUTH_PORT": str(auth_port)}
    with nodeservers.serving(home, [str(entry), "--oauth", "--oauth-strict"], mcp_port, env):
        _wait_for_port(auth_port)
        # The example names itself by `localhost`; in strict mode a token must be asked for exactly
        # that URL, so the MCP connection's server_url is spelled the same way.
        mcp_url = f"http://localhost:{mcp_port}/mcp"
        resource = httpx.get(f"http://localhost:{mcp_port}/.well-known/oauth-protected-resource/mcp").json()
        (issuer,) = resource["authorization_servers"]
        server = httpx.get(f"{issuer.rstrip('/')}/.well-known/oauth-authorization-server").json()
        yield Reference(mcp_url, resource, server)


@pytest.fixture(scope="module")
def reference() -> Iterator[Reference]:
    with _serving(free_port(), free_port()) as running:
        yield running


def follow_authorization(url: str) -> dict[str, str]:
    """What a browser does at the demo server: it signs the demo user in at once and redirects."""
    response = httpx.get(url, follow_redirects=False)
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT), location
    return dict(parse_qsl(urlsplit(location).query))


async def _authorized(
    running: Running, ref: Reference, *, public: bool = False, **config: Any
) -> pb.Connection:
    """The oauth2 connection "demo-oauth": a client registered, then signed in for the MCP server."""
    client = ref.register(token_endpoint_auth_method="none" if public else "client_secret_post")
    meta = ref.server_metadata
    values = {
        "client_id": client["client_id"],
        "authorize_url": meta["authorization_endpoint"],
        "token_url": meta["token_endpoint"],
        "resource": [ref.mcp_url],
        # The SDK's token endpoint reads the client's credentials from the form only.
        "token_auth_method": "client_secret_post",
        **config,
    }
    secrets = {} if public else {"client_secret": client["client_secret"]}
    draft = pb.ConnectionDraft(
        name="demo-oauth", type="oauth2", provider="custom", config=struct(values), secrets=secrets
    )
    admin = running.admin()
    begun = await admin.BeginAuthorization(
        pb.BeginAuthorizationRequest(draft=draft, redirect_uri=REDIRECT, scopes=["mcp:tools"])
    )
    landed = follow_authorization(begun.authorization_url)
    assert "error" not in landed, landed
    return await admin.CompleteAuthorization(
        pb.CompleteAuthorizationRequest(state=landed["state"], code=landed["code"])
    )


async def _ready(running: Running, ref: Reference, **config: Any) -> tuple[pb.Connection, pb.Connection]:
    """ "demo-oauth" signed in, and "demo-mcp" linked to it (tested before it is saved), its tools
    approved and `greet` granted to the executor in proxy mode."""
    oauth = await _authorized(running, ref, **config)
    admin = running.admin()
    linked = {"server_url": ref.mcp_url, "auth_type": "oauth2", "oauth_connection": oauth.name}
    tools = await admin.CreateConnection(
        pb.CreateConnectionRequest(name="demo-mcp", type="mcp", config=struct(linked), test_before_save=True)
    )
    assert tools.last_test.success, tools.last_test
    refreshed = await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=tools.id))
    assert refreshed.result.success, refreshed.result
    assert "greet" in {tool.name for tool in refreshed.tools}
    await admin.GrantAccess(
        pb.GrantAccessRequest(
            connection_id=tools.id, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY,
            scope=pb.GrantScope(tools=["greet"]),
        )
    )  # fmt: skip
    return oauth, tools


def _greet(running: Running, name: str = "Ada") -> Any:
    request = pb.CallMcpToolRequest(name="demo-mcp", tool="greet", arguments=struct({"name": name}))
    return proxy(running).CallMcpTool(request, timeout=20)


def _text(answer: pb.CallMcpToolResponse) -> str:
    return " ".join(MessageToDict(item).get("text", "") for item in answer.content)


async def _call_events(running: Running) -> list[pb.AuditEvent]:
    events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="mcp.call_tool"))
    return list(reversed(events.events))


@pytest.mark.parametrize("public", [False, True], ids=["confidential", "public"])
async def test_tools_are_discovered_and_called_with_a_token_asked_for_the_server(
    broker: Running, reference: Reference, public: bool
) -> None:
    # What RFC 9728 and RFC 8414 discovery would find: the server names itself as spelled here.
    assert reference.resource_metadata["resource"] == reference.mcp_url
    assert set(reference.server_metadata["token_endpoint_auth_methods_supported"]) == {
        "client_secret_post",
        "none",
    }
    oauth, _ = await _ready(broker, reference, public=public)
    assert oauth.status == pb.CONNECTION_STATUS_ACTIVE
    # The demo authorization server never issues a refresh token (though its metadata lists the grant).
    assert sorted(oauth.secret_fields) == (["access_token"] if public else ["access_token", "client_secret"])

    answer = await _greet(broker)
    assert not answer.is_error and _text(answer) == "Hello, Ada!", answer
    (event,) = await _call_events(broker)
    assert (event.outcome, event.details["oauth_connection"]) == ("allowed", oauth.id)


async def test_client_secret_basic_the_custom_providers_default_is_refused_by_the_sdks_token_endpoint(
    broker: Running, reference: Reference
) -> None:
    """The SDK's `authenticateClient` reads client_id and client_secret from the form only, so the
    code exchange fails unless the connection says `token_auth_method=client_secret_post`; the
    broker's error says which settings to check."""
    error = await rpc_error(_authorized(broker, reference, token_auth_method="client_secret_basic"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error.details() or ""
    assert "invalid_request" in details and "token_auth_method" in details, details


async def test_without_a_refresh_token_an_expired_token_stops_the_calls_until_signed_in_again(
    broker: Running, reference: Reference, clock: ShiftedClock
) -> None:
    oauth, _ = await _ready(broker, reference)
    clock.advance(DEMO_TOKEN_LIFE - 10)  # due, but still good: used as it is
    assert _text(await _greet(broker)) == "Hello, Ada!"
    clock.advance(20)  # past its end: there is nothing to refresh it with
    error = await rpc_error(_greet(broker))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs re-authorization (no refresh token)" in (error.details() or ""), error.details()
    *_, failed = await _call_events(broker)
    assert (failed.outcome, failed.reason) == ("failed", "oauth_refresh_failed")

    # Signing in again (the same client, the same resource) brings the calls back.
    admin = broker.admin()
    begun = await admin.BeginAuthorization(
        pb.BeginAuthorizationRequest(connection_id=oauth.id, redirect_uri=REDIRECT, scopes=["mcp:tools"])
    )
    landed = follow_authorization(begun.authorization_url)
    await admin.CompleteAuthorization(
        pb.CompleteAuthorizationRequest(state=landed["state"], code=landed["code"])
    )
    assert _text(await _greet(broker)) == "Hello, Ada!"


async def test_a_token_the_server_no_longer_knows_gets_http_500_so_nothing_is_refreshed_or_retried(
    broker: Running,
) -> None:
    """The demo keeps its tokens in memory. Restarted, it should answer the old token with 401 and a
    WWW-Authenticate (RFC 6750), which the broker would answer with a refresh and one more try; but
    the example's token verifier throws a plain Error when introspection says no, which the SDK's
    `requireBearerAuth` turns into HTTP 500 `server_error`. The broker reports what came (it cannot
    tell a refused token from a broken server) and tries nothing twice."""
    ports = free_port(), free_port()
    with _serving(*ports) as first:
        await _ready(broker, first)
        assert _text(await _greet(broker)) == "Hello, Ada!"
    with _serving(*ports):
        error = await rpc_error(_greet(broker))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "unexpected_response" in (error.details() or ""), error.details()
    *_, failed = await _call_events(broker)
    assert (failed.outcome, failed.reason) == ("failed", "unexpected_response")
    assert "retried" not in failed.details
