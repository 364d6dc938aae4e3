"""The OAuth2 lifecycle through the broker, against a real authorization server on loopback."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx
import pytest

from broker import keydir, metrics
from broker._proto import broker_pb2 as pb
from broker.egress import EgressSettings
from broker.service.keys import rewrap_all
from tests import oauthserver
from tests.conftest import Running, spiffe
from tests.helpers import EXECUTOR, ShiftedClock, field_violations, rpc_error, struct
from tests.integration.test_proxy_api import proxy

REDIRECT = "http://127.0.0.1:8976/callback"


@pytest.fixture
def server() -> Iterator[oauthserver.OAuthTestServer]:
    with oauthserver.running() as s:
        yield s


SHORT_LIFE = 20  # seconds a short-lived token lives: shorter than the 30 s margin below


@pytest.fixture
def clock() -> ShiftedClock:
    return ShiftedClock()


def age_past_half_life(clock: ShiftedClock) -> None:
    """Make the brokers' short-lived tokens due: one living no longer than the refresh margin
    is refreshed once half its life is gone (not on every Resolve)."""
    clock.advance(SHORT_LIFE * 0.6)


@pytest.fixture
def start(make_broker: Callable[..., Any], clock: ShiftedClock) -> Callable[..., Any]:
    """A broker that may reach loopback (the authorization server), with a 30 s refresh margin."""

    async def go(**overrides: Any) -> Running:
        settings: dict[str, Any] = {
            "egress": EgressSettings(allow_loopback=True),
            "oauth_refresh_margin_seconds": 30.0,
            "oauth_refresh_interval_seconds": 3600.0,
        }
        running: Running = await make_broker(clock=clock, **{**settings, **overrides})
        return running

    return go


@pytest.fixture
async def broker(start: Callable[..., Any]) -> AsyncIterator[Running]:
    running: Running = await start()
    yield running
    await running.close()
    await running.broker.stop(grace=0)


def draft(server: oauthserver.OAuthTestServer, name: str = "calendar", **config: Any) -> pb.ConnectionDraft:
    values = {
        "client_id": server.client_id,
        "authorize_url": server.authorize_url,
        "token_url": server.token_url,
        "revocation_url": server.revocation_url,
        "verify_url": server.userinfo_url,
        **config,
    }
    return pb.ConnectionDraft(
        name=name, type="oauth2", provider="custom", config=struct(values),
        secrets={"client_secret": server.client_secret},
    )  # fmt: skip


def follow_authorization(url: str) -> tuple[str, str]:
    """What the user's browser does: sign in (auto-approved) and land on the redirect."""
    response = httpx.get(url, follow_redirects=False)
    assert response.status_code == 302, response.text
    query = parse_qs(urlsplit(response.headers["location"]).query)
    assert "error" not in query, query
    return query["code"][0], query["state"][0]


async def authorize(running: Running, server: oauthserver.OAuthTestServer, **config: Any) -> pb.Connection:
    admin = running.admin()
    begun = await admin.BeginAuthorization(
        pb.BeginAuthorizationRequest(
            draft=draft(server, **config), redirect_uri=REDIRECT, scopes=["calendar"]
        )
    )
    code, state = await asyncio.to_thread(follow_authorization, begun.authorization_url)
    assert state == begun.state
    created = await admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    return created


def expired_count() -> float:
    return metrics.REGISTRY.get_sample_value("broker_oauth_refreshes_total", {"outcome": "expired"}) or 0.0


async def machine_connection(
    running: Running, server: oauthserver.OAuthTestServer, **config: Any
) -> pb.Connection:
    """A client_credentials connection `machine` to the test server, with `config` added."""
    base = {"client_id": server.client_id, "token_url": server.token_url, "grant_type": "client_credentials"}
    return await running.admin().CreateConnection(
        pb.CreateConnectionRequest(
            name="machine",
            type="oauth2",
            provider="custom",
            config=struct({**base, **config}),
            secrets={"client_secret": server.client_secret},
        )
    )


async def resolve(running: Running, connection_id: str) -> pb.ResolveResponse:
    return await running.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))


async def test_authorization_code_with_pkce_creates_a_working_connection(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    created = await authorize(broker, server)
    assert created.type == "oauth2" and created.status == pb.CONNECTION_STATUS_ACTIVE
    assert sorted(created.secret_fields) == ["access_token", "client_secret", "refresh_token"]
    assert list(created.config["scopes"]) == ["calendar"] and created.config["expires_at"]
    # PKCE: the authorization request carried an S256 challenge, the token request its verifier.
    (asked,) = server.authorize_requests
    assert asked["code_challenge_method"] == "S256"
    (exchange,) = [f for f in server.token_forms if f.get("grant_type") == "authorization_code"]
    assert oauthserver.s256(exchange["code_verifier"]) == asked["code_challenge"]

    released = await resolve(broker, created.id)
    # The access token only: with the client secret and the refresh token an executor could mint
    # tokens for itself after its grant is gone, and spend the refresh token the broker relies on.
    assert list(released.secrets) == ["access_token"]
    assert released.secrets["access_token"] in server.valid_access_tokens()
    assert released.HasField("expires_at") and 0 < released.cache_ttl_seconds <= 60
    (refresh_token,) = server.refresh_tokens
    for withheld in (refresh_token, server.client_secret):
        assert withheld.encode() not in released.SerializeToString()
    (event,) = (
        await broker.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="connection.resolve"))
    ).events
    assert [key for key in event.details if key.startswith("fp.")] == ["fp.access_token"]
    test = await broker.admin().TestConnection(pb.TestConnectionRequest(id=created.id))
    assert test.success, test


async def test_an_openid_provider_issues_a_refresh_token_when_the_connection_asks_with_prompt_consent(
    broker: Running,
) -> None:
    """OpenID Connect Core 11, as certified providers (panva's oidc-provider) apply it: without
    prompt=consent, offline_access is dropped and no refresh token comes; `authorize_params` sends it."""
    admin = broker.admin()
    with oauthserver.running(offline_access_needs_consent=True) as server:
        for params, refresh in (({}, False), ({"prompt": "consent"}, True)):
            config = {"authorize_params": params} if params else {}
            name = f"oidc{len(params)}"
            begin = pb.BeginAuthorizationRequest(
                draft=draft(server, name, **config),
                redirect_uri=REDIRECT,
                scopes=["openid", "offline_access"],
            )
            begun = await admin.BeginAuthorization(begin)
            code, state = await asyncio.to_thread(follow_authorization, begun.authorization_url)
            complete = pb.CompleteAuthorizationRequest(state=state, code=code)
            created = await admin.CompleteAuthorization(complete)
            assert ("refresh_token" in created.secret_fields) is refresh, params
        assert [r.get("prompt") for r in server.authorize_requests] == [None, "consent"]
        assert dict(created.config["authorize_params"]) == {"prompt": "consent"}
        assert list(created.config["granted_scopes"]) == ["openid", "offline_access"]

        # The flow's own parameters are not the connection's to set.
        for field in ("redirect_uri", "State", "client_secret"):
            refused = await rpc_error(
                admin.BeginAuthorization(
                    pb.BeginAuthorizationRequest(
                        draft=draft(server, "bad", authorize_params={field: "x"}), redirect_uri=REDIRECT
                    )
                )
            )
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "config.authorize_params" in field_violations(refused)
    assert len(server.authorize_requests) == 2


async def test_a_connection_naming_its_issuer_completes_only_with_that_iss(broker: Running) -> None:
    """RFC 9207: the redirect's iss must equal the configured issuer, checked before the code is sent
    anywhere; a connection without an issuer tolerates iss (it has nothing to compare it with)."""
    admin = broker.admin()
    with oauthserver.running() as server, oauthserver.running() as other:

        async def redirected(name: str, **config: Any) -> tuple[str, str, str]:
            begin = pb.BeginAuthorizationRequest(draft=draft(server, name, **config), redirect_uri=REDIRECT)
            begun = await admin.BeginAuthorization(begin)
            response = await asyncio.to_thread(httpx.get, begun.authorization_url, follow_redirects=False)
            query = parse_qs(urlsplit(response.headers["location"]).query)
            return query["code"][0], query["state"][0], query["iss"][0]

        code, state, iss = await redirected("named", issuer=server.url)
        assert iss == server.url
        for wrong, reason in ((other.url, "does not match"), ("", "is missing")):
            code, state, _ = await redirected(f"named-{len(wrong)}", issuer=server.url)
            complete = pb.CompleteAuthorizationRequest(state=state, code=code, iss=wrong)
            refused = await rpc_error(admin.CompleteAuthorization(complete))
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert reason in field_violations(refused)["iss"]
            # The state is spent and the code never reached the token endpoint.
            spent = await rpc_error(
                admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code, iss=iss))
            )
            assert "state" in field_violations(spent)
        assert server.token_requests["authorization_code"] == 0

        code, state, iss = await redirected("named", issuer=server.url)
        created = await admin.CompleteAuthorization(
            pb.CompleteAuthorizationRequest(state=state, code=code, iss=iss)
        )
        assert created.config["issuer"] == server.url and "refresh_token" in created.secret_fields
        code, state, _ = await redirected("unnamed")
        tolerated = pb.CompleteAuthorizationRequest(state=state, code=code, iss=other.url)
        assert (await admin.CompleteAuthorization(tolerated)).status == pb.CONNECTION_STATUS_ACTIVE
    failures = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="oauth.complete"))
    assert sorted(e.reason for e in failures.events if e.outcome == "failed") == [
        "iss_mismatch", "iss_missing", "unknown_state", "unknown_state",
    ]  # fmt: skip


async def test_a_scope_the_provider_dropped_is_asked_for_again_on_re_authorization(broker: Running) -> None:
    """The granted scopes never replace the requested ones: connected without prompt=consent, the
    provider dropped offline_access; with the parameter added, re-authorizing asks for it again."""
    admin = broker.admin()
    with oauthserver.running(offline_access_needs_consent=True) as server:
        begin = pb.BeginAuthorizationRequest(
            draft=draft(server, "idp"), redirect_uri=REDIRECT, scopes=["openid", "offline_access"]
        )
        begun = await admin.BeginAuthorization(begin)
        code, state = await asyncio.to_thread(follow_authorization, begun.authorization_url)
        created = await admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
        assert "refresh_token" not in created.secret_fields
        assert list(created.config["scopes"]) == ["openid", "offline_access"]
        assert list(created.config["granted_scopes"]) == ["openid"]

        await admin.UpdateConnection(
            pb.UpdateConnectionRequest(
                id=created.id, config=struct({"authorize_params": {"prompt": "consent"}})
            )
        )
        again = pb.BeginAuthorizationRequest(connection_id=created.id, redirect_uri=REDIRECT)
        begun = await admin.BeginAuthorization(again)
        code, state = await asyncio.to_thread(follow_authorization, begun.authorization_url)
        renewed = await admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    assert server.authorize_requests[-1]["scope"] == "openid offline_access"
    assert "refresh_token" in renewed.secret_fields
    assert list(renewed.config["granted_scopes"]) == ["openid", "offline_access"]


async def test_state_is_single_use_bound_and_expiring(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    admin = broker.admin()
    begun = await admin.BeginAuthorization(
        pb.BeginAuthorizationRequest(draft=draft(server), redirect_uri=REDIRECT)
    )
    code, state = await asyncio.to_thread(follow_authorization, begun.authorization_url)
    # Another admin (another tenant) holding the state gets nothing, and burns nothing of ours.
    other = await rpc_error(
        broker.admin("admin_b").CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    )
    assert "state" in field_violations(other)
    await admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    reused = await rpc_error(
        admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    )
    assert reused.code() == grpc.StatusCode.INVALID_ARGUMENT and "state" in field_violations(reused)

    second = pb.BeginAuthorizationRequest(draft=draft(server, name="second"), redirect_uri=REDIRECT)
    begun = await admin.BeginAuthorization(second)
    code, state = await asyncio.to_thread(follow_authorization, begun.authorization_url)
    db = sqlite3.connect(broker.broker.settings.storage_path)
    with db:
        db.execute("UPDATE oauth_states SET expires_at = 0")
    db.close()
    expired = await rpc_error(
        admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    )
    assert "state" in field_violations(expired)
    names = [c.name for c in (await admin.ListConnections(pb.ListConnectionsRequest())).connections]
    assert names == ["calendar"]
    bad_redirect = await rpc_error(
        admin.BeginAuthorization(
            pb.BeginAuthorizationRequest(draft=draft(server), redirect_uri="http://evil.example/cb")
        )
    )
    assert "redirect_uri" in field_violations(bad_redirect)


async def test_a_pending_authorization_completes_after_a_master_key_rotation_and_rewrap(
    start: Callable[..., Any], server: oauthserver.OAuthTestServer, tmp_path: Path
) -> None:
    """The rewrap re-wraps a pending authorization's data key with the binding it was sealed with
    (`state_binding`, which `service/oauth.py` and `service/keys.py` share)."""
    key_dir = tmp_path / "keys"
    keydir.init(key_dir, [])
    operator = spiffe("default", "admin", "cli")
    running: Running = await start(
        master_key_file=None, master_key_dir=key_dir, master_key_operators=(operator,)
    )
    try:
        admin = running.admin()
        begun = await admin.BeginAuthorization(
            pb.BeginAuthorizationRequest(draft=draft(server), redirect_uri=REDIRECT)
        )
        rotated = await admin.RotateMasterKey(pb.RotateMasterKeyRequest())
        report = await rewrap_all(running.broker.store, keydir.load(key_dir))
        assert (report.total, report.rewrapped, report.failed) == (1, 1, [])
        assert await running.broker.store.deks_by_kek() == {rotated.active_kek_id: 1}
        code, state = await asyncio.to_thread(follow_authorization, begun.authorization_url)
        created = await admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
        assert created.status == pb.CONNECTION_STATUS_ACTIVE
    finally:
        await running.close()
        await running.broker.stop(grace=0)


async def test_100_concurrent_resolves_share_one_refresh(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    server.expires_in = SHORT_LIFE
    created = await authorize(broker, server)
    age_past_half_life(clock)  # the next Resolve must refresh
    server.expires_in = 3600
    server.delay = 0.2  # keep the refresh in flight while the calls pile up
    stub = broker.resolver()
    replies = await asyncio.gather(
        *(stub.Resolve(pb.ResolveRequest(connection_id=created.id)) for _ in range(100))
    )
    assert server.token_requests["refresh_token"] == 1
    tokens = {r.secrets["access_token"] for r in replies}
    assert len(tokens) == 1 and tokens <= server.valid_access_tokens()
    events = await broker.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="oauth.refresh"))
    assert len(events.events) == 1 and events.events[0].details["rotated"] == "true"


async def test_a_token_living_shorter_than_the_margin_is_refreshed_at_half_life_not_every_call(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    server.expires_in = SHORT_LIFE  # as Keycloak's default 5 minutes against our default 5 minute margin
    created = await authorize(broker, server)
    assert created.config["issued_at"] <= created.config["expires_at"]
    for _ in range(5):
        await resolve(broker, created.id)
    assert server.token_requests["refresh_token"] == 0  # fresh: no refresh on every Resolve
    age_past_half_life(clock)
    for _ in range(5):
        await resolve(broker, created.id)
    assert server.token_requests["refresh_token"] == 1  # half its life gone: refreshed once


async def test_the_rotated_refresh_token_survives_a_restart(
    start: Callable[..., Any], server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    server.expires_in = SHORT_LIFE
    first: Running = await start()
    created = await authorize(first, server)
    age_past_half_life(clock)
    before = (await resolve(first, created.id)).secrets["access_token"]  # refreshes (and rotates)
    assert server.token_requests["refresh_token"] == 1
    await first.close()
    await first.broker.stop(grace=0)

    second: Running = await start()
    age_past_half_life(clock)
    after = (await resolve(second, created.id)).secrets[
        "access_token"
    ]  # refreshes with the stored rotated token
    assert server.token_requests["refresh_token"] == 2 and after != before
    assert after in server.valid_access_tokens()
    await second.close()
    await second.broker.stop(grace=0)


async def test_a_refresh_cut_off_by_shutdown_is_not_lost(
    start: Callable[..., Any], server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    server.expires_in = SHORT_LIFE
    first: Running = await start()
    created = await authorize(first, server)
    age_past_half_life(clock)
    arrived, release = threading.Event(), threading.Event()

    async def hold(grant_type: str) -> None:
        arrived.set()
        await asyncio.to_thread(release.wait, 10)

    server.before_reply = hold
    call = asyncio.ensure_future(resolve(first, created.id))
    assert await asyncio.to_thread(arrived.wait, 10)
    call.cancel()  # the caller goes away; the broker shuts down while the provider answers
    stopping = asyncio.ensure_future(first.broker.stop(grace=0))
    await asyncio.sleep(0.1)
    release.set()
    await stopping
    await first.close()
    server.before_reply = None
    assert server.token_requests["refresh_token"] == 1

    second: Running = await start()
    age_past_half_life(clock)
    released = await resolve(second, created.id)  # needs the token the cut-off refresh stored
    assert server.token_requests["refresh_token"] == 2
    assert released.secrets["access_token"] in server.valid_access_tokens()
    await second.close()
    await second.broker.stop(grace=0)


@pytest.mark.parametrize("jwt", [True, False], ids=["jwt-exp", "default-lifetime"])
async def test_missing_expires_in_never_leaves_expiry_unknown(start: Callable[..., Any], jwt: bool) -> None:
    with oauthserver.running(send_expires_in=False, jwt_tokens=jwt, expires_in=7200) as server:
        running: Running = await start(oauth_default_token_lifetime_seconds=900.0)
        created = await authorize(running, server)
        expires_at = datetime.fromisoformat(created.config["expires_at"])
        expected = timedelta(seconds=7200 if jwt else 900)
        assert abs(expires_at - datetime.now(UTC) - expected) < timedelta(seconds=10)
        events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="connection.create"))
        assert events.events
        await running.close()
        await running.broker.stop(grace=0)


async def test_invalid_grant_expires_the_connection_until_reauthorized(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    server.expires_in = SHORT_LIFE
    created = await authorize(broker, server)
    age_past_half_life(clock)
    server.invalid_grant_next()
    expired_before = expired_count()
    error = await rpc_error(resolve(broker, created.id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "re-authorization" in error.details()
    assert expired_count() == expired_before + 1
    admin = broker.admin()
    expired = await admin.GetConnection(pb.GetConnectionRequest(id=created.id))
    assert expired.status == pb.CONNECTION_STATUS_EXPIRED
    listed = await admin.ListConnections(pb.ListConnectionsRequest(status=pb.CONNECTION_STATUS_EXPIRED))
    assert [c.id for c in listed.connections] == [created.id]
    again = await rpc_error(resolve(broker, created.id))  # no second call to the provider
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION and server.token_requests["refresh_token"] == 1

    server.expires_in = 3600
    begun = await admin.BeginAuthorization(
        pb.BeginAuthorizationRequest(connection_id=created.id, redirect_uri=REDIRECT)
    )
    code, state = await asyncio.to_thread(follow_authorization, begun.authorization_url)
    recovered = await admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    assert recovered.id == created.id and recovered.status == pb.CONNECTION_STATUS_ACTIVE
    assert (await resolve(broker, created.id)).secrets["access_token"] in server.valid_access_tokens()
    actions = [
        e.action
        for e in (await admin.ListAuditEvents(pb.ListAuditEventsRequest(connection_id=created.id))).events
    ]
    assert "oauth.expired" in actions and "oauth.authorize" in actions
    (authorized,) = [
        e for e in (await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="oauth.authorize"))).events
    ]
    assert authorized.details["recovered"] == "true"


async def test_a_slow_token_endpoint_never_holds_a_resolve_while_the_token_is_valid(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    """The refresh of a due but valid token goes on without the caller, who gets the valid token
    at once (a token endpoint may take the egress timeout, 15 s, three times over)."""
    server.expires_in = SHORT_LIFE
    created = await authorize(broker, server)
    current = (await resolve(broker, created.id)).secrets["access_token"]
    age_past_half_life(clock)  # due, and valid for 8 s more
    server.delay = 4.0
    started = asyncio.get_running_loop().time()
    released = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=created.id), timeout=3)
    assert released.secrets["access_token"] == current
    assert asyncio.get_running_loop().time() - started < 3
    for _ in range(100):  # the refresh was not abandoned: its token is stored once it comes
        renewed = (await resolve(broker, created.id)).secrets["access_token"]
        if renewed != current:
            break
        await asyncio.sleep(0.1)
    assert renewed in server.valid_access_tokens() and server.token_requests["refresh_token"] == 1


async def test_a_transient_failure_serves_the_still_valid_token(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    server.expires_in = SHORT_LIFE
    created = await authorize(broker, server)
    age_past_half_life(clock)  # still valid, but due
    current = server.valid_access_tokens()
    server.fail_next(3, status=503)
    released = await resolve(broker, created.id)
    assert released.secrets["access_token"] in current
    assert server.token_requests["refresh_token"] == 3  # retried with backoff
    status = (await broker.admin().GetConnection(pb.GetConnectionRequest(id=created.id))).status
    assert status == pb.CONNECTION_STATUS_ACTIVE
    failed = await broker.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="oauth.refresh"))
    assert [e.outcome for e in failed.events] == ["failed"]


async def test_client_credentials_fetch_on_demand_and_keep_until_near_expiry(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    created = await machine_connection(broker, server, scopes=["reports"])
    await broker.admin().GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    first = await resolve(broker, created.id)
    second = await resolve(broker, created.id)
    assert first.secrets["access_token"] == second.secrets["access_token"]
    assert server.token_requests["client_credentials"] == 1
    assert list(first.secrets) == ["access_token"]  # never the client secret


async def test_a_client_credentials_test_asks_for_a_token_and_keeps_nothing(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    """The token request is what tests a client id and secret: before the first Resolve too."""
    admin = broker.admin()
    draft = {"client_id": server.client_id, "token_url": server.token_url, "grant_type": "client_credentials"}
    created = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="tested",
            type="oauth2",
            provider="custom",
            config=struct({**draft, "verify_url": server.userinfo_url}),
            secrets={"client_secret": server.client_secret},
            test_before_save=True,
        )
    )
    assert created.last_test.success and created.last_test.message.startswith("read the verification URL")
    assert server.token_requests["client_credentials"] == 1
    assert "access_token" not in created.secret_fields  # the test's token was not stored

    def test_draft(client_secret: str) -> Any:
        config = struct(draft)
        secrets = {"client_secret": client_secret}
        as_drafted = pb.ConnectionDraft(type="oauth2", provider="custom", config=config, secrets=secrets)
        return admin.TestConnection(pb.TestConnectionRequest(draft=as_drafted))

    without_verify_url = await test_draft(server.client_secret)
    assert without_verify_url.success and without_verify_url.stage == pb.TEST_STAGE_AUTHENTICATE
    assert "verify_url" in " ".join(without_verify_url.not_verified)
    wrong = await test_draft("not-the-secret")
    assert not wrong.success and wrong.category == pb.TEST_CATEGORY_AUTH_FAILED
    assert "invalid_client" in wrong.message and "not-the-secret" not in str(wrong)


@pytest.mark.parametrize("error", ["invalid_scope", "invalid_client", "invalid_grant"])
async def test_a_refused_client_credentials_request_says_why_and_never_asks_for_a_sign_in(
    broker: Running, server: oauthserver.OAuthTestServer, error: str
) -> None:
    """Nobody can sign in again for a client credentials connection: it is never marked expired."""
    admin = broker.admin()
    created = await machine_connection(broker, server)
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    server.error_next(error, 401 if error == "invalid_client" else 400)
    tested = await admin.TestConnection(pb.TestConnectionRequest(id=created.id))
    assert not tested.success and tested.category == pb.TEST_CATEGORY_AUTH_FAILED
    assert error in tested.message and "authoriz" not in tested.message
    server.error_next(error, 401 if error == "invalid_client" else 400)
    refused = await rpc_error(resolve(broker, created.id))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error in refused.details() and "re-authoriz" not in refused.details()
    assert server.token_requests["client_credentials"] == 2  # the test's, then Resolve's: not retried
    status = (await admin.GetConnection(pb.GetConnectionRequest(id=created.id))).status
    assert status == pb.CONNECTION_STATUS_ACTIVE
    assert (await resolve(broker, created.id)).secrets["access_token"] in server.valid_access_tokens()


async def test_invalid_scope_at_refresh_is_reported_not_taken_for_a_dead_grant(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    server.expires_in = SHORT_LIFE
    created = await authorize(broker, server)
    clock.advance(SHORT_LIFE + 1)  # expired: nothing valid to serve meanwhile
    server.error_next("invalid_scope")
    refused = await rpc_error(resolve(broker, created.id))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and "invalid_scope" in refused.details()
    status = (await broker.admin().GetConnection(pb.GetConnectionRequest(id=created.id))).status
    assert status == pb.CONNECTION_STATUS_ACTIVE
    assert (await resolve(broker, created.id)).secrets["access_token"] in server.valid_access_tokens()


async def test_revoke_calls_the_providers_revocation_endpoint(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    created = await authorize(broker, server)
    await broker.admin().RevokeConnection(pb.RevokeConnectionRequest(id=created.id, reason="offboarding"))
    assert server.revocation_requests == 1 and server.revoked
    (event,) = (
        await broker.admin().ListAuditEvents(
            pb.ListAuditEventsRequest(action="connection.upstream_revocation")
        )
    ).events
    assert (event.outcome, event.details["upstream_revocation"]) == ("succeeded", "revoked")


async def test_a_client_credentials_connection_cannot_begin_an_authorization_and_says_why(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    admin = broker.admin()
    created = await machine_connection(broker, server)
    stored = await rpc_error(
        admin.BeginAuthorization(
            pb.BeginAuthorizationRequest(connection_id=created.id, redirect_uri=REDIRECT)
        )
    )
    assert stored.code() == grpc.StatusCode.FAILED_PRECONDITION and "client_credentials" in stored.details()
    drafted = draft(server, "m2", grant_type="client_credentials")
    draft_error = await rpc_error(
        admin.BeginAuthorization(pb.BeginAuthorizationRequest(draft=drafted, redirect_uri=REDIRECT))
    )
    assert draft_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "draft.config.grant_type" in field_violations(draft_error)


async def test_a_refused_client_is_not_reported_as_a_refused_code(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    """invalid_client at the code exchange (a wrong secret, basic where post is wanted) names the client."""
    admin = broker.admin()
    wrong = draft(server, token_auth_method="client_secret_post")
    begun = await admin.BeginAuthorization(pb.BeginAuthorizationRequest(draft=wrong, redirect_uri=REDIRECT))
    code, state = await asyncio.to_thread(follow_authorization, begun.authorization_url)
    error = await rpc_error(
        admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=state, code=code))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "invalid_client" in error.details() and "client_secret" in error.details()
    assert "did not accept the authorization code" not in error.details()
    assert server.client_secret not in error.details() and code not in error.details()


async def test_a_provider_slow_to_revoke_never_keeps_the_connection_from_being_revoked(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    """The egress timeout (15 s) outlasts brokerctl's 10 s deadline: the local revoke comes first,
    the caller waits 5 s at most, and the provider's answer, however late, is audited on its own."""
    created = await authorize(broker, server)
    server.revoke_delay = 7.0
    admin = broker.admin()
    revoke = pb.RevokeConnectionRequest(id=created.id, reason="leaked")
    started = asyncio.get_running_loop().time()
    revoked = await admin.RevokeConnection(revoke, timeout=6.5)
    assert revoked.status == pb.CONNECTION_STATUS_REVOKED
    assert asyncio.get_running_loop().time() - started < 6.5
    status = (await admin.GetConnection(pb.GetConnectionRequest(id=created.id))).status
    assert status == pb.CONNECTION_STATUS_REVOKED
    error = await rpc_error(resolve(broker, created.id))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED  # as for every revoked connection
    upstream = pb.ListAuditEventsRequest(action="connection.upstream_revocation")
    for _ in range(100):  # the provider answers after 7 s; the revocation was not abandoned
        if (await admin.ListAuditEvents(upstream)).events:
            break
        await asyncio.sleep(0.1)
    (event,) = (await admin.ListAuditEvents(upstream)).events
    assert event.details["upstream_revocation"] == "revoked" and server.revoked


async def test_purge_revokes_the_tokens_at_the_provider_before_destroying_them(
    broker: Running, server: oauthserver.OAuthTestServer
) -> None:
    """Delete then purge: afterwards nobody holds the refresh token, so it is revoked first."""
    created = await authorize(broker, server)
    (refresh_token,) = server.refresh_tokens
    admin = broker.admin()
    await admin.DeleteConnection(pb.DeleteConnectionRequest(id=created.id))
    assert server.revocation_requests == 0  # a soft delete can be undone: the tokens stay
    await admin.PurgeConnection(pb.PurgeConnectionRequest(id=created.id))
    assert server.revoked == [refresh_token] and refresh_token not in server.refresh_tokens
    upstream = pb.ListAuditEventsRequest(action="connection.upstream_revocation")
    (event,) = (await admin.ListAuditEvents(upstream)).events
    assert (event.outcome, event.details["upstream_revocation"]) == ("succeeded", "revoked")


async def test_no_oauth_secret_reaches_logs_audit_or_errors(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    server.expires_in = SHORT_LIFE
    created = await authorize(broker, server)
    age_past_half_life(clock)
    await resolve(broker, created.id)
    server.invalid_grant_next()
    age_past_half_life(clock)
    error = await rpc_error(resolve(broker, created.id))
    audit = await broker.admin().ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))
    secrets = [server.client_secret, *server.access_tokens, *server.refresh_tokens]
    secrets += [f["code"] for f in server.token_forms if "code" in f]
    secrets += [f["code_verifier"] for f in server.token_forms if "code_verifier" in f]
    haystack = broker.logs.getvalue() + str(audit) + str(error.details()) + str(error.trailing_metadata())
    haystack += str(await broker.admin().GetConnection(pb.GetConnectionRequest(id=created.id)))
    for secret in secrets:
        assert secret not in haystack


async def test_the_background_refresher_renews_tokens_before_anyone_asks(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    server.expires_in = SHORT_LIFE
    created = await authorize(broker, server)
    age_past_half_life(clock)
    server.expires_in = 3600
    assert await broker.broker.services.tokens.refresh_due() == 1
    assert server.token_requests["refresh_token"] == 1
    await resolve(broker, created.id)  # served from the renewed token: no refresh on the hot path
    assert server.token_requests["refresh_token"] == 1
    assert await broker.broker.services.tokens.refresh_due() == 0


async def test_a_token_that_cannot_be_refreshed_shows_expired_once_it_lapses(
    start: Callable[..., Any], clock: ShiftedClock
) -> None:
    """A provider that issued no refresh token (OpenID Connect without offline_access): once the
    access token lapses the connection needs signing in again, and says so to admins; the
    background refresher marks it once and then leaves it alone."""
    with oauthserver.running(offline_access_needs_consent=True) as server:
        running: Running = await start()
        try:
            created = await authorize(running, server)
            assert "refresh_token" not in created.secret_fields
            clock.advance(3600 + 1)
            assert await running.broker.services.tokens.refresh_due() == 1
            assert "oauth_background_refresh_failed" not in running.logs.getvalue()
            got = await running.admin().GetConnection(pb.GetConnectionRequest(id=created.id))
            assert got.status == pb.CONNECTION_STATUS_EXPIRED
            assert got.reauthorization.reason == "no_refresh_token"
            error = await rpc_error(resolve(running, created.id))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "needs re-authorization (no refresh token)" in (error.details() or "")
            assert await running.broker.services.tokens.refresh_due() == 0
            assert server.token_requests["refresh_token"] == 0
        finally:
            await running.close()
            await running.broker.stop(grace=0)


async def test_lapsed_tokens_do_not_keep_the_background_refresher_from_those_it_can_still_save(
    broker: Running, server: oauthserver.OAuthTestServer, clock: ShiftedClock
) -> None:
    """Connections whose refresh keeps failing (a client secret the provider no longer takes) keep
    their lapsed tokens; however many there are, a token that is due but still valid is renewed
    first."""
    server.expires_in = SHORT_LIFE
    broken = [await authorize(broker, server, name=f"broken-{i}") for i in range(2)]
    for connection in broken:
        await broker.admin().UpdateConnection(
            pb.UpdateConnectionRequest(id=connection.id, secrets={"client_secret": "no-longer-valid"})
        )
    clock.advance(SHORT_LIFE + 1)
    saved = await authorize(broker, server, name="saved")
    age_past_half_life(clock)
    assert await broker.broker.services.tokens.refresh_due(batch=2) == 2
    got = await broker.admin().GetConnection(pb.GetConnectionRequest(id=saved.id))
    assert server.token_requests["refresh_token"] >= 1
    assert got.config["expires_at"] != saved.config["expires_at"], "the savable token was not renewed"


async def test_a_token_refused_by_an_api_with_nothing_to_refresh_it_asks_for_signing_in_again(
    start: Callable[..., Any],
) -> None:
    """A proxied call whose token an API refuses (401), on a connection without a refresh token:
    FAILED_PRECONDITION saying why (before: INTERNAL, the refresh looked for a refresh token)."""
    with oauthserver.running(offline_access_needs_consent=True) as server:
        running: Running = await start()
        try:
            created = await authorize(running, server)
            await running.admin().GrantAccess(
                pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY)
            )
            server.access_tokens.clear()  # the provider revokes the token early
            request = pb.ProxyHttpRequest(connection_id=created.id, method="GET", path="/userinfo")
            error = await rpc_error(proxy(running).ProxyHttp(request))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
            assert "needs re-authorization (no refresh token)" in (error.details() or "")
            got = await running.admin().GetConnection(pb.GetConnectionRequest(id=created.id))
            assert got.reauthorization.reason == "no_refresh_token"
        finally:
            await running.close()
            await running.broker.stop(grace=0)
