"""`broker.oauth` against a real OAuth2 authorization server on loopback (`tests/oauthserver.py`)."""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest

from broker import oauth
from broker.egress import Blocked, EgressPolicy, EgressSettings
from tests.helpers import free_port
from tests.httpservers import Answer, Seen, serve
from tests.oauthserver import OAuthTestServer, running, s256

pytestmark = pytest.mark.integration

LOOPBACK = EgressPolicy(EgressSettings(allow_loopback=True))
DEFAULT_LIFETIME = timedelta(minutes=42)
REDIRECT = "http://127.0.0.1:9/callback"


@pytest.fixture
def server() -> Iterator[OAuthTestServer]:
    with running() as srv:
        yield srv


def provider(srv: OAuthTestServer, **config: object) -> oauth.OAuthProvider:
    return oauth.provider_for(
        "custom",
        {
            "authorize_url": srv.authorize_url,
            "token_url": srv.token_url,
            "revocation_url": srv.revocation_url,
            "verify_url": srv.userinfo_url,
            "token_auth_method": srv.client_auth,
            **config,
        },
    )


def client(srv: OAuthTestServer) -> oauth.ClientCredentials:
    return oauth.ClientCredentials(srv.client_id, srv.client_secret)


async def authorize(
    srv: OAuthTestServer, scopes: tuple[str, ...] = ("read", "write"), redirect_uri: str = REDIRECT
) -> tuple[str, str, str]:
    """Run the front channel as a browser would (auto-approved): (code, verifier, state)."""
    state = oauth.new_state()
    verifier, challenge = oauth.new_pkce()
    url = oauth.authorization_url(provider(srv), srv.client_id, redirect_uri, scopes, state, challenge)
    async with httpx.AsyncClient() as browser:
        answer = await browser.get(url)
    assert answer.status_code == 302, answer.text
    location = answer.headers["location"]
    assert location.startswith(redirect_uri + "?")
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == [state]
    return query["code"][0], verifier, state


async def exchange(srv: OAuthTestServer, code: str, verifier: str) -> oauth.TokenSet:
    return await oauth.exchange_code(
        LOOPBACK,
        provider(srv),
        client(srv),
        code,
        REDIRECT,
        verifier,
        now=datetime.now(UTC),
        default_lifetime=DEFAULT_LIFETIME,
    )


async def userinfo(srv: OAuthTestServer, token: str) -> int:
    async with httpx.AsyncClient() as http:
        return (await http.get(srv.userinfo_url, headers={"Authorization": f"Bearer {token}"})).status_code


async def do_refresh(srv: OAuthTestServer, refresh_token: str) -> oauth.TokenSet:
    return await oauth.refresh(
        LOOPBACK,
        provider(srv),
        client(srv),
        refresh_token,
        now=datetime.now(UTC),
        default_lifetime=DEFAULT_LIFETIME,
    )


# ------------------------------------------------------------------ authorization code + PKCE


async def test_authorization_code_round_trip(server: OAuthTestServer) -> None:
    code, verifier, _ = await authorize(server)
    sent = server.authorize_requests[-1]
    assert sent["code_challenge_method"] == "S256"
    assert sent["code_challenge"] == s256(verifier)
    assert sent["scope"] == "read write"
    before = datetime.now(UTC)
    tokens = await exchange(server, code, verifier)
    assert tokens.refresh_token and tokens.access_token in server.valid_access_tokens()
    assert tokens.scopes == ("read", "write")
    assert tokens.token_type == "Bearer"
    assert tokens.expiry_source == "expires_in"
    assert (
        before + timedelta(seconds=3600) <= tokens.expires_at <= datetime.now(UTC) + timedelta(seconds=3600)
    )
    assert server.token_forms[-1]["code_verifier"] == verifier
    assert server.client_auth_seen == ["basic"]
    assert await userinfo(server, tokens.access_token) == 200
    assert server.token_requests == {"authorization_code": 1}


async def test_a_token_of_a_type_other_than_bearer_is_refused_not_stored(server: OAuthTestServer) -> None:
    """The broker sends tokens as `Authorization: Bearer`; a DPoP- or MAC-bound token used that way
    fails at every call (RFC 6749, 7.1: a client must not use a token type it does not understand)."""
    server.token_type = "DPoP"
    code, verifier, _ = await authorize(server)
    with pytest.raises(oauth.OAuthError) as caught:
        await exchange(server, code, verifier)
    assert caught.value.kind == "invalid_config"
    assert str(caught.value) == (
        "the token endpoint issued a token of type 'DPoP'; the broker can use only Bearer tokens"
    )
    server.token_type = "bearer"  # any case
    code, verifier, _ = await authorize(server)
    assert (await exchange(server, code, verifier)).token_type == "bearer"


async def test_wrong_verifier_is_refused(server: OAuthTestServer) -> None:
    code, _, _ = await authorize(server)
    other, _ = oauth.new_pkce()
    with pytest.raises(oauth.OAuthError) as caught:
        await exchange(server, code, other)
    assert (caught.value.kind, caught.value.error, caught.value.status) == (
        "invalid_grant",
        "invalid_grant",
        400,
    )


async def test_code_is_single_use(server: OAuthTestServer) -> None:
    code, verifier, _ = await authorize(server)
    await exchange(server, code, verifier)
    with pytest.raises(oauth.OAuthError) as caught:
        await exchange(server, code, verifier)
    assert caught.value.kind == "invalid_grant"


async def test_server_requires_pkce() -> None:
    with running(require_pkce=True) as srv:
        url = oauth.authorization_url(provider(srv), srv.client_id, REDIRECT, (), "s" * 43, "c" * 43)
        without = url.replace("code_challenge=", "x=").replace("code_challenge_method=", "y=")
        async with httpx.AsyncClient() as browser:
            answer = await browser.get(without)
        assert parse_qs(urlsplit(answer.headers["location"]).query)["error"] == ["invalid_request"]


# ------------------------------------------------------------------ refresh


async def test_refresh_rotates_and_the_old_refresh_token_is_refused(server: OAuthTestServer) -> None:
    code, verifier, _ = await authorize(server)
    first = await exchange(server, code, verifier)
    assert first.refresh_token is not None
    second = await do_refresh(server, first.refresh_token)
    assert second.refresh_token not in (None, first.refresh_token)
    assert second.access_token != first.access_token
    assert second.scopes == ("read", "write")
    with pytest.raises(oauth.OAuthError) as caught:
        await do_refresh(server, first.refresh_token)
    assert caught.value.kind == "invalid_grant"
    assert second.refresh_token is not None
    third = await do_refresh(server, second.refresh_token)
    assert third.access_token in server.valid_access_tokens()
    assert server.token_requests["refresh_token"] == 3


async def test_refresh_keeps_the_refresh_token_when_none_is_returned() -> None:
    with running(rotate_refresh_tokens=False) as srv:
        code, verifier, _ = await authorize(srv)
        first = await exchange(srv, code, verifier)
        assert first.refresh_token is not None
        again = await do_refresh(srv, first.refresh_token)
        assert again.refresh_token == first.refresh_token
        assert again.access_token != first.access_token


async def test_missing_expires_in_with_a_jwt_uses_its_exp() -> None:
    with running(send_expires_in=False, jwt_tokens=True, expires_in=900) as srv:
        code, verifier, _ = await authorize(srv)
        tokens = await exchange(srv, code, verifier)
        payload = tokens.access_token.split(".")[1]
        exp = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
        assert tokens.expiry_source == "jwt"
        assert tokens.expires_at == datetime.fromtimestamp(exp, UTC)


async def test_missing_expires_in_without_a_jwt_uses_the_default_lifetime() -> None:
    with running(send_expires_in=False) as srv:
        code, verifier, _ = await authorize(srv)
        now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
        tokens = await oauth.exchange_code(
            LOOPBACK,
            provider(srv),
            client(srv),
            code,
            REDIRECT,
            verifier,
            now=now,
            default_lifetime=DEFAULT_LIFETIME,
        )
        assert (tokens.expires_at, tokens.expiry_source) == (now + DEFAULT_LIFETIME, "default")


async def test_invalid_grant_is_classified(server: OAuthTestServer) -> None:
    code, verifier, _ = await authorize(server)
    tokens = await exchange(server, code, verifier)
    assert tokens.refresh_token is not None
    server.invalid_grant_next()
    with pytest.raises(oauth.OAuthError) as caught:
        await do_refresh(server, tokens.refresh_token)
    assert (caught.value.kind, caught.value.error, caught.value.status) == (
        "invalid_grant",
        "invalid_grant",
        400,
    )


async def test_the_providers_description_is_kept_scrubbed_of_what_the_request_carried(
    server: OAuthTestServer,
) -> None:
    """A provider may quote what it refused: the refresh token, the client's Basic credentials. The
    description keeps none of them in any form, on one line, cut short; the message never has it."""
    code, verifier, _ = await authorize(server)
    tokens = await exchange(server, code, verifier)
    assert tokens.refresh_token is not None
    basic = base64.b64encode(f"{server.client_id}:{server.client_secret}".encode()).decode()
    server.error_next(
        "invalid_grant",
        description=f"token\t{tokens.refresh_token} refused\nfor Basic {basic} ({server.client_secret}) "
        + "x" * 300,
    )
    with pytest.raises(oauth.OAuthError) as caught:
        await do_refresh(server, tokens.refresh_token)
    described = caught.value.description
    assert described.startswith("token [redacted] refused for Basic [redacted] ([redacted]) xxx")
    assert len(described) <= 200
    for secret in (tokens.refresh_token, basic, server.client_secret):
        assert secret not in described
    assert "refused" not in str(caught.value) + repr(caught.value)


async def test_a_secret_cut_in_two_at_the_end_of_the_description_is_masked_from_its_start(
    server: OAuthTestServer,
) -> None:
    code, verifier, _ = await authorize(server)
    tokens = await exchange(server, code, verifier)
    assert tokens.refresh_token is not None
    server.error_next("invalid_grant", description="y" * 190 + tokens.refresh_token)
    with pytest.raises(oauth.OAuthError) as caught:
        await do_refresh(server, tokens.refresh_token)
    assert caught.value.description == "y" * 190 + "[redacted]"


async def test_resource_indicators_go_on_every_token_request() -> None:
    resources = ("https://mcp.example.com/mcp", "urn:example:api")
    with running(resources=resources) as srv:
        with_resources = provider(srv, resource=list(resources))
        state = oauth.new_state()
        verifier, challenge = oauth.new_pkce()
        url = oauth.authorization_url(with_resources, srv.client_id, REDIRECT, (), state, challenge)
        async with httpx.AsyncClient() as browser:
            location = (await browser.get(url)).headers["location"]
        code = parse_qs(urlsplit(location).query)["code"][0]
        now = datetime.now(UTC)
        args = (LOOPBACK, with_resources, client(srv))
        first = await oauth.exchange_code(
            *args, code, REDIRECT, verifier, now=now, default_lifetime=DEFAULT_LIFETIME
        )
        assert first.refresh_token is not None
        await oauth.refresh(*args, first.refresh_token, now=now, default_lifetime=DEFAULT_LIFETIME)
        await oauth.client_credentials_token(*args, (), now=now, default_lifetime=DEFAULT_LIFETIME)
        assert srv.resources_seen == [
            (kind, resources)
            for kind in ("authorize", "authorization_code", "refresh_token", "client_credentials")
        ]
        # A resource the server does not serve: invalid_target (RFC 8707), the client's configuration.
        elsewhere = provider(srv, resource=["https://elsewhere.example.com"])
        with pytest.raises(oauth.OAuthError) as caught:
            await oauth.client_credentials_token(
                LOOPBACK, elsewhere, client(srv), (), now=now, default_lifetime=DEFAULT_LIFETIME
            )
        assert (caught.value.kind, caught.value.error) == ("invalid_config", "invalid_target")


@pytest.mark.parametrize(("status", "retry_after", "expected"), [(503, "7", 7.0), (429, "120", 120.0)])
async def test_busy_token_endpoint_is_transient_with_retry_after(
    server: OAuthTestServer, status: int, retry_after: str, expected: float
) -> None:
    code, verifier, _ = await authorize(server)
    tokens = await exchange(server, code, verifier)
    assert tokens.refresh_token is not None
    server.fail_next(1, status=status, retry_after=retry_after)
    with pytest.raises(oauth.OAuthError) as caught:
        await do_refresh(server, tokens.refresh_token)
    error = caught.value
    assert (error.kind, error.status, error.retry_after) == ("transient", status, expected)
    assert error.error == "temporarily_unavailable"
    # The fault consumed nothing: the same refresh token still works.
    assert (await do_refresh(server, tokens.refresh_token)).access_token
    assert server.token_requests["refresh_token"] == 2


async def test_timeout_is_transient() -> None:
    slow = EgressPolicy(EgressSettings(allow_loopback=True, total_timeout=0.3, connect_timeout=0.3))
    with running() as srv:
        srv.delay = 1.0
        with pytest.raises(oauth.OAuthError) as caught:
            await oauth.client_credentials_token(
                slow, provider(srv), client(srv), (), now=datetime.now(UTC), default_lifetime=DEFAULT_LIFETIME
            )
        assert (caught.value.kind, caught.value.status) == ("transient", None)


async def test_connection_refused_is_transient() -> None:
    nowhere = oauth.provider_for("custom", {"token_url": f"http://127.0.0.1:{free_port()}/token"})
    with pytest.raises(oauth.OAuthError) as caught:
        await oauth.refresh(
            LOOPBACK,
            nowhere,
            oauth.ClientCredentials("c", "s"),
            "rt",
            now=datetime.now(UTC),
            default_lifetime=DEFAULT_LIFETIME,
        )
    assert caught.value.kind == "transient"


@pytest.mark.parametrize(
    "headers", [{"Content-Encoding": "br"}, {"Content-Encoding": "gzip"}, {"Content-Encoding": "gzip, gzip"}]
)
async def test_an_answer_in_a_coding_the_broker_does_not_read_is_a_config_error(
    headers: dict[str, str],
) -> None:
    """Before: `UnreadableBody` escaped as it was, and the caller got INTERNAL (and an upstream
    revocation no audit event)."""

    def unreadable(seen: Seen) -> Answer:
        return Answer(200, b"\x8b\x00 not what it says", {"Content-Type": "application/json", **headers})

    with serve(unreadable) as upstream:
        endpoints = {"token_url": f"{upstream.url}/token", "revocation_url": f"{upstream.url}/revoke"}
        unread = oauth.provider_for("custom", endpoints)
        secrets = oauth.ClientCredentials("c", "s")
        now, lifetime = datetime.now(UTC), DEFAULT_LIFETIME
        calls = [
            oauth.refresh(LOOPBACK, unread, secrets, "rt", now=now, default_lifetime=lifetime),
            oauth.client_credentials_token(LOOPBACK, unread, secrets, (), now=now, default_lifetime=lifetime),
            oauth.revoke(LOOPBACK, unread, secrets, "rt", "refresh_token"),
        ]
        for call in calls:
            with pytest.raises(oauth.OAuthError) as caught:
                await call
            assert caught.value.kind == "invalid_config"
            assert "content coding the broker does not decode" in str(caught.value)


async def test_before_reply_sees_each_token_request(server: OAuthTestServer) -> None:
    seen: list[str] = []

    async def observe(grant: str) -> None:
        seen.append(grant)

    server.before_reply = observe
    await oauth.client_credentials_token(
        LOOPBACK,
        provider(server),
        client(server),
        (),
        now=datetime.now(UTC),
        default_lifetime=DEFAULT_LIFETIME,
    )
    assert seen == ["client_credentials"]


# ------------------------------------------------------------------ client credentials, client auth


async def test_a_secret_http_basic_cannot_carry_is_a_clear_config_error(server: OAuthTestServer) -> None:
    secret = "sécret-€-7c1d"  # the euro sign is not Latin-1
    with pytest.raises(oauth.OAuthError) as caught:
        await oauth.client_credentials_token(
            LOOPBACK,
            provider(server),
            oauth.ClientCredentials(server.client_id, secret),
            (),
            now=datetime.now(UTC),
            default_lifetime=DEFAULT_LIFETIME,
        )
    assert caught.value.kind == "invalid_config" and "client_secret_post" in str(caught.value)
    assert secret not in str(caught.value) and server.token_requests == {}


async def test_client_credentials(server: OAuthTestServer) -> None:
    tokens = await oauth.client_credentials_token(
        LOOPBACK,
        provider(server),
        client(server),
        ["reports:read", "reports:write"],
        now=datetime.now(UTC),
        default_lifetime=DEFAULT_LIFETIME,
    )
    assert tokens.refresh_token is None
    assert tokens.scopes == ("reports:read", "reports:write")
    assert server.token_forms[-1]["scope"] == "reports:read reports:write"
    assert tokens.access_token in server.valid_access_tokens()
    assert server.token_requests == {"client_credentials": 1}


async def test_client_secret_post() -> None:
    with running(client_auth="client_secret_post") as srv:
        code, verifier, _ = await authorize(srv)
        assert (await exchange(srv, code, verifier)).access_token
        assert srv.client_auth_seen == ["post"]
        assert srv.token_forms[-1]["client_id"] == srv.client_id


async def test_public_client_sends_no_secret() -> None:
    with running(client_auth="none") as srv:
        code, verifier, _ = await authorize(srv)
        tokens = await oauth.exchange_code(
            LOOPBACK,
            provider(srv, token_auth_method="client_secret_basic"),
            oauth.ClientCredentials(srv.client_id, ""),
            code,
            REDIRECT,
            verifier,
            now=datetime.now(UTC),
            default_lifetime=DEFAULT_LIFETIME,
        )
        assert tokens.access_token
        assert srv.client_auth_seen == ["none"]


async def test_wrong_client_authentication_is_invalid_config() -> None:
    with running(client_auth="client_secret_post") as srv:
        with pytest.raises(oauth.OAuthError) as caught:
            await oauth.client_credentials_token(
                LOOPBACK,
                provider(srv, token_auth_method="client_secret_basic"),
                client(srv),
                (),
                now=datetime.now(UTC),
                default_lifetime=DEFAULT_LIFETIME,
            )
        assert (caught.value.kind, caught.value.error, caught.value.status) == (
            "invalid_config",
            "invalid_client",
            401,
        )


# ------------------------------------------------------------------ revocation


async def test_revocation(server: OAuthTestServer) -> None:
    code, verifier, _ = await authorize(server)
    tokens = await exchange(server, code, verifier)
    assert tokens.refresh_token is not None
    assert await userinfo(server, tokens.access_token) == 200
    await oauth.revoke(LOOPBACK, provider(server), client(server), tokens.access_token, "access_token")
    assert await userinfo(server, tokens.access_token) == 401
    await oauth.revoke(LOOPBACK, provider(server), client(server), tokens.refresh_token, "refresh_token")
    assert server.revoked == [tokens.access_token, tokens.refresh_token]
    assert server.token_forms == [server.token_forms[0]]  # revocation never touched /token
    with pytest.raises(oauth.OAuthError) as caught:
        await do_refresh(server, tokens.refresh_token)
    assert caught.value.kind == "invalid_grant"


async def test_revocation_without_an_endpoint_is_invalid_config() -> None:
    github = oauth.provider_for("github", {"client_id": "c"})
    with pytest.raises(oauth.OAuthError, match="no RFC 7009 revocation endpoint") as caught:
        await oauth.revoke(LOOPBACK, github, oauth.ClientCredentials("c", "s"), "token", None)
    assert caught.value.kind == "invalid_config"


# ------------------------------------------------------------------ egress policy


async def test_blocked_token_url_sends_nothing(server: OAuthTestServer) -> None:
    strict = EgressPolicy(EgressSettings(allow_loopback=False))
    code, verifier, _ = await authorize(server)
    with pytest.raises(Blocked):
        await oauth.exchange_code(
            strict,
            provider(server),
            client(server),
            code,
            REDIRECT,
            verifier,
            now=datetime.now(UTC),
            default_lifetime=DEFAULT_LIFETIME,
        )
    with pytest.raises(Blocked):
        await oauth.revoke(strict, provider(server), client(server), "token", None)
    assert sum(server.token_requests.values()) == 0
    assert server.revocation_requests == 0


# ------------------------------------------------------------------ no secret anywhere


async def test_no_secret_in_errors_or_reprs(server: OAuthTestServer) -> None:
    code, verifier, _ = await authorize(server)
    tokens = await exchange(server, code, verifier)
    assert tokens.refresh_token is not None
    failures: list[BaseException] = []

    async def collect(call: Awaitable[object]) -> None:
        try:
            await call
        except (oauth.OAuthError, Blocked) as exc:
            failures.append(exc)

    await collect(exchange(server, code, verifier))  # reused code
    code2, verifier2, _ = await authorize(server)
    await collect(exchange(server, code2, verifier + "x"))  # wrong verifier
    server.fail_next(1, status=503, retry_after="1")
    await collect(do_refresh(server, tokens.refresh_token))
    server.invalid_grant_next()
    await collect(do_refresh(server, tokens.refresh_token))
    wrong = oauth.ClientCredentials(server.client_id, server.client_secret + "-wrong")
    await collect(
        oauth.refresh(
            LOOPBACK,
            provider(server),
            wrong,
            tokens.refresh_token,
            now=datetime.now(UTC),
            default_lifetime=DEFAULT_LIFETIME,
        )
    )
    strict = EgressPolicy(EgressSettings(allow_loopback=False))
    await collect(
        oauth.refresh(
            strict,
            provider(server),
            client(server),
            tokens.refresh_token,
            now=datetime.now(UTC),
            default_lifetime=DEFAULT_LIFETIME,
        )
    )
    assert len(failures) == 6
    secrets = [
        server.client_secret,
        tokens.access_token,
        tokens.refresh_token,
        code,
        code2,
        verifier,
        verifier2,
    ]
    shown = [text for exc in failures for text in (str(exc), repr(exc), repr(exc.args))]
    shown += [repr(tokens), str(tokens), repr(client(server)), repr(wrong)]
    for text in shown:
        for secret in secrets:
            assert secret not in text, text
    for value in (tokens, client(server)):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(value)


@pytest.mark.parametrize(
    ("echoed", "auth_method"),
    [
        ("refresh_token", "client_secret_basic"),
        ("client_secret", "client_secret_post"),
        ("client_secret", "client_secret_basic"),
        ("code", "client_secret_basic"),
        ("code_verifier", "client_secret_basic"),
    ],
)
async def test_an_error_code_that_echoes_a_secret_sent_is_not_repeated(echoed: str, auth_method: str) -> None:
    secret, refresh_token, code, verifier = "cs-7Hq2xN4p", "rt-90ab12cd34ef", "ac-55f0e1d2", "v" * 43

    def echo(seen: Seen) -> Answer:
        form = dict(parse_qsl(seen.body.decode()))
        if echoed == "client_secret" and auth_method == "client_secret_basic":
            value = base64.b64decode(seen.headers["authorization"].split()[1]).decode().partition(":")[2]
        else:
            value = form[echoed]
        return Answer.json({"error": value}, status=400)

    with serve(echo) as token_server:
        config = {"token_url": token_server.url + "/token", "token_auth_method": auth_method}
        with pytest.raises(oauth.OAuthError) as caught:
            credentials = oauth.ClientCredentials("client-1", secret)
            now = datetime.now(UTC)
            if echoed in ("code", "code_verifier"):
                await oauth.exchange_code(
                    LOOPBACK, oauth.provider_for("custom", config), credentials, code, REDIRECT, verifier,
                    now=now, default_lifetime=DEFAULT_LIFETIME,
                )  # fmt: skip
            else:
                await oauth.refresh(
                    LOOPBACK, oauth.provider_for("custom", config), credentials, refresh_token,
                    now=now, default_lifetime=DEFAULT_LIFETIME,
                )  # fmt: skip
    error = caught.value
    assert (error.kind, error.status, error.error) == ("invalid_grant", 400, None)
    assert str(error) == "the token endpoint answered HTTP 400"
    for value in (secret, refresh_token, code, verifier):
        assert value not in str(error) and value not in repr(error)
