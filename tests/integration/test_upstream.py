"""One proxied HTTP call (`service/upstream.py`) against real loopback servers: the credential
reaches the upstream, never comes back, and nothing the caller sends can override it."""

from __future__ import annotations

import base64
import gzip
import json
import time
import tracemalloc
import zlib
from typing import Any

import pytest

from broker.egress import Blocked, EgressPolicy, EgressSettings
from broker.errors import FailedPrecondition, InvalidArgument
from broker.scrub import MASK
from broker.sensitive import SecretFields
from broker.service.upstream import (
    Injection,
    UpstreamAnswer,
    UpstreamRequest,
    call,
    injection,
    pooled_client,
    stream,
    under_base,
)
from broker.testers import webhook
from tests.httpservers import Answer, Seen, serve

TOKEN = "tok-Secret/With+Slash-4711"
LOOPBACK = EgressPolicy(EgressSettings(allow_loopback=True))


def bearer(url: str, **config: Any) -> Injection:
    config = {"base_url": url, "auth_type": "bearer", **config}
    return injection("http", "", config, SecretFields({"token": TOKEN}))


def x_api_key(url: str) -> Injection:
    """An `http` connection sending its key in `X-Api-Key`."""
    config = {"base_url": url, "auth_type": "api_key", "api_key_header": "X-Api-Key"}
    return injection("http", "", config, SecretFields({"api_key_value": TOKEN}))


def violations(caught: pytest.ExceptionInfo[InvalidArgument]) -> set[str]:
    return {v.field for v in caught.value.violations}


def echo(seen: Seen) -> Answer:
    """Everything an upstream might echo back, in the forms a client would find it."""
    received = seen.headers.get("authorization", "") + seen.headers.get("x-api-key", "")
    document = {"you_sent": received, "path": seen.path}
    # As an encoder that escapes "/" writes it (PHP's json_encode does).
    escaped = TOKEN.replace("/", "\\/")
    body = json.dumps(document)[:-1] + f', "escaped": "{escaped}"}}'
    headers = {
        "Content-Type": "application/json",
        "X-Echo": received,
        "X-Token-B64": base64.b64encode(TOKEN.encode()).decode(),
    }
    return Answer(200, body.encode(), headers)


async def test_the_credential_reaches_the_upstream_and_never_comes_back() -> None:
    with serve(echo) as upstream:
        answer = await call(
            LOOPBACK,
            bearer(upstream.url, headers={"X-Team": "data"}),
            UpstreamRequest("GET", "/v1/items", "page=2&q=a%20b", (("Accept", "application/json"),)),
            max_bytes=65536,
        )
    [seen] = upstream.requests
    assert seen.headers["authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["x-team"] == "data" and seen.headers["accept"] == "application/json"
    assert seen.path == "/v1/items?page=2&q=a%20b"
    assert answer.status == 200
    body = json.loads(answer.body)
    assert body == {"you_sent": MASK, "path": "/v1/items?page=2&q=a%20b", "escaped": MASK}
    headers = dict(answer.headers)
    assert headers["x-echo"] == MASK and headers["x-token-b64"] == MASK
    assert TOKEN.encode() not in answer.body + str(answer.headers).encode()


async def test_basic_and_provider_keys_are_injected_and_their_composed_forms_masked(tmp_path: Any) -> None:
    with serve(echo) as upstream:
        basic = injection(
            "http",
            "",
            {"base_url": upstream.url, "auth_type": "basic", "username": "ann"},
            SecretFields({"password": TOKEN}),
        )
        answer = await call(LOOPBACK, basic, UpstreamRequest("GET", "/"), max_bytes=65536)
        anthropic = injection(
            "api_key", "anthropic", {"base_url": upstream.url}, SecretFields({"api_key": TOKEN})
        )
        await call(LOOPBACK, anthropic, UpstreamRequest("POST", "/v1/messages", body=b"{}"), max_bytes=65536)
    pair = base64.b64encode(f"ann:{TOKEN}".encode()).decode()
    assert upstream.requests[0].headers["authorization"] == f"Basic {pair}"
    assert pair not in answer.body.decode() and dict(answer.headers)["x-echo"] == MASK
    sent = upstream.requests[1]
    assert sent.headers["x-api-key"] == TOKEN and sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers and sent.body == b"{}"


async def test_a_providers_default_headers_give_way_to_the_callers() -> None:
    with serve(echo) as upstream:
        anthropic = injection(
            "api_key", "anthropic", {"base_url": upstream.url}, SecretFields({"api_key": TOKEN})
        )
        newer = UpstreamRequest("GET", "/v1/models", headers=(("Anthropic-Version", "2025-01-01"),))
        await call(LOOPBACK, anthropic, newer, max_bytes=65536)
    [seen] = upstream.requests
    assert seen.headers["anthropic-version"] == "2025-01-01" and seen.headers["x-api-key"] == TOKEN


async def test_the_caller_cannot_set_the_credential_or_framing_headers() -> None:
    with serve(echo) as upstream:
        api_key = x_api_key(upstream.url)
        refused = (
            ("x-API-key", "mine"),
            ("Authorization", "Bearer mine"),
            ("Cookie", "a=b"),
            ("Host", "evil"),
        )
        with pytest.raises(InvalidArgument) as caught:
            await call(LOOPBACK, api_key, UpstreamRequest("GET", "/", headers=refused), max_bytes=100)
        with pytest.raises(InvalidArgument) as framing:
            headers = (("Transfer-Encoding", "chunked"), ("bad name", "x"), ("X-Ok", "line\r\nbreak"))
            await call(LOOPBACK, api_key, UpstreamRequest("POST", "/", headers=headers), max_bytes=100)
    assert violations(caught) == {f"headers[{i}].name" for i in range(4)}
    assert violations(framing) == {"headers[0].name", "headers[1].name", "headers[2].value"}
    assert upstream.requests == []  # nothing was sent


@pytest.mark.parametrize(
    "path",
    [
        "v1/x",
        "//evil.example/x",
        "/a/../admin",
        "/a/%2e%2e/admin",
        "/a%2Fb",
        "/a\\b",
        "/a b",
        "/a?x=1",
        "/" + "a" * 3000,
    ],
)
async def test_paths_that_could_leave_the_base_url_are_refused(path: str) -> None:
    with serve(echo) as upstream, pytest.raises(InvalidArgument) as caught:
        await call(LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", path), max_bytes=100)
    assert violations(caught) == {"path"} and upstream.requests == []


async def test_a_redirect_is_the_answer_and_its_location_is_scrubbed() -> None:
    def redirect(seen: Seen) -> Answer:
        return Answer(302, b"", {"Location": f"https://elsewhere.example/cb?token={TOKEN}"})

    with serve(redirect) as upstream:
        answer = await call(LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", "/login"), max_bytes=100)
    assert answer.status == 302 and len(upstream.requests) == 1
    assert dict(answer.headers)["location"] == f"https://elsewhere.example/cb?token={MASK}"


@pytest.mark.parametrize("location", ["/next?t={}", "/p/{}", "next/{}"])
async def test_a_relative_location_comes_back_as_sent_and_scrubbed(location: str) -> None:
    # httpx makes a relative Location absolute, percent-encoding a space but not "!": scrubbed
    # after that, a secret holding both was in none of the forms the scrubber knows.
    secret = "correct horse battery staple!"

    def redirect(seen: Seen) -> Answer:
        return Answer(302, b"", {"Location": location.format(secret)})

    with serve(redirect) as upstream:
        config = {"base_url": upstream.url, "auth_type": "bearer"}
        key = injection("http", "", config, SecretFields({"token": secret}))
        answer = await call(LOOPBACK, key, UpstreamRequest("GET", "/login"), max_bytes=100)
        streamed = [
            part async for part in stream(LOOPBACK, key, UpstreamRequest("GET", "/login"), max_bytes=100)
        ]
    head = next(part for part in streamed if isinstance(part, UpstreamAnswer))
    for headers in (answer.headers, head.headers):
        assert dict(headers)["location"] == location.format(MASK), headers


async def test_a_429_comes_back_at_once_and_is_not_retried() -> None:
    def busy(seen: Seen) -> Answer:
        return Answer(429, b"slow down", {"Retry-After": "3600"})

    with serve(busy) as upstream:
        started = time.monotonic()
        answer = await call(
            LOOPBACK, bearer(upstream.url), UpstreamRequest("POST", "/jobs", body=b"x"), max_bytes=100
        )
    assert answer.status == 429 and dict(answer.headers)["retry-after"] == "3600"
    assert len(upstream.requests) == 1 and time.monotonic() - started < 2


async def test_a_compressed_body_is_decoded_scrubbed_and_capped() -> None:
    def zipped(seen: Seen) -> Answer:
        return Answer(200, gzip.compress(f"token={TOKEN};".encode() * 10), {"Content-Encoding": "gzip"})

    with serve(zipped) as upstream:
        answer = await call(LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", "/"), max_bytes=4096)
        with pytest.raises(FailedPrecondition, match="larger than 100 bytes"):
            await call(LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", "/"), max_bytes=100)
    assert answer.body == f"token={MASK};".encode() * 10
    assert "content-encoding" not in dict(answer.headers)


async def test_the_egress_policy_applies() -> None:
    with serve(echo) as upstream, pytest.raises(Blocked):
        await call(
            EgressPolicy(EgressSettings()),
            bearer(upstream.url),
            UpstreamRequest("GET", "/"),
            max_bytes=100,
        )
    assert upstream.requests == []


def test_types_without_injection_say_so() -> None:
    for kind in ("database", "smtp", "mcp"):
        with pytest.raises(FailedPrecondition, match=f"not built yet for {kind}"):
            injection(kind, "", {"base_url": "https://x.example"}, SecretFields({}))
    with pytest.raises(FailedPrecondition, match="no access token yet"):
        injection("http", "", {"base_url": "https://x.example", "auth_type": "oauth2"}, SecretFields({}))


async def test_a_webhook_takes_signed_bodies_to_its_one_url_only() -> None:
    with serve(lambda seen: Answer(204)) as upstream:
        hook = injection(
            "webhook",
            "",
            {"url": f"{upstream.url}/hooks/abc", "auth_type": "hmac", "method": "POST"},
            SecretFields({"auth_secret": TOKEN}),
        )
        body = b'{"event": "deployed"}'
        answer = await call(LOOPBACK, hook, UpstreamRequest("POST", "/", body=body), max_bytes=100)
        for bad, field in (
            (UpstreamRequest("PUT", "/", body=body), "method"),
            (UpstreamRequest("POST", "/other", body=body), "path"),
            (UpstreamRequest("POST", "/", query="a=1", body=body), "path"),
            (UpstreamRequest("POST", "/", headers=(("X-Broker-Signature", "sha256=00"),)), "headers[0].name"),
        ):
            with pytest.raises(InvalidArgument) as caught:
                await call(LOOPBACK, hook, bad, max_bytes=100)
            assert field in violations(caught)
    [seen] = upstream.requests
    assert (answer.status, seen.path, seen.body) == (204, "/hooks/abc", body)
    stamp, signature = seen.headers["x-broker-timestamp"], seen.headers["x-broker-signature"]
    assert webhook.verify_signature(TOKEN, stamp, body, signature, now=int(stamp))


async def test_the_pooled_client_keeps_no_cookies_between_calls() -> None:
    def sets_a_cookie(seen: Seen) -> Answer:
        return Answer(200, b"ok", {"Set-Cookie": "session=abc123; Path=/"})

    client = pooled_client(LOOPBACK)
    async with client:
        with serve(sets_a_cookie) as upstream:
            for _ in range(2):
                await call(client, bearer(upstream.url), UpstreamRequest("GET", "/"), max_bytes=100)
    assert [seen.headers.get("cookie") for seen in upstream.requests] == [None, None]


def test_a_url_under_the_base_url_becomes_a_path_and_any_other_is_refused() -> None:
    base = "https://api.example.com/v1"

    def made(path: str, query: str = "") -> tuple[str, str]:
        request = under_base(UpstreamRequest("GET", path, query), base)
        return request.path, request.query

    assert made("/items", "a=1") == ("/items", "a=1")  # a path stays as it is
    assert made("https://api.example.com/v1/items?page=2&per_page=50") == ("/items", "page=2&per_page=50")
    assert made("https://API.example.com:443/v1") == ("/", "")
    for url in (
        "https://evil.example/v1/items",
        "http://api.example.com/v1/items",  # another scheme is another origin
        "https://api.example.com:8443/v1/items",
        "https://api.example.com/v2/items",  # not under the base path
        "https://api.example.com/v10/items",
        "https://user:pw@api.example.com/v1/items",
        "https://api.example.com/v1/items#frag",
    ):
        with pytest.raises(InvalidArgument) as caught:
            made(url)
        assert violations(caught) == {"path"}, url
    with pytest.raises(InvalidArgument) as both:
        made("https://api.example.com/v1/items", "a=1")
    assert violations(both) == {"query"}


@pytest.mark.parametrize("coding", ["br", "x-compress", "gzip, gzip", "zstd"])
async def test_an_answer_in_an_encoding_the_broker_cannot_read_is_refused_not_passed_on(coding: str) -> None:
    # Compressed bytes pass the scrubber untouched: the executor would decompress the token.
    packed = gzip.compress(f"token={TOKEN}".encode())

    def packs(seen: Seen) -> Answer:
        return Answer(200, packed, {"Content-Encoding": coding})

    with serve(packs) as upstream, pytest.raises(FailedPrecondition, match="content encoding"):
        await call(LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", "/"), max_bytes=65536)
    streamed = []
    with serve(packs) as upstream, pytest.raises(FailedPrecondition, match="content encoding"):
        async for part in stream(
            LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", "/"), max_bytes=65536
        ):
            streamed.append(part)
    assert not any(isinstance(p, bytes) for p in streamed)


async def test_the_broker_asks_only_for_encodings_it_reads_whatever_the_caller_accepts() -> None:
    with serve(echo) as upstream:
        request = UpstreamRequest("GET", "/", headers=(("Accept-Encoding", "br, zstd"),))
        answer = await call(LOOPBACK, bearer(upstream.url), request, max_bytes=65536)
    assert answer.status == 200
    assert upstream.requests[0].headers["accept-encoding"] == "gzip, deflate"


async def test_raw_deflate_and_x_gzip_are_read_and_scrubbed() -> None:
    squeezer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = squeezer.compress(f"token={TOKEN}".encode()) + squeezer.flush()
    answers = {"/raw": (raw_deflate, "deflate"), "/x": (gzip.compress(f"token={TOKEN}".encode()), "x-gzip")}

    def packs(seen: Seen) -> Answer:
        body, coding = answers[seen.path]
        return Answer(200, body, {"Content-Encoding": coding})

    with serve(packs) as upstream:
        for path in answers:
            answer = await call(LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", path), max_bytes=4096)
            assert answer.body == f"token={MASK}".encode(), path


async def test_a_compression_bomb_is_stopped_at_the_cap_without_inflating_it_whole() -> None:
    bomb = gzip.compress(b"\0" * 200_000_000, compresslevel=9)  # ~200 kB on the wire
    with serve(lambda seen: Answer(200, bomb, {"Content-Encoding": "gzip"})) as upstream:
        tracemalloc.start()
        try:
            with pytest.raises(FailedPrecondition, match="larger than 1000000 bytes"):
                await call(LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", "/"), max_bytes=1_000_000)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 20_000_000


async def test_header_names_are_scrubbed_too() -> None:
    secret = "tokHeaderNameCanary4711"

    def names_it(seen: Seen) -> Answer:
        return Answer(200, b"ok", {f"X-{secret}": "1", f"X-Echo-{seen.headers['authorization'][7:]}-b": "2"})

    with serve(names_it) as upstream:
        named = injection(
            "http", "", {"base_url": upstream.url, "auth_type": "bearer"}, SecretFields({"token": secret})
        )
        answer = await call(LOOPBACK, named, UpstreamRequest("GET", "/"), max_bytes=100)
        parts = [p async for p in stream(LOOPBACK, named, UpstreamRequest("GET", "/"), max_bytes=100)]
    for head in (answer, parts[0]):
        assert isinstance(head, UpstreamAnswer)
        assert secret not in str(head.headers)
        assert {"x-[redacted]", "x-echo-[redacted]-b"} <= {name.lower() for name, _ in head.headers}


@pytest.mark.parametrize(
    "path",
    ["/v1/..;/admin", "/v1/.;/x", "/v1/..%3b/admin", "/v1/%252e%252e/admin", "/v1/%252F", "/v1/%255c"],
)
async def test_paths_an_upstream_may_still_resolve_elsewhere_are_refused(path: str) -> None:
    with serve(echo) as upstream, pytest.raises(InvalidArgument) as caught:
        await call(LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", path), max_bytes=100)
    assert violations(caught) == {"path"} and upstream.requests == []


async def test_a_header_spelled_with_underscores_cannot_stand_in_for_the_credentials() -> None:
    # WSGI/CGI servers read `X_Api_Key` and `X-Api-Key` as the same header.
    with serve(echo) as upstream:
        api_key = x_api_key(upstream.url)
        with pytest.raises(InvalidArgument) as caught:
            headers = (("X_Api_Key", "mine"), ("Proxy_Authorization", "x"), ("X_Custom", "ok"))
            await call(LOOPBACK, api_key, UpstreamRequest("GET", "/", headers=headers), max_bytes=100)
    assert violations(caught) == {"headers[0].name", "headers[1].name"}
    assert upstream.requests == []


async def test_headers_that_make_an_upstream_act_on_another_method_path_or_client_are_refused() -> None:
    # A grant scoped to GET /v1/ must not reach DELETE /admin through a framework's override
    # headers (Symfony, IIS, Express and many gateways honour these), nor pass for another
    # client (upstreams that trust forwarded addresses).
    refused = [
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-HTTP-Method", "DELETE"),
        ("X-Method-Override", "DELETE"),
        ("X-Original-URL", "/admin"),
        ("X-Rewrite-URL", "/admin"),
        ("Forwarded", "for=127.0.0.1"),
        ("X-Forwarded-For", "127.0.0.1"),
        ("X-Forwarded-Host", "internal.example"),
        ("x_forwarded_prefix", "/admin"),
        ("X-Real-IP", "127.0.0.1"),
    ]
    with serve(echo) as upstream, pytest.raises(InvalidArgument) as caught:
        headers = (*refused, ("X-Request-Id", "fine"))
        await call(
            LOOPBACK,
            bearer(upstream.url),
            UpstreamRequest("GET", "/v1/x", headers=headers),
            max_bytes=100,
        )
    assert violations(caught) == {f"headers[{i}].name" for i in range(len(refused))}
    assert upstream.requests == []


async def test_a_session_cookie_the_upstream_issues_for_the_credential_is_not_passed_on() -> None:
    # Set for the broker's credential (Grafana, Jenkins and many apps log a Basic or bearer
    # caller in this way), the cookie would let the executor call the upstream directly,
    # outside the grant, its scope and the audit. The proxy never sends caller cookies anyway.
    def logs_in(seen: Seen) -> Answer:
        return Answer(
            200, b"ok", {"Set-Cookie": "grafana_session=9f8e7d6c5b4a; Path=/; HttpOnly", "X-Ok": "1"}
        )

    with serve(logs_in) as upstream:
        answer = await call(LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", "/"), max_bytes=100)
        parts = [
            p
            async for p in stream(LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", "/"), max_bytes=100)
        ]
    for head in (answer, parts[0]):
        assert isinstance(head, UpstreamAnswer)
        names = {name for name, _ in head.headers}
        assert "x-ok" in names and "set-cookie" not in names
        assert "9f8e7d6c5b4a" not in str(head.headers)


FORM = ("Content-Type", "application/x-www-form-urlencoded")
JSON = ("Content-Type", "application/json; charset=utf-8")
MULTIPART = ("Content-Type", "multipart/form-data; boundary=b")


def _multipart(name: str, value: str) -> bytes:
    return f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n--b--\r\n'.encode()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (UpstreamRequest("GET", "/v1/x", query="a=1&_method=DELETE"), "query"),
        (UpstreamRequest("GET", "/v1/x", query="_METHOD=delete"), "query"),
        (UpstreamRequest("POST", "/v1/x", headers=(FORM,), body=b"a=1&_method=DELETE"), "body"),
        (UpstreamRequest("POST", "/v1/x", headers=(JSON,), body=b'{"a": 1, "_method": "DELETE"}'), "body"),
        (
            UpstreamRequest("POST", "/v1/x", headers=(MULTIPART,), body=_multipart("_method", "DELETE")),
            "body",
        ),
    ],
)
async def test_a_method_named_in_a_parameter_is_refused(request_: UpstreamRequest, field: str) -> None:
    """A grant scoped to POST must not become a DELETE on Rails, Laravel or Symfony, which take
    the method from a `_method` form field, query parameter or JSON key."""
    with serve(echo) as upstream, pytest.raises(InvalidArgument) as caught:
        await call(LOOPBACK, bearer(upstream.url), request_, max_bytes=100)
    assert violations(caught) == {field}
    assert upstream.requests == []


@pytest.mark.parametrize(
    "request_",
    [
        UpstreamRequest("GET", "/v1/x", query="x_method=1&method=GET"),
        UpstreamRequest("POST", "/v1/x", headers=(JSON,), body=b'{"note": "send _method=DELETE"}'),
        UpstreamRequest("POST", "/v1/x", headers=(("Content-Type", "text/plain"),), body=b"_method=DELETE"),
        UpstreamRequest("POST", "/v1/x", headers=(MULTIPART,), body=_multipart("_method_x", "1")),
        UpstreamRequest("POST", "/v1/x", headers=(FORM,), body=b"a=_method"),
    ],
)
async def test_text_that_only_mentions_method_is_sent(request_: UpstreamRequest) -> None:
    with serve(echo) as upstream:
        answer = await call(LOOPBACK, bearer(upstream.url), request_, max_bytes=10_000)
    assert answer.status == 200 and len(upstream.requests) == 1


async def test_a_range_of_the_callers_choosing_is_refused() -> None:
    # An honest file server (nginx, S3) answers a Range with that part of a file: one that echoes
    # the credential could be read from inside the secret, where no form of it is left to mask.
    with serve(echo) as upstream, pytest.raises(InvalidArgument) as caught:
        headers = (("Range", "bytes=29-"), ("if_range", '"etag"'), ("Accept", "text/plain"))
        await call(
            LOOPBACK, bearer(upstream.url), UpstreamRequest("GET", "/v1/x", headers=headers), max_bytes=100
        )
    assert violations(caught) == {"headers[0].name", "headers[1].name"}
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("said", "masked"),
    [
        *(
            (b"you sent Bearer " + TOKEN[:-cut].encode(), b"you sent [redacted]")
            for cut in (1, 5, len(TOKEN) - 4)
        ),
        (TOKEN[3:].encode() + b" was the token you sent", b"[redacted] was the token you sent"),
    ],
)
async def test_an_answer_that_stops_or_begins_inside_an_echoed_secret_gives_none_of_it_away(
    said: bytes, masked: bytes
) -> None:
    """An upstream's answer can end inside what it echoes (a Content-Length one short, a dropped
    connection) or begin inside it (a part of a file): what it holds of the secret is masked,
    buffered or streamed."""
    get = UpstreamRequest("GET", "/v1/x")
    with serve(lambda seen: Answer(200, said)) as upstream:
        answer = await call(LOOPBACK, bearer(upstream.url), get, max_bytes=1000)
        streamed = [part async for part in stream(LOOPBACK, bearer(upstream.url), get, max_bytes=1000)]
    body = b"".join(part for part in streamed if isinstance(part, bytes))
    for got in (answer.body, body):
        assert got == masked, got
