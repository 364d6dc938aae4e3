"""HTTP testers: `http` (a base URL with optional auth), `api_key` (a provider's verification
endpoint) and `oauth2` (a stored access token against a user-info endpoint, or for the client
credentials grant a token asked for by the test).

Every request goes through `broker.egress.http.http_client`, so each connection goes to a
policy-checked address. Redirects are followed hop by hop, at most
`egress.settings.max_redirects`, and only within the origin (or from http to https on the
same host): credentials never travel to a host the user did not name. A redirect elsewhere
is not followed; the 3xx is the answer (ok for `http`, unexpected for a verification
endpoint). At most `egress.settings.max_response_bytes` of a body is read, and only where
the answer matters (Slack's JSON, account names). Bodies never reach the result: an error
page may echo the key, even in part, where scrubbing cannot find it.

TLS is verified against the system trust store (OpenSSL's default paths, which honour
SSL_CERT_FILE and SSL_CERT_DIR) plus certifi's bundle.

Answers: 2xx ok (3xx too for `http`), 401 auth_failed, 403 permission_denied, 404 not_found,
anything else unexpected_response with the status in details. `api_key` with provider
`custom` probes `base_url` like `http` does, sending `Authorization: Bearer <api_key>`, the
most common convention; an API that wants another header is an `http` connection with
auth_type api_key.
"""

from __future__ import annotations

import asyncio
import errno
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import certifi
import httpx

from broker import oauth
from broker.egress import EgressPolicy, InvalidTarget, parse_url
from broker.egress.http import body_chunks, http_client, redirect_url
from broker.model import TestCategory, TestResult, TestStage
from broker.testers.base import Target, TestFailure, passed
from broker.testers.providers import (
    API_KEY_PROVIDERS,
    CUSTOM_USERINFO,
    OAUTH2_USERINFO,
    SLACK_AUTH_ERRORS,
    SLACK_PERMISSION_ERRORS,
    Endpoint,
    KeyStyle,
    Reading,
)
from broker.testers.sent import SentCredentials

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Identity encoding keeps the byte cap a cap on what the server sends, not on what it inflates to.
_BASE_HEADERS = {"User-Agent": "secrets-broker-tester", "Accept-Encoding": "identity"}
NOT_AUTHORIZED = "no access token stored; authorize first"
# A test's token is used at once and thrown away: its lifetime does not matter.
_ANY_LIFETIME = timedelta(hours=1)


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: its status, the URL that gave it, and at most the byte cap of its body."""

    method: str
    status: int
    url: httpx.URL
    location: str
    body: bytes


def trust() -> ssl.SSLContext:
    """The TLS context for outbound tests: the system trust store plus certifi's bundle."""
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=certifi.where())
    return context


def shown(url: httpx.URL | str) -> str:
    """`url` as results show it: scheme, host, port and path. The query may carry a key."""
    parsed = httpx.URL(parse_url(url).text if isinstance(url, str) else url)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}{parsed.path}"


def _client(egress: EgressPolicy, timeout: float) -> httpx.AsyncClient:
    connect = min(timeout, egress.settings.connect_timeout)
    return http_client(egress, verify=trust(), timeout=httpx.Timeout(timeout, connect=connect))


def _location(reply: Reply) -> httpx.URL | None:
    """Where a redirect points, read as the egress policy reads URLs; None if it cannot be read."""
    if reply.status not in _REDIRECTS or not reply.location:
        return None
    try:
        return redirect_url(reply.url, reply.location)
    except InvalidTarget:
        return None


def _redirect_target(reply: Reply) -> httpx.URL | None:
    """Where a redirect may be followed: same origin, or an upgrade to https on the same host."""
    here, there = reply.url, _location(reply)
    if there is None or there.host != here.host or there.scheme not in ("http", "https"):
        return None
    same = there.scheme == here.scheme and there.port == here.port
    upgrade = here.scheme == "http" and there.scheme == "https" and there.port is None
    return there if same or upgrade else None


async def _send(
    client: httpx.AsyncClient,
    method: str,
    url: httpx.URL,
    headers: Mapping[str, str],
    content: bytes | None,
    limit: int,
) -> Reply:
    request = client.build_request(method, url, headers=headers, content=content)
    response = await client.send(request, stream=True)
    chunks: list[bytes] = []
    try:
        if limit > 0 and method != "HEAD":
            size = 0
            # Decoded in bounded steps: a small compressed answer is not inflated whole.
            async for chunk in body_chunks(response):
                chunks.append(chunk[: limit - size])
                size += len(chunk)
                if size >= limit:
                    break
    finally:
        await response.aclose()
    location = response.headers.get("location", "")
    return Reply(method, response.status_code, url, location, b"".join(chunks))


async def fetch(
    egress: EgressPolicy,
    method: str,
    url: str,
    headers: Mapping[str, str],
    *,
    budget: float,
    stage: TestStage,
    content: bytes | None = None,
    read_body: bool = False,
    follow_redirects: bool = True,
) -> Reply:
    """One exchange within `budget` seconds, following safe redirects; transport errors raise `TestFailure`.

    `stage` is the stage a failure after connecting is reported at.
    """
    limit = egress.settings.max_response_bytes if read_body else 0
    current = httpx.URL(egress.check_url(url).text)
    try:
        async with asyncio.timeout(budget), _client(egress, budget) as client:
            for _ in range(egress.settings.max_redirects if follow_redirects else 0):
                reply = await _send(client, method, current, headers, content, limit)
                target = _redirect_target(reply)
                if target is None:
                    return reply
                if reply.status == 303 or (reply.status in (301, 302) and method == "POST"):
                    # What browsers do: the body is not replayed to the new location.
                    method, content = ("HEAD" if method == "HEAD" else "GET"), None
                current = target
            return await _send(client, method, current, headers, content, limit)
    except TimeoutError:
        raise TestFailure(TestCategory.TIMEOUT, stage, f"no answer within {budget:g} s") from None
    except httpx.HTTPError as exc:
        raise transport_failure(exc, stage, budget) from None


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: BaseException | None = exc
    for _ in range(10):  # the chains are short; bound the walk anyway
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _errno(exc: BaseException) -> int:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return 0


def transport_failure(exc: httpx.HTTPError, stage: TestStage, timeout: float) -> TestFailure:
    """Classify an httpx error: timeout, TLS, refused, or a protocol error."""
    if isinstance(exc, httpx.ConnectTimeout):
        return TestFailure(TestCategory.TIMEOUT, TestStage.CONNECT, f"no connection within {timeout:g} s")
    if isinstance(exc, httpx.TimeoutException):
        return TestFailure(TestCategory.TIMEOUT, stage, f"no answer within {timeout:g} s")
    tls = _cause(exc, ssl.SSLError)
    if isinstance(tls, ssl.SSLError):
        reason = getattr(tls, "verify_message", "") or tls.reason or type(tls).__name__
        return TestFailure(TestCategory.TLS_ERROR, TestStage.TLS, f"TLS handshake failed: {reason}")
    if isinstance(exc, httpx.UnsupportedProtocol):
        return TestFailure(
            TestCategory.INVALID_CONFIG, TestStage.RESOLVE_ADDRESS, "the URL must be http or https"
        )
    if isinstance(exc, httpx.ConnectError):
        if isinstance(_cause(exc, ConnectionRefusedError), ConnectionRefusedError):
            return TestFailure(TestCategory.CONNECTION_REFUSED, TestStage.CONNECT, "connection refused")
        # Unreachable networks and resets are reported as "cannot connect" in the same category.
        why = errno.errorcode.get(_errno(exc), "connection failed")
        return TestFailure(TestCategory.CONNECTION_REFUSED, TestStage.CONNECT, f"cannot connect ({why})")
    return TestFailure(TestCategory.PROTOCOL_ERROR, stage, f"HTTP exchange failed: {type(exc).__name__}")


def details_of(reply: Reply, **extra: str) -> dict[str, str]:
    """Non-secret facts about an answer: method, endpoint, status, and where a redirect pointed."""
    found = {"method": reply.method, "endpoint": shown(reply.url), "status": str(reply.status), **extra}
    location = _location(reply)
    if location is not None:
        found["location"] = shown(location)
    elif reply.status in _REDIRECTS and reply.location:
        found["location"] = "(not a valid http or https URL)"
    return found


def status_failure(reply: Reply, details: Mapping[str, str], rejected: str = "credentials") -> TestFailure:
    """The failure an unsuccessful status means."""
    status = reply.status
    if status == 401:
        return TestFailure(
            TestCategory.AUTH_FAILED, TestStage.AUTHENTICATE, f"{rejected} rejected (HTTP 401)", details
        )
    if status == 403:
        return TestFailure(
            TestCategory.PERMISSION_DENIED, TestStage.AUTHENTICATE, "access denied (HTTP 403)", details
        )
    if status in (404, 410):
        return TestFailure(
            TestCategory.NOT_FOUND,
            TestStage.SAMPLE_OPERATION,
            f"{shown(reply.url)} not found (HTTP {status})",
            details,
        )
    if status in _REDIRECTS:
        message = f"answered with a redirect (HTTP {status}) that was not followed"
    else:
        message = f"unexpected answer: HTTP {status}"
    return TestFailure(TestCategory.UNEXPECTED_RESPONSE, TestStage.SAMPLE_OPERATION, message, details)


def _timeout(target: Target, egress: EgressPolicy) -> float:
    configured = target.config.get("timeout_seconds")
    total = egress.settings.total_timeout
    return min(float(configured), total) if configured else total


def _bearer(sent: SentCredentials, token: str) -> dict[str, str]:
    return {"Authorization": sent.bearer(token)}


def _http_auth(target: Target) -> dict[str, str]:
    kind = target.config.get("auth_type", "none")
    if kind == "bearer":
        return _bearer(target.sent, target.secret("token"))
    if kind == "basic":
        return {
            "Authorization": target.sent.basic(target.config.get("username", ""), target.secret("password"))
        }
    if kind == "api_key":
        return {target.config.get("api_key_header") or "X-API-Key": target.secret("api_key_value")}
    if kind == "oauth2":
        token = target.secret("access_token")
        if not token:
            raise TestFailure(TestCategory.INVALID_CONFIG, TestStage.RESOLVE_ADDRESS, NOT_AUTHORIZED)
        return _bearer(target.sent, token)
    return {}


async def probe(
    egress: EgressPolicy, url: str, headers: Mapping[str, str], auth: Mapping[str, str], budget: float
) -> TestResult:
    """HEAD `url` (GET when HEAD is refused with 405 or 501); 2xx and 3xx are ok."""
    stage = TestStage.AUTHENTICATE if auth else TestStage.SAMPLE_OPERATION
    sent = {**headers, **_BASE_HEADERS, **auth}
    reply = await fetch(egress, "HEAD", url, sent, budget=budget, stage=stage)
    if reply.status in (405, 501):
        reply = await fetch(egress, "GET", url, sent, budget=budget, stage=stage)
    details = details_of(reply)
    if not 200 <= reply.status < 400:
        raise status_failure(reply, details)
    verified = ("http reachable", "tls certificate") if reply.url.scheme == "https" else ("http reachable",)
    # A base URL that answers 2xx may simply not require the credentials; say so.
    return passed(
        f"{shown(url)} answered HTTP {reply.status}",
        details=details,
        verified=verified,
        not_verified=("credentials",) if auth else (),
    )


async def test_http(target: Target, egress: EgressPolicy) -> TestResult:
    """`http`: HEAD the base URL with the configured auth and headers, falling back to GET."""
    headers = dict(target.config.get("headers") or {})
    auth = _http_auth(target)
    return await probe(egress, target.config["base_url"], headers, auth, _timeout(target, egress))


def _identity(body: bytes, fields: tuple[str, ...]) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The JSON object of a body (None when it is not one) and its identity fields."""
    try:
        document = json.loads(body)
    except ValueError:
        return None, {}
    if not isinstance(document, dict):
        return None, {}
    return document, {
        name: str(document[name])[:200] for name in fields if isinstance(document.get(name), str | int)
    }


def verdict(reply: Reply, endpoint: Endpoint, details: dict[str, str], rejected: str) -> TestResult:
    """Read a verification endpoint's answer as its provider defines success."""
    bad = endpoint.bad_key_answer
    if bad is not None and reply.status == bad[0] and bad[1].encode() in reply.body:
        raise TestFailure(TestCategory.AUTH_FAILED, TestStage.AUTHENTICATE, f"{rejected} rejected", details)
    if not 200 <= reply.status < 300:
        raise status_failure(reply, details, rejected)
    document, identity = _identity(reply.body, endpoint.identity)
    if endpoint.reading is Reading.SLACK_OK:
        if document is None or not isinstance(document.get("ok"), bool):
            raise TestFailure(
                TestCategory.UNEXPECTED_RESPONSE,
                TestStage.SAMPLE_OPERATION,
                "answer is not Slack's JSON",
                details,
            )
        if not document["ok"]:
            raise _slack_failure(document.get("error"), details, rejected)
    verified = ("endpoint reachable", f"{rejected} accepted", endpoint.operation)
    return passed(
        f"{endpoint.operation}: HTTP {reply.status}", details={**details, **identity}, verified=verified
    )


def _slack_failure(error: object, details: dict[str, str], rejected: str) -> TestFailure:
    # Slack error codes are short snake_case words; anything else is not echoed.
    code = error if isinstance(error, str) and error.replace("_", "").isalnum() and len(error) <= 64 else "?"
    details = {**details, "error": code}
    if code in SLACK_AUTH_ERRORS:
        return TestFailure(
            TestCategory.AUTH_FAILED, TestStage.AUTHENTICATE, f"{rejected} rejected: {code}", details
        )
    if code in SLACK_PERMISSION_ERRORS:
        return TestFailure(
            TestCategory.PERMISSION_DENIED, TestStage.AUTHENTICATE, f"access denied: {code}", details
        )
    return TestFailure(
        TestCategory.UNEXPECTED_RESPONSE, TestStage.SAMPLE_OPERATION, f"Slack error: {code}", details
    )


def _key_headers(endpoint: Endpoint, key: str, sent: SentCredentials) -> dict[str, str]:
    headers = {**endpoint.headers, **_BASE_HEADERS}
    if endpoint.key_style is KeyStyle.BEARER:
        return {**headers, **_bearer(sent, key)}
    return {**headers, endpoint.key_header: key}


async def _call(egress: EgressPolicy, endpoint: Endpoint, url: str, headers: dict[str, str]) -> Reply:
    content = b"" if endpoint.method in ("POST", "PUT") else None
    return await fetch(
        egress,
        endpoint.method,
        url,
        headers,
        budget=egress.settings.total_timeout,
        stage=TestStage.AUTHENTICATE,
        content=content,
        read_body=True,
    )


async def test_api_key(target: Target, egress: EgressPolicy) -> TestResult:
    """`api_key`: call the provider's verification endpoint under `base_url` (or its default)."""
    key = target.secret("api_key")
    base = target.config.get("base_url") or ""
    provider = API_KEY_PROVIDERS.get(target.provider)
    if provider is None:
        if not base:
            raise TestFailure(
                TestCategory.INVALID_CONFIG,
                TestStage.RESOLVE_ADDRESS,
                "provider custom needs a base_url to test",
            )
        return await probe(egress, base, {}, _bearer(target.sent, key), egress.settings.total_timeout)
    endpoint = provider.endpoint
    url = (base or provider.default_base).rstrip("/") + endpoint.url
    reply = await _call(egress, endpoint, url, _key_headers(endpoint, key, target.sent))
    return verdict(reply, endpoint, details_of(reply, provider=target.provider), "api key")


def _expiry(target: Target) -> dict[str, str]:
    stamp = target.config.get("expires_at")
    if not stamp:
        return {}
    try:
        when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return {}
    return {"token_expired_at": str(stamp)} if when <= datetime.now(UTC) else {"token_expires_at": str(stamp)}


async def test_oauth2(target: Target, egress: EgressPolicy) -> TestResult:
    """`oauth2`: call the provider's user-info endpoint or `verify_url` with the stored token.

    A client_credentials connection asks the token endpoint for a token first: that request is
    what tests its client id and secret. The token serves this test only (testing is not editing);
    with no `verify_url` the test ends there, as there is no user whose info could be read.
    """
    if target.config.get("grant_type") == "client_credentials":
        token = await _client_credentials_token(target, egress)
        if not target.config.get("verify_url"):
            return passed(
                "the token endpoint issued a token for the client credentials",
                TestStage.AUTHENTICATE,
                verified=("token endpoint reachable", "client credentials accepted"),
                not_verified=("the token against an API (set verify_url)",),
            )
        endpoint, expiry = CUSTOM_USERINFO, {}
    else:
        token = target.secret("access_token")
        if not token:
            raise TestFailure(TestCategory.INVALID_CONFIG, TestStage.RESOLVE_ADDRESS, NOT_AUTHORIZED)
        endpoint, expiry = OAUTH2_USERINFO.get(target.provider, CUSTOM_USERINFO), _expiry(target)
    url = target.config.get("verify_url") or endpoint.url
    if not url:
        raise TestFailure(
            TestCategory.INVALID_CONFIG,
            TestStage.RESOLVE_ADDRESS,
            "provider custom needs a verify_url to test",
        )
    reply = await _call(egress, endpoint, url, _key_headers(endpoint, token, target.sent))
    details = details_of(reply, provider=target.provider, **expiry)
    try:
        result = verdict(reply, endpoint, details, "access token")
    except TestFailure as failure:
        if "token_expired_at" in expiry and failure.result.category is TestCategory.AUTH_FAILED:
            raise TestFailure(
                TestCategory.AUTH_FAILED,
                TestStage.AUTHENTICATE,
                f"access token rejected; it expired at {expiry['token_expired_at']}",
                failure.result.details,
            ) from None
        raise
    # Refresh is not exercised here: the OAuth flows own it.
    return passed(
        result.message, details=result.details, verified=result.verified, not_verified=("refresh token",)
    )


async def _client_credentials_token(target: Target, egress: EgressPolicy) -> str:
    """A token from the client credentials grant, kept in `target.sent` so that echoes are scrubbed."""
    provider = oauth.provider_for(target.provider, target.config)
    client = oauth.ClientCredentials(str(target.config.get("client_id", "")), target.secret("client_secret"))
    scopes = list(provider.default_scopes)  # the config's `scopes` when it sets them (`provider_for`)
    try:
        tokens = await oauth.client_credentials_token(
            egress, provider, client, scopes, now=datetime.now(UTC), default_lifetime=_ANY_LIFETIME
        )
    except oauth.OAuthError as exc:
        # The message never carries the provider's description (it may echo what was sent).
        if exc.kind == "transient":
            raise TestFailure(TestCategory.UNEXPECTED_RESPONSE, TestStage.AUTHENTICATE, str(exc)) from None
        if exc.error:  # the provider's error code, a validated token: invalid_client, invalid_scope...
            refused = f"the token endpoint refused the client credentials ({exc.error})"
            raise TestFailure(TestCategory.AUTH_FAILED, TestStage.AUTHENTICATE, refused) from None
        raise TestFailure(TestCategory.INVALID_CONFIG, TestStage.AUTHENTICATE, str(exc)) from None
    return target.sent.obtained(tokens.access_token)
