"""The http, api_key and oauth2 testers against real HTTP(S) servers on loopback."""

from __future__ import annotations

import base64
import contextlib
import gzip
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker import catalog
from broker.egress import EgressPolicy, EgressSettings
from broker.model import TestCategory, TestResult, TestStage
from broker.sensitive import SecretFields
from broker.testers import Target, Tester, run_tester
from broker.testers import http as http_tester
from tests.httpservers import Answer, LocalServer, Route, Seen, closed_port, serve, silent_port, tls_files

TOKEN = "tok-5f1d2a9c-good"
KEY = "sk-test-8c3e77b1-good"
LOOPBACK = EgressPolicy(EgressSettings(allow_loopback=True, total_timeout=10))

Servers = Callable[..., LocalServer]


@pytest.fixture
def servers() -> Iterator[Servers]:
    with contextlib.ExitStack() as stack:

        def start(route: Route, tls: Any = None) -> LocalServer:
            return stack.enter_context(serve(route, tls))

        yield start


def target(type_: str, provider: str, config: dict[str, Any], secrets: dict[str, str]) -> Target:
    """A target as the service builds it: validated by the catalog, defaults applied."""
    valid = catalog.validate(type_, provider, config, secrets)
    return Target(valid.type, valid.provider, valid.config, SecretFields(valid.secrets))


async def run(tester: Tester, t: Target, egress: EgressPolicy = LOOPBACK) -> TestResult:
    return await run_tester(tester, t, egress)


def http_target(url: str, **config: Any) -> Target:
    secrets = config.pop("secrets", {})
    return target("http", "", {"base_url": url, **config}, secrets)


def bearer_route(status_ok: int = 200) -> Route:
    def route(seen: Seen) -> Answer:
        return Answer(status_ok if seen.headers.get("authorization") == f"Bearer {TOKEN}" else 401)

    return route


def status_route(status: int) -> Route:
    return lambda seen: Answer(status)


# ------------------------------------------------------------------------------------- http


async def test_http_bearer_ok_with_head_and_configured_headers(servers: Servers) -> None:
    server = servers(bearer_route())
    t = http_target(
        server.url + "/api", auth_type="bearer", headers={"X-Tenant": "acme"}, secrets={"token": TOKEN}
    )
    result = await run(http_tester.test_http, t)
    assert result.success, result
    assert result.category is TestCategory.OK
    assert result.details["status"] == "200"
    assert result.details["method"] == "HEAD"
    assert result.details["endpoint"] == server.url + "/api"
    assert "http reachable" in result.verified
    assert [s.method for s in server.requests] == ["HEAD"]
    assert server.requests[0].path == "/api"
    assert server.requests[0].headers["x-tenant"] == "acme"


async def test_http_wrong_token_is_auth_failed(servers: Servers) -> None:
    server = servers(bearer_route())
    t = http_target(server.url, auth_type="bearer", secrets={"token": "tok-wrong-value"})
    result = await run(http_tester.test_http, t)
    assert not result.success
    assert result.category is TestCategory.AUTH_FAILED
    assert result.stage is TestStage.AUTHENTICATE
    assert result.details["status"] == "401"


@pytest.mark.parametrize(
    ("status", "category"),
    [
        (403, TestCategory.PERMISSION_DENIED),
        (404, TestCategory.NOT_FOUND),
        (500, TestCategory.UNEXPECTED_RESPONSE),
        (503, TestCategory.UNEXPECTED_RESPONSE),
        (418, TestCategory.UNEXPECTED_RESPONSE),
    ],
)
async def test_http_failure_statuses(servers: Servers, status: int, category: TestCategory) -> None:
    server = servers(status_route(status))
    result = await run(http_tester.test_http, http_target(server.url))
    assert not result.success
    assert result.category is category
    assert result.details["status"] == str(status)


@pytest.mark.parametrize("refusal", [405, 501])
async def test_http_falls_back_to_get_when_head_is_refused(servers: Servers, refusal: int) -> None:
    server = servers(lambda seen: Answer(refusal if seen.method == "HEAD" else 200, b"hello"))
    result = await run(http_tester.test_http, http_target(server.url))
    assert result.success, result
    assert result.details["method"] == "GET"
    assert [s.method for s in server.requests] == ["HEAD", "GET"]


async def test_http_auth_forms(servers: Servers) -> None:
    server = servers(lambda seen: Answer(200))
    basic = http_target(server.url, auth_type="basic", username="ada", secrets={"password": "pw-lovelace"})
    key = http_target(
        server.url, auth_type="api_key", api_key_header="X-Api-Token", secrets={"api_key_value": KEY}
    )
    oauth = http_target(server.url, auth_type="oauth2", secrets={"access_token": TOKEN})
    for t in (basic, key, oauth):
        assert (await run(http_tester.test_http, t)).success
    basic_seen, key_seen, oauth_seen = server.requests
    assert basic_seen.headers["authorization"] == "Basic " + base64.b64encode(b"ada:pw-lovelace").decode()
    assert key_seen.headers["x-api-token"] == KEY
    assert "authorization" not in key_seen.headers
    assert oauth_seen.headers["authorization"] == f"Bearer {TOKEN}"


async def test_http_oauth2_without_token_is_invalid_config(servers: Servers) -> None:
    server = servers(status_route(200))
    result = await run(http_tester.test_http, http_target(server.url, auth_type="oauth2"))
    assert result.category is TestCategory.INVALID_CONFIG
    assert result.message == "no access token stored; authorize first"
    assert server.requests == []


async def test_http_redirect_to_another_origin_is_ok_and_not_followed(servers: Servers) -> None:
    elsewhere = servers(status_route(200))
    server = servers(lambda seen: Answer(302, headers={"Location": elsewhere.url + "/login?next=x"}))
    t = http_target(server.url, auth_type="bearer", secrets={"token": TOKEN})
    result = await run(http_tester.test_http, t)
    assert result.success, result
    assert result.details["status"] == "302"
    assert result.details["location"] == elsewhere.url + "/login"
    assert elsewhere.requests == []  # the token never travelled to another origin


async def test_http_redirect_to_another_host_on_the_same_port_is_not_followed(servers: Servers) -> None:
    def route(seen: Seen) -> Answer:
        port = seen.headers["host"].rsplit(":", 1)[1]
        return Answer(307, headers={"Location": f"http://localhost:{port}/elsewhere"})

    server = servers(route)
    result = await run(
        http_tester.test_http, http_target(server.url, auth_type="bearer", secrets={"token": TOKEN})
    )
    assert result.success, result
    assert result.details["location"] == f"http://localhost:{server.port}/elsewhere"
    assert [s.path for s in server.requests] == ["/"]


async def test_http_same_origin_redirects_are_followed_with_credentials(servers: Servers) -> None:
    def route(seen: Seen) -> Answer:
        if seen.path == "/start":
            return Answer(301, headers={"Location": "/next"})
        return bearer_route()(seen)

    server = servers(route)
    result = await run(
        http_tester.test_http,
        http_target(server.url + "/start", auth_type="bearer", secrets={"token": TOKEN}),
    )
    assert result.success, result
    assert result.details["endpoint"] == server.url + "/next"
    assert [s.path for s in server.requests] == ["/start", "/next"]


async def test_http_redirect_loop_stops_at_the_limit(servers: Servers) -> None:
    server = servers(lambda seen: Answer(302, headers={"Location": "/again"}))
    egress = EgressPolicy(EgressSettings(allow_loopback=True, max_redirects=2))
    result = await run(http_tester.test_http, http_target(server.url), egress)
    assert result.success  # a 3xx is an answer; the loop is bounded
    assert len(server.requests) == 3


async def test_http_timeout_when_server_never_answers() -> None:
    with silent_port() as port:
        result = await run(
            http_tester.test_http, http_target(f"http://127.0.0.1:{port}", timeout_seconds=0.3)
        )
    assert result.category is TestCategory.TIMEOUT
    assert result.stage is TestStage.SAMPLE_OPERATION
    assert result.latency_ms < 5000


async def test_http_connection_refused() -> None:
    result = await run(http_tester.test_http, http_target(f"http://127.0.0.1:{closed_port()}"))
    assert result.category is TestCategory.CONNECTION_REFUSED
    assert result.stage is TestStage.CONNECT


async def test_https_trusted_certificate(
    servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = tls_files(tmp_path)
    # The tester trusts the system store, which OpenSSL lets SSL_CERT_FILE replace.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca_file))
    server = servers(status_route(204), tls.server)
    result = await run(http_tester.test_http, http_target(server.url))
    assert result.success, result
    assert "tls certificate" in result.verified
    assert len(server.requests) == 1


async def test_https_untrusted_certificate_is_tls_error(
    servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trusted = tls_files(tmp_path, "trusted")
    rogue = tls_files(tmp_path, "rogue")
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted.ca_file))
    server = servers(status_route(200), rogue.server)
    t = http_target(server.url, auth_type="bearer", secrets={"token": TOKEN})
    result = await run(http_tester.test_http, t)
    assert result.category is TestCategory.TLS_ERROR
    assert result.stage is TestStage.TLS
    assert "certificate" in result.message
    assert server.requests == []  # the token was never sent


async def test_http_plain_server_spoken_to_with_tls_is_tls_error(servers: Servers) -> None:
    server = servers(status_route(200))
    result = await run(http_tester.test_http, http_target(server.url.replace("http://", "https://")))
    assert result.category is TestCategory.TLS_ERROR


async def test_http_blocked_by_policy_sends_nothing(servers: Servers) -> None:
    server = servers(status_route(200))
    blocked = EgressPolicy(EgressSettings(allow_loopback=False))
    t = http_target(server.url, auth_type="bearer", secrets={"token": TOKEN})
    result = await run(http_tester.test_http, t, blocked)
    assert result.category is TestCategory.BLOCKED_BY_POLICY
    assert server.requests == []


# ---------------------------------------------------------------------------------- api_key

# provider -> (method, path, header that must carry the key, its expected value, other headers)
PROVIDERS: dict[str, tuple[str, str, str, str, dict[str, str]]] = {
    "openai": ("GET", "/v1/models", "authorization", f"Bearer {KEY}", {}),
    "anthropic": ("GET", "/v1/models", "x-api-key", KEY, {"anthropic-version": "2023-06-01"}),
    "google_ai": ("GET", "/v1beta/models", "x-goog-api-key", KEY, {}),
    "github": ("GET", "/user", "authorization", f"Bearer {KEY}", {"x-github-api-version": "2022-11-28"}),
    "slack": ("POST", "/api/auth.test", "authorization", f"Bearer {KEY}", {}),
    "mistral": ("GET", "/v1/models", "authorization", f"Bearer {KEY}", {}),
    "cohere": ("GET", "/v1/models", "authorization", f"Bearer {KEY}", {}),
    "huggingface": ("GET", "/api/whoami-v2", "authorization", f"Bearer {KEY}", {}),
}


def provider_fake(provider: str) -> Route:
    """A fake of one provider: the exact method and path, the key in the exact header, else 401/404."""
    method, path, header, value, others = PROVIDERS[provider]

    def route(seen: Seen) -> Answer:
        if seen.method != method or seen.path != path:
            return Answer(404)
        if seen.headers.get(header) != value or any(seen.headers.get(k) != v for k, v in others.items()):
            if provider == "slack":
                return Answer.json({"ok": False, "error": "invalid_auth"})
            if provider == "google_ai":
                return Answer.json({"error": {"code": 400, "status": "INVALID_ARGUMENT", "details": [
                    {"reason": "API_KEY_INVALID"}]}}, status=400)  # fmt: skip
            return Answer(401)
        if provider == "slack":
            return Answer.json({"ok": True, "team": "Acme", "user": "bot", "url": "https://acme.slack.com/"})
        return Answer.json({"login": "octocat", "name": "octo", "data": []})

    return route


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
async def test_api_key_provider_endpoint(servers: Servers, provider: str) -> None:
    server = servers(provider_fake(provider))
    good = await run(
        http_tester.test_api_key, target("api_key", provider, {"base_url": server.url}, {"api_key": KEY})
    )
    assert good.success, good
    assert good.details["provider"] == provider
    method, path, *_ = PROVIDERS[provider]
    assert (server.requests[0].method, server.requests[0].path) == (method, path)
    bad = await run(
        http_tester.test_api_key,
        target("api_key", provider, {"base_url": server.url + "/"}, {"api_key": "sk-wrong-0000"}),
    )
    assert bad.category is TestCategory.AUTH_FAILED, bad
    assert bad.stage is TestStage.AUTHENTICATE


async def test_api_key_identity_in_details(servers: Servers) -> None:
    github = servers(provider_fake("github"))
    slack = servers(provider_fake("slack"))
    result = await run(
        http_tester.test_api_key, target("api_key", "github", {"base_url": github.url}, {"api_key": KEY})
    )
    assert result.details["login"] == "octocat"
    result = await run(
        http_tester.test_api_key, target("api_key", "slack", {"base_url": slack.url}, {"api_key": KEY})
    )
    assert (result.details["team"], result.details["user"]) == ("Acme", "bot")


@pytest.mark.parametrize(
    ("error", "category"),
    [
        ("invalid_auth", TestCategory.AUTH_FAILED),
        ("token_revoked", TestCategory.AUTH_FAILED),
        ("missing_scope", TestCategory.PERMISSION_DENIED),
        ("ratelimited", TestCategory.UNEXPECTED_RESPONSE),
    ],
)
async def test_api_key_slack_ok_false(servers: Servers, error: str, category: TestCategory) -> None:
    server = servers(lambda seen: Answer.json({"ok": False, "error": error}))
    result = await run(
        http_tester.test_api_key, target("api_key", "slack", {"base_url": server.url}, {"api_key": KEY})
    )
    assert not result.success
    assert result.category is category
    assert result.details["error"] == error


async def test_api_key_slack_non_json_is_unexpected(servers: Servers) -> None:
    server = servers(lambda seen: Answer(200, b"<html>hi</html>"))
    result = await run(
        http_tester.test_api_key, target("api_key", "slack", {"base_url": server.url}, {"api_key": KEY})
    )
    assert result.category is TestCategory.UNEXPECTED_RESPONSE


async def test_api_key_default_base_url_is_the_provider(servers: Servers) -> None:
    # Only loopback hosts are allowed, so the default base is refused before any packet: the
    # message names the host it would have called.
    only_local = EgressPolicy(EgressSettings(allow_loopback=True, allow_hosts=("127.0.0.1",)))
    result = await run(
        http_tester.test_api_key, target("api_key", "github", {}, {"api_key": KEY}), only_local
    )
    assert result.category is TestCategory.BLOCKED_BY_POLICY
    assert "api.github.com" in result.message


async def test_api_key_custom_probes_base_url_with_bearer(servers: Servers) -> None:
    server = servers(
        lambda seen: Answer(200 if seen.headers.get("authorization") == f"Bearer {KEY}" else 401)
    )
    result = await run(
        http_tester.test_api_key, target("api_key", "custom", {"base_url": server.url}, {"api_key": KEY})
    )
    assert result.success, result
    assert server.requests[0].method == "HEAD"
    wrong = target("api_key", "custom", {"base_url": server.url}, {"api_key": "sk-wrong-0000"})
    assert (await run(http_tester.test_api_key, wrong)).category is TestCategory.AUTH_FAILED


async def test_api_key_custom_without_base_url_is_invalid_config() -> None:
    # The catalog refuses this draft; a tester must still not guess where to go.
    t = Target("api_key", "custom", {}, SecretFields({"api_key": KEY}))
    result = await run(http_tester.test_api_key, t)
    assert result.category is TestCategory.INVALID_CONFIG


async def test_secret_never_in_result_even_when_echoed(servers: Servers) -> None:
    def echo(seen: Seen) -> Answer:
        # The "account name" is the key itself, and the error page quotes the key as well.
        if seen.path == "/user":
            return Answer.json({"login": KEY, "token": KEY})
        return Answer(401, f"bad key {KEY}".encode(), {"X-Echo": KEY})

    server = servers(echo)
    ok = await run(
        http_tester.test_api_key, target("api_key", "github", {"base_url": server.url}, {"api_key": KEY})
    )
    failed = await run(
        http_tester.test_api_key, target("api_key", "openai", {"base_url": server.url}, {"api_key": KEY})
    )
    failed_http = await run(
        http_tester.test_http, http_target(server.url, auth_type="bearer", secrets={"token": KEY})
    )
    assert ok.success and not failed.success and not failed_http.success
    for result in (ok, failed, failed_http):
        assert KEY not in repr(result)
        assert base64.b64encode(KEY.encode()).decode() not in repr(result)


# ----------------------------------------------------------------------------------- oauth2


def oauth_target(provider: str, token: str | None = TOKEN, **config: Any) -> Target:
    secrets = {"access_token": token} if token else {}
    return target("oauth2", provider, {"client_id": "client-1", **config}, secrets)


async def test_oauth2_userinfo_good_and_bad_token(servers: Servers) -> None:
    def userinfo(seen: Seen) -> Answer:
        if seen.headers.get("authorization") != f"Bearer {TOKEN}":
            return Answer(401)
        return Answer.json({"sub": "1234", "email": "ada@example.com"})

    server = servers(userinfo)
    good = await run(http_tester.test_oauth2, oauth_target("google", verify_url=server.url + "/userinfo"))
    assert good.success, good
    assert good.details["email"] == "ada@example.com"
    assert good.not_verified == ("refresh token",)
    assert server.requests[0].path == "/userinfo"
    bad = await run(http_tester.test_oauth2, oauth_target("google", "tok-revoked-1", verify_url=server.url))
    assert bad.category is TestCategory.AUTH_FAILED


async def test_oauth2_expired_token_is_noted(servers: Servers) -> None:
    server = servers(status_route(401))
    t = oauth_target("github", verify_url=server.url, expires_at="2020-01-02T03:04:05Z")
    result = await run(http_tester.test_oauth2, t)
    assert result.category is TestCategory.AUTH_FAILED
    assert result.details["token_expired_at"] == "2020-01-02T03:04:05Z"
    assert "expired" in result.message


async def test_oauth2_notion_sends_its_version_header(servers: Servers) -> None:
    server = servers(lambda seen: Answer.json({"object": "user", "type": "bot", "name": "Acme bot"}))
    result = await run(
        http_tester.test_oauth2, oauth_target("notion", verify_url=server.url + "/v1/users/me")
    )
    assert result.success, result
    assert server.requests[0].headers["notion-version"] == "2022-06-28"
    assert result.details["name"] == "Acme bot"


async def test_oauth2_slack_reads_ok_false(servers: Servers) -> None:
    server = servers(lambda seen: Answer.json({"ok": False, "error": "token_expired"}))
    result = await run(http_tester.test_oauth2, oauth_target("slack", verify_url=server.url))
    assert result.category is TestCategory.AUTH_FAILED
    assert server.requests[0].method == "POST"


async def test_oauth2_without_token_or_url_is_invalid_config() -> None:
    result = await run(http_tester.test_oauth2, oauth_target("github", token=None))
    assert result.category is TestCategory.INVALID_CONFIG
    assert result.message == "no access token stored; authorize first"
    endpoints = {"token_url": "https://idp.invalid/token", "authorize_url": "https://idp.invalid/authorize"}
    custom = oauth_target("custom", **endpoints)
    result = await run(http_tester.test_oauth2, custom)
    assert result.category is TestCategory.INVALID_CONFIG
    assert "verify_url" in result.message
    # A client credentials connection has nobody to authorize: its test asks the token endpoint.
    grant = {"token_url": "https://idp.invalid/token", "grant_type": "client_credentials"}
    machine = oauth_target("custom", None, **grant)
    result = await run(http_tester.test_oauth2, machine)
    assert result.category is TestCategory.DNS_FAILURE and "authorize" not in result.message


async def test_oauth2_default_userinfo_endpoint() -> None:
    only_local = EgressPolicy(EgressSettings(allow_loopback=True, allow_hosts=("127.0.0.1",)))
    result = await run(http_tester.test_oauth2, oauth_target("google"), only_local)
    assert result.category is TestCategory.BLOCKED_BY_POLICY
    assert "openidconnect.googleapis.com" in result.message


@pytest.mark.parametrize("coding", ["gzip", "gzip, gzip"])
async def test_a_compressed_answer_is_read_in_bounded_steps_not_inflated_whole(
    servers: Servers, coding: str
) -> None:
    inner = gzip.compress(b" " * 90_000_000, compresslevel=9)  # ~90 kB as sent
    bomb = gzip.compress(inner) if coding == "gzip, gzip" else inner
    server = servers(
        lambda seen: Answer(200, bomb, {"Content-Type": "application/json", "Content-Encoding": coding})
    )
    tracemalloc.start()
    try:
        result = await run(
            http_tester.test_api_key, target("api_key", "github", {"base_url": server.url}, {"api_key": KEY})
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # One layer is read (the key was accepted); two are a coding the broker does not read.
    expected = TestCategory.OK if coding == "gzip" else TestCategory.PROTOCOL_ERROR
    assert result.category is expected, result
    assert peak < 30_000_000
