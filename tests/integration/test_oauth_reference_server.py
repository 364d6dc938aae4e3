"""The broker's OAuth2 client against a certified OpenID Provider (panva's `oidc-provider`).

tests/oauthserver.py is ours, written to the RFCs as we read them. This server is what other
clients are tested against: the authorization code flow with PKCE and a consent screen, the
`iss` of RFC 9207, RFC 8707 resource indicators, refresh, revocation (RFC 7009) and client
credentials. Whether a token is still good is asked of the provider itself (RFC 7662
introspection), not taken from the broker. Node.js runs it (tests/nodeservers.py).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from broker._proto import broker_pb2 as pb
from broker.egress import EgressSettings
from tests import nodeservers
from tests.conftest import Running
from tests.helpers import EXECUTOR, free_port, struct

pytestmark = pytest.mark.integration

PACKAGE, VERSION = "oidc-provider", "9.13.3"
SERVER = Path(__file__).parents[1] / "node" / "oidc_provider.mjs"
API = "https://api.example.test/"
TOKEN_TTL = 4  # seconds: a token this short is refreshed at half its life
REDIRECT_URI = "http://127.0.0.1:9/callback"  # never reached: the browser below stops at it


@dataclass(frozen=True)
class Provider:
    issuer: str
    web_secret: str
    machine_secret: str

    async def introspect(self, token: str) -> dict[str, Any]:
        """What the provider says of `token` (RFC 7662), asked as a client of its own."""
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"{self.issuer}/token/introspection",
                data={"token": token},
                auth=("inspector", self.machine_secret),
            )
        answer.raise_for_status()
        document: dict[str, Any] = answer.json()
        return document


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    home = nodeservers.installed(PACKAGE, VERSION)
    shutil.copy(SERVER, home / SERVER.name)
    port = free_port()
    running = Provider(f"http://127.0.0.1:{port}", secrets.token_urlsafe(24), secrets.token_urlsafe(24))
    env = {
        "WEB_SECRET": running.web_secret,
        "MACHINE_SECRET": running.machine_secret,
        "REDIRECT_URI": REDIRECT_URI,
        "API": API,
        "TOKEN_TTL": str(TOKEN_TTL),
    }
    with nodeservers.serving(home, [SERVER.name], port, env):
        yield running


@pytest.fixture
async def broker(make_broker: Callable[..., object]) -> AsyncIterator[Running]:
    running: Running = await make_broker(egress=EgressSettings(allow_loopback=True))  # type: ignore[misc]
    yield running


def sign_in_at_the_provider(url: str, redirect_uri: str) -> str:
    """What a person's browser does at the provider: its development sign-in and consent, up to
    the redirect to `redirect_uri` (returned, not followed)."""
    with httpx.Client(follow_redirects=False, timeout=10) as browser:  # it keeps the provider's cookies
        response = browser.get(url)
        for _ in range(12):
            if response.is_redirect:
                location = str(response.url.join(response.headers["location"]))
                if location.startswith(redirect_uri):
                    return location
                response = browser.get(location)
                continue
            assert response.status_code == 200, response.text[-2000:]
            form = re.search(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', response.text, re.S)
            assert form is not None, response.text[-2000:]
            fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', form[2]))
            if 'name="login"' in form[2]:
                fields.update(login="ada", password="any")  # the development sign-in takes anyone
            response = browser.post(str(response.url.join(form[1])), data=fields)
    raise AssertionError("the provider never redirected back")


async def sign_in(url: str) -> dict[str, str]:
    """The code and state the provider redirects with, after signing in and consenting."""
    location = await asyncio.to_thread(sign_in_at_the_provider, url, REDIRECT_URI)
    return dict(parse_qsl(urlsplit(location).query))


async def resolve_token(broker: Running, connection_id: str) -> str:
    released = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    assert list(released.secrets) == ["access_token"]  # never the client secret or refresh token
    return released.secrets["access_token"]


async def test_sign_in_with_pkce_iss_and_a_resource_then_refresh_and_revoke(
    broker: Running, provider: Provider
) -> None:
    admin = broker.admin()
    config = {
        "client_id": "broker-web",
        "authorize_url": f"{provider.issuer}/auth",
        "token_url": f"{provider.issuer}/token",
        "revocation_url": f"{provider.issuer}/token/revocation",
        "issuer": provider.issuer,
        "resource": [API],
        "authorize_params": {"prompt": "consent"},  # a refresh token for offline_access
    }
    draft = pb.ConnectionDraft(
        name="idp", type="oauth2", provider="custom", config=struct(config),
        secrets={"client_secret": provider.web_secret},
    )  # fmt: skip
    begun = await admin.BeginAuthorization(
        pb.BeginAuthorizationRequest(
            draft=draft, redirect_uri=REDIRECT_URI, scopes=["openid", "offline_access", "api:read"]
        )
    )
    landed = await sign_in(begun.authorization_url)
    assert landed["state"] == begun.state and landed["iss"] == provider.issuer
    created = await admin.CompleteAuthorization(
        pb.CompleteAuthorizationRequest(state=landed["state"], code=landed["code"], iss=landed["iss"])
    )
    assert sorted(created.secret_fields) == ["access_token", "client_secret", "refresh_token"]
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))

    first = await resolve_token(broker, created.id)
    seen = await provider.introspect(first)
    assert seen["active"] and seen["aud"] == API and seen["client_id"] == "broker-web"

    await asyncio.sleep(TOKEN_TTL / 2 + 0.5)  # past half its life: the next Resolve refreshes it
    second = await resolve_token(broker, created.id)
    assert second != first
    seen = await provider.introspect(second)
    assert seen["active"] and seen["aud"] == API  # the refresh asked for the same resource

    await admin.RevokeConnection(pb.RevokeConnectionRequest(id=created.id))
    upstream = pb.ListAuditEventsRequest(action="connection.upstream_revocation")
    for _ in range(100):
        if (await admin.ListAuditEvents(upstream)).events:
            break
        await asyncio.sleep(0.1)
    (event,) = (await admin.ListAuditEvents(upstream)).events
    assert (event.outcome, event.details["upstream_revocation"]) == ("succeeded", "revoked")
    # Revoking the refresh token ended the grant at the provider: its access token with it.
    assert not (await provider.introspect(second))["active"]


async def test_client_credentials_are_tested_and_tokens_carry_the_resource(
    broker: Running, provider: Provider
) -> None:
    admin = broker.admin()
    config = {
        "client_id": "broker-machine",
        "token_url": f"{provider.issuer}/token",
        "grant_type": "client_credentials",
        "scopes": ["api:read"],
        "resource": [API],
    }
    created = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="machine", type="oauth2", provider="custom", config=struct(config),
            secrets={"client_secret": provider.machine_secret}, test_before_save=True,
        )
    )  # fmt: skip
    assert created.last_test.success, created.last_test
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    token = await resolve_token(broker, created.id)
    seen = await provider.introspect(token)
    assert seen["active"] and seen["aud"] == API and seen["client_id"] == "broker-machine"
    assert seen["scope"] == "api:read"

    wrong = pb.ConnectionDraft(
        type="oauth2", provider="custom", config=struct(config), secrets={"client_secret": "not-it"}
    )
    refused = await admin.TestConnection(pb.TestConnectionRequest(draft=wrong))
    assert not refused.success and refused.category == pb.TEST_CATEGORY_AUTH_FAILED
    assert "invalid_client" in refused.message
