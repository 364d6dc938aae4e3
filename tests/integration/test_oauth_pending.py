"""What a pending authorization remembers, and what a hostile provider or configuration cannot make it
do: a connection changed between BeginAuthorization and CompleteAuthorization, shortened echoes of
secrets, granted scopes that quote a secret, an authorization endpoint carrying flow parameters."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from broker import oauth
from broker._proto import broker_pb2 as pb
from broker.egress import EgressPolicy, EgressSettings
from tests import oauthserver
from tests.conftest import Running
from tests.helpers import EXECUTOR, ShiftedClock, field_violations, rpc_error, struct
from tests.httpservers import Answer, serve
from tests.integration import test_oauth_flow as flow
from tests.integration.test_oauth_flow import REDIRECT, authorize, follow_authorization

# The OAuth2 flow tests' fixtures: a broker that may reach loopback on a shifted clock, the test server.
start, clock, server, broker = flow.start, flow.clock, flow.server, flow.broker

MCP = "https://mcp.example.com/mcp"
API = "https://api.example.com/v2"


async def begin_again(running: Running, connection_id: str) -> tuple[str, str]:
    """Re-authorize a connection up to the redirect: (code, state)."""
    begin = pb.BeginAuthorizationRequest(connection_id=connection_id, redirect_uri=REDIRECT)
    return await signed_in(running, begin)


async def begin_new(running: Running, server: oauthserver.OAuthTestServer) -> tuple[str, str]:
    """Authorize a new connection (the test server's draft) up to the redirect: (code, state)."""
    return await signed_in(
        running, pb.BeginAuthorizationRequest(draft=flow.draft(server), redirect_uri=REDIRECT)
    )


async def signed_in(running: Running, begin: pb.BeginAuthorizationRequest) -> tuple[str, str]:
    begun = await running.admin().BeginAuthorization(begin)
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
    (refresh_token,), access_token = server.refresh_tokens, released.secrets["access_token"]
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


SECRET = "cs-Hostile-9q8w7e6r5t4y"


async def hostile_machine(running: Running, url: str) -> pb.Connection:
    """A client_credentials connection whose token endpoint is `url` (a hostile server)."""
    created = await running.admin().CreateConnection(
        pb.CreateConnectionRequest(
            name="machine",
            type="oauth2",
            provider="custom",
            config=struct({"client_id": "c1", "token_url": url, "grant_type": "client_credentials"}),
            secrets={"client_secret": SECRET},
        )
    )
    await running.admin().GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    return created


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (
            Answer(200, b"{not json", {"Content-Type": "application/json"}),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            Answer(200, b"<html>sign in</html>", {"Content-Type": "text/html"}),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (Answer.json({"token_type": "Bearer"}), grpc.StatusCode.FAILED_PRECONDITION),
        (Answer.json({"access_token": 12345}), grpc.StatusCode.FAILED_PRECONDITION),
        (Answer.json(["at-1"]), grpc.StatusCode.FAILED_PRECONDITION),
        (Answer(200, b"x" * 3_000_000, {"Content-Type": "text/plain"}), grpc.StatusCode.FAILED_PRECONDITION),
        (Answer(500, b"<html>oops</html>", {"Content-Type": "text/html"}), grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_a_token_endpoint_answering_nonsense_gets_a_deliberate_error_and_changes_nothing(
    broker: Running, answer: Answer, status: grpc.StatusCode
) -> None:
    with serve(lambda seen: answer) as hostile:
        created = await hostile_machine(broker, hostile.url + "/token")
        refused = await rpc_error(flow.resolve(broker, created.id))
    assert refused.code() == status, refused.details()
    got = await broker.admin().GetConnection(pb.GetConnectionRequest(id=created.id))
    assert "access_token" not in got.secret_fields and "expires_at" not in got.config
    assert SECRET not in refused.details() + broker.logs.getvalue()


@pytest.mark.parametrize(
    ("expires_in", "lives"),
    [
        (-30, timedelta(hours=1)),
        (0, timedelta(hours=1)),
        ("600", timedelta(seconds=600)),
        (600.5, timedelta(seconds=600.5)),
        ("soon", timedelta(hours=1)),
        (10**30, timedelta(days=365)),
        (float("1e308"), timedelta(days=365)),
    ],
)
async def test_odd_expires_in_values_never_leave_the_expiry_unknown_or_absurd(
    broker: Running, expires_in: Any, lives: timedelta
) -> None:
    document = {"access_token": "at-odd-1", "token_type": "Bearer", "expires_in": expires_in}
    with serve(lambda seen: Answer.json(document)) as hostile:
        created = await hostile_machine(broker, hostile.url + "/token")
        released = await flow.resolve(broker, created.id)
    assert released.secrets["access_token"] == "at-odd-1"
    got = await broker.admin().GetConnection(pb.GetConnectionRequest(id=created.id))
    issued = datetime.fromisoformat(got.config["issued_at"])
    expires = datetime.fromisoformat(got.config["expires_at"])
    assert abs((expires - issued) - lives) <= timedelta(seconds=1)


async def test_granted_scopes_that_quote_a_secret_or_flood_the_config_are_not_stored(broker: Running) -> None:
    """The token answer's `scope` becomes `granted_scopes`, plain config every admin reads: a provider
    quoting the client secret (or the token it issues) there must not put it in the config, and a
    flood of scopes must not fill it."""
    scopes = ["read", SECRET, f"x{SECRET[3:12]}", "at-Z9x8c7v6b5n4m3", "write"] + [
        f"s{n}" for n in range(500)
    ]
    document = {"access_token": "at-Z9x8c7v6b5n4m3", "token_type": "Bearer", "scope": " ".join(scopes)}
    with serve(lambda seen: Answer.json(document)) as hostile:
        created = await hostile_machine(broker, hostile.url + "/token")
        await flow.resolve(broker, created.id)
    got = await broker.admin().GetConnection(pb.GetConnectionRequest(id=created.id))
    granted = list(got.config["granted_scopes"])
    assert granted[:2] == ["read", "write"] and len(granted) <= 100
    shown = str(got)
    for piece in pieces(SECRET) + pieces("at-Z9x8c7v6b5n4m3"):
        assert piece not in shown, piece


@pytest.mark.parametrize("name", ["redirect_uri", "client_id", "state", "Scope", "response_type", "resource"])
async def test_an_authorization_endpoint_carrying_the_flows_own_parameters_is_refused(
    broker: Running, server: oauthserver.OAuthTestServer, name: str
) -> None:
    """The flow sets redirect_uri, client_id, state, scope...: a second copy in the endpoint's own query
    (which many servers read first) would send the user, and the code, where the URL says."""
    url = f"{server.authorize_url}?tenant=t1&{name}=https%3A%2F%2Fevil.example%2Fcb"
    begin = pb.BeginAuthorizationRequest(draft=flow.draft(server, authorize_url=url), redirect_uri=REDIRECT)
    refused = await rpc_error(broker.admin().BeginAuthorization(begin))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.authorize_url" in field_violations(refused) and name in refused.details()
    assert not server.authorize_requests
    # The endpoint's own parameters are kept.
    plain = pb.BeginAuthorizationRequest(
        draft=flow.draft(server, authorize_url=f"{server.authorize_url}?tenant=t1"), redirect_uri=REDIRECT
    )
    begun = await broker.admin().BeginAuthorization(plain)
    assert "tenant=t1" in begun.authorization_url


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "https://app.example/" + "x" * 3_000_000,
        "https://app.example/cb\r\nSet-Cookie: a=b",
        "https://app .example/cb",
        "https://app.example/c b",
        "https://app.example/\x00cb",
    ],
)
async def test_a_malformed_or_oversized_redirect_uri_is_refused_and_nothing_is_kept(
    broker: Running, server: oauthserver.OAuthTestServer, redirect_uri: str
) -> None:
    begin = pb.BeginAuthorizationRequest(draft=flow.draft(server), redirect_uri=redirect_uri)
    refused = await rpc_error(broker.admin().BeginAuthorization(begin))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "redirect_uri" in field_violations(refused) and len(refused.details()) < 200
    with contextlib.closing(sqlite3.connect(broker.broker.settings.storage_path)) as db:
        assert db.execute("SELECT count(*) FROM oauth_states").fetchone() == (0,)


async def test_an_oversized_code_is_refused_before_the_state_is_used(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    admin = broker.admin()
    code, state = await begin_new(broker, server)
    refused = await rpc_error(
        admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code="c" * 3_000_000))
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "code" in field_violations(refused)
    assert server.token_requests["authorization_code"] == 0
    # The flow is still there: the real code completes it.
    done = await admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    assert done.status == pb.CONNECTION_STATUS_ACTIVE


async def test_concurrent_completes_with_one_state_exchange_the_code_once(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    admin = broker.admin()
    code, state = await begin_new(broker, server)
    complete = pb.CompleteAuthorizationRequest(state=state, code=code)
    results = await asyncio.gather(
        *(admin.CompleteAuthorization(complete) for _ in range(8)), return_exceptions=True
    )
    done = [r for r in results if isinstance(r, pb.Connection)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(done) == 1 and len(refused) == 7
    assert {r.code() for r in refused} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert server.token_requests["authorization_code"] == 1
    assert len((await admin.ListConnections(pb.ListConnectionsRequest())).connections) == 1


@pytest.mark.parametrize("shorten", [lambda s: f"{s[:4]}...{s[-4:]}", lambda s: s[2:9], lambda s: s[-6:]])
async def test_an_error_code_quoting_a_secret_shortened_is_not_repeated(shorten: Any) -> None:
    """The error code goes into messages, audit records and logs: a "code" made of a piece of the
    refresh token or the client secret is no code. Known codes are kept whatever the secrets hold."""
    refresh_token = "rt-Q7w8E9r0T1y2U3i4"
    for secret in (refresh_token, SECRET):

        def answer(seen: Any, secret: str = secret) -> Answer:
            return Answer.json({"error": shorten(secret)}, status=400)

        with serve(answer) as hostile:
            provider = oauth.provider_for("custom", {"token_url": hostile.url + "/token"})
            with pytest.raises(oauth.OAuthError) as caught:
                await oauth.refresh(
                    EgressPolicy(EgressSettings(allow_loopback=True)),
                    provider,
                    oauth.ClientCredentials("c1", SECRET),
                    refresh_token,
                    now=datetime.now(UTC),
                    default_lifetime=timedelta(hours=1),
                )
        error = caught.value
        assert error.error is None and (error.kind, error.status) == ("invalid_grant", 400)
        for piece in pieces(secret):
            assert piece not in str(error) + repr(error), piece


async def test_a_draft_whose_name_is_taken_is_refused_before_its_code_buys_tokens(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    """Two flows begun for one new name: the second used to exchange its code, get tokens, then fail
    to create the connection, leaving a live grant at the provider that nobody holds or can revoke."""
    admin = broker.admin()
    begin = pb.BeginAuthorizationRequest(draft=flow.draft(server), redirect_uri=REDIRECT)
    first, second = await admin.BeginAuthorization(begin), await admin.BeginAuthorization(begin)
    for begun in (first, second):
        code, state = await asyncio.to_thread(follow_authorization, begun.authorization_url)
        complete = admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
        if begun is first:
            await complete
            continue
        refused = await rpc_error(complete)
        assert refused.code() == grpc.StatusCode.ALREADY_EXISTS and "calendar" in refused.details()
    assert server.token_requests["authorization_code"] == 1
    assert len(server.valid_access_tokens()) == 1
    # Once the name is taken, a new flow for it is refused at once.
    again = await rpc_error(admin.BeginAuthorization(begin))
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(server.authorize_requests) == 2


async def test_tokens_for_a_connection_that_could_not_be_created_are_revoked(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    """The name is taken while the code is being exchanged (checked before, it was free): the tokens
    the provider just issued belong to no connection, so they are given back, not left live."""
    admin = broker.admin()
    code, state = await begin_new(broker, server)
    exchanging, go_on = threading.Event(), threading.Event()

    async def hold(grant: str) -> None:
        exchanging.set()
        await asyncio.to_thread(go_on.wait, 10)

    server.before_reply = hold
    complete = asyncio.ensure_future(
        admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    )
    await asyncio.to_thread(exchanging.wait, 10)
    await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="calendar", type="http", config=struct({"base_url": "https://a.example"})
        )
    )
    go_on.set()
    refused = await rpc_error(complete)
    assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
    assert server.valid_access_tokens() == set() and not server.refresh_tokens
    assert len(server.revoked) == 2
