"""What a pending authorization remembers, and what a hostile provider or configuration cannot make it
do: a connection changed between BeginAuthorization and CompleteAuthorization, shortened echoes of
secrets, granted scopes that quote a secret, an authorization endpoint carrying flow parameters."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from broker._proto import broker_pb2 as pb
from tests import oauthserver
from tests.conftest import Running
from tests.helpers import ShiftedClock, rpc_error, struct
from tests.integration import test_oauth_flow as flow
from tests.integration.test_oauth_flow import REDIRECT, authorize, follow_authorization

# The OAuth2 flow tests' fixtures: a broker that may reach loopback on a shifted clock, the test server.
start, clock, server, broker = flow.start, flow.clock, flow.server, flow.broker

MCP = "https://mcp.example.com/mcp"
API = "https://api.example.com/v2"


async def begin_again(running: Running, connection_id: str) -> tuple[str, str]:
    """Re-authorize a connection up to the redirect: (code, state)."""
    begun = await running.admin().BeginAuthorization(
        pb.BeginAuthorizationRequest(connection_id=connection_id, redirect_uri=REDIRECT)
    )
    return await asyncio.to_thread(follow_authorization, begun.authorization_url)


async def test_a_connection_changed_between_begin_and_complete_is_refused_before_the_code_is_sent(
    broker: Running, clock: ShiftedClock
) -> None:
    """Begin asked the provider for one audience with one client; if the connection's resource, client
    or endpoints changed since, Complete must not send the code with the new values (a token for another
    audience, or the code to another token endpoint): it refuses, naming what changed."""
    admin = broker.admin()
    with oauthserver.running() as server, oauthserver.running() as other:
        changes: list[dict[str, Any]] = [
            {"resource": [API]},
            {"token_url": other.token_url},
            {"client_id": "someone-else"},
            {"token_auth_method": "client_secret_post"},
        ]
        for n, change in enumerate(changes):
            created = await authorize(broker, server, name=f"c{n}", resource=[MCP])
            code, state = await begin_again(broker, created.id)
            # A new endpoint takes the secrets again (they are bound to where they are sent).
            tokens = {"client_secret": server.client_secret, "access_token": "at-x", "refresh_token": "rt-x"}
            again = tokens if "token_url" in change else {}
            await admin.UpdateConnection(
                pb.UpdateConnectionRequest(id=created.id, config=struct(change), secrets=again)
            )
            refused = await rpc_error(
                admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
            )
            assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, change
            (name,) = change
            assert name in refused.details() and "start the authorization again" in refused.details()
        # The code went nowhere: neither token endpoint saw another exchange.
        assert server.token_requests["authorization_code"] == len(changes)
        assert other.token_requests["authorization_code"] == 0
        events = await admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))
        failed = [
            e for e in events.events if (e.action, e.reason) == ("oauth.complete", "connection_changed")
        ]
        assert len(failed) == len(changes)

        # A change the authorization does not depend on is no reason to refuse: the scopes asked for
        # are the ones Begin sent, kept with the pending authorization.
        created = await authorize(broker, server, name="kept", resource=[MCP])
        code, state = await begin_again(broker, created.id)
        await admin.UpdateConnection(
            pb.UpdateConnectionRequest(id=created.id, config=struct({"scopes": ["other"]}))
        )
        done = await admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
        assert done.status == pb.CONNECTION_STATUS_ACTIVE and list(done.config["scopes"]) == ["calendar"]
        assert [r for kind, r in server.resources_seen if kind == "authorization_code"][-1] == (MCP,)


def pieces(secret: str) -> list[str]:
    return [secret[i : i + 4] for i in range(len(secret) - 3)]


async def test_a_provider_quoting_secrets_shortened_keeps_none_of_their_characters(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    """Providers shorten what they quote ("token abcd...wxyz"): the reason an expired connection shows
    keeps no four characters of the refresh token, the access token or the client secret."""
    server.expires_in = flow.SHORT_LIFE
    created = await authorize(broker, server)
    released = await flow.resolve(broker, created.id)
    refresh_token, access_token = released.secrets["refresh_token"], released.secrets["access_token"]
    secret = server.client_secret
    server.error_next(
        "invalid_grant",
        description=f"refresh token {refresh_token[:6]}...{refresh_token[-4:]} revoked (issued for"
        f" {access_token[:10]}\u2026), client {secret[:4]}****{secret[-5:]}; sign in again",
    )
    flow.age_past_half_life(clock)
    await rpc_error(flow.resolve(broker, created.id))
    got = await broker.admin().GetConnection(pb.GetConnectionRequest(id=created.id))
    described = got.reauthorization.description
    assert described.startswith("refresh token [redacted]...[redacted] revoked (issued for [redacted]")
    assert described.endswith("sign in again")
    for piece in pieces(refresh_token) + pieces(access_token) + pieces(secret):
        assert piece not in described, piece
