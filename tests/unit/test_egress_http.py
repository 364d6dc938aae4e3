"""The policy's HTTP client: checked redirects, credentials on cross-origin hops, the byte cap.

These use httpx.MockTransport (no sockets); tests/integration/test_egress.py repeats
the important ones against real servers on loopback.
"""

from __future__ import annotations

import gzip
import ssl
from collections.abc import Callable

import httpx
import pytest

from broker.egress import Blocked, EgressPolicy, EgressSettings, ResponseTooLarge
from broker.egress.http import http_client, read_body, request

Handler = Callable[[httpx.Request], httpx.Response]


async def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError("unit tests must not resolve")


def make_policy(**settings: object) -> EgressPolicy:
    return EgressPolicy(EgressSettings(**settings), resolver=no_dns)  # type: ignore[arg-type]


class Recorder:
    """A mock server: routes by URL, records every request it received."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.seen: list[httpx.Request] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.seen.append(req)
        handler = self.routes.get(str(req.url.copy_with(query=None)))
        return handler(req) if handler else httpx.Response(404)

    def client(self, policy: EgressPolicy | None = None, **kwargs: object) -> httpx.AsyncClient:
        return http_client(policy or make_policy(), transport=httpx.MockTransport(self), **kwargs)


def redirect(location: str, status: int = 302) -> Handler:
    return lambda req: httpx.Response(status, headers={"Location": location})


def ok(body: bytes = b"ok") -> Handler:
    return lambda req: httpx.Response(200, content=body)


def test_http_client_refuses_options_that_bypass_the_policy() -> None:
    policy = make_policy()
    refused: list[dict[str, object]] = [
        {"proxy": "http://p:3128"},
        {"mounts": {}},
        {"trust_env": True},
        {"uds": "/x"},
    ]
    for kwargs in refused:
        with pytest.raises(TypeError, match="bypass"):
            http_client(policy, **kwargs)
    with pytest.raises(TypeError, match="MockTransport"):
        http_client(policy, transport=httpx.AsyncHTTPTransport())


async def test_transport_options_reach_the_policy_transport() -> None:
    async with http_client(make_policy(), verify=False) as client:
        pool = client._transport._pool  # type: ignore[attr-defined]
        assert pool._ssl_context.verify_mode == ssl.CERT_NONE
        assert type(pool._network_backend).__name__ == "_PolicyBackend"


@pytest.mark.parametrize(
    "url",
    [
        "http://0xa9fea9fe/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://user:pw@example.com/",
        "http://169.254.169.254@evil.example/",
    ],
)
async def test_every_request_is_checked_before_it_is_sent(url: str) -> None:
    server = Recorder({})
    async with server.client() as client:
        with pytest.raises(Blocked):
            await client.get(url)
    assert server.seen == []


async def test_allow_hosts_applies_to_plain_client_calls() -> None:
    server = Recorder({"http://api.example/": ok()})
    async with server.client(make_policy(allow_hosts=("api.example",))) as client:
        assert (await client.get("http://api.example/")).status_code == 200
        with pytest.raises(Blocked, match="allow_hosts"):
            await client.get("http://other.example/")
    assert len(server.seen) == 1


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://2852039166/",
        "http://[fd00:ec2::254]/",
        "http://metadata.example@169.254.169.254/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "http://not-allowed.example/",
        # Spellings httpx itself refuses: the policy reads them first, as the address.
        "http://0251.0376.0251.0376/",
        "http://0251.254.169.254/",
        "http://%31%36%39.254.169.254/",
        "//0xa9fea9fe/",
    ],
)
async def test_a_redirect_to_a_refused_target_is_not_followed(location: str) -> None:
    server = Recorder({"http://api.example/start": redirect(location)})
    async with server.client(make_policy(allow_hosts=("api.example",))) as client:
        with pytest.raises(Blocked):
            await request(client, "GET", "http://api.example/start")
    assert [str(r.url) for r in server.seen] == ["http://api.example/start"]


async def test_an_odd_spelling_of_an_allowed_address_is_sent_in_standard_form() -> None:
    server = Recorder(
        {
            "http://127.0.0.1:8080/start": redirect("http://0177.0.0.1:8080/next?k=v"),
            "http://127.0.0.1:8080/next": ok(),
        }
    )
    policy = make_policy(allow_loopback=True)
    async with server.client(policy) as client:
        response = await request(client, "GET", "http://\uff11\uff12\uff17.1:8080/start")
    assert response.content == b"ok"
    assert [str(r.url) for r in server.seen] == [
        "http://127.0.0.1:8080/start",
        "http://127.0.0.1:8080/next?k=v",
    ]
    assert server.seen[0].headers["host"] == "127.0.0.1:8080"


async def test_redirects_are_followed_up_to_the_limit() -> None:
    server = Recorder(
        {
            "http://a.example/1": redirect("/2", 301),
            "http://a.example/2": redirect("http://a.example/3", 308),
            "http://a.example/3": ok(b"done"),
        }
    )
    async with server.client(make_policy(max_redirects=2)) as client:
        response = await request(client, "GET", "http://a.example/1")
        assert response.content == b"done" and [r.status_code for r in response.history] == [301, 308]
    async with server.client(make_policy(max_redirects=1)) as client:
        with pytest.raises(httpx.TooManyRedirects):
            await request(client, "GET", "http://a.example/1")
    async with server.client(make_policy(max_redirects=0)) as client:
        with pytest.raises(httpx.TooManyRedirects):
            await request(client, "GET", "http://a.example/1")


SECRET_HEADERS = {"Authorization": "Bearer s3cret", "X-Api-Key": "k3y", "Cookie": "session=abc"}


async def test_credentials_stay_on_the_same_origin() -> None:
    server = Recorder({"http://a.example/1": redirect("/2"), "http://a.example/2": ok()})
    async with server.client() as client:
        await request(client, "GET", "http://a.example/1", headers=SECRET_HEADERS)
    assert [r.headers.get("authorization") for r in server.seen] == ["Bearer s3cret"] * 2
    assert server.seen[1].headers["x-api-key"] == "k3y" and server.seen[1].headers["cookie"] == "session=abc"


@pytest.mark.parametrize(
    "target",
    ["http://b.example/land", "https://a.example/land", "http://a.example:8080/land"],
)
async def test_cross_origin_redirects_drop_credentials(target: str) -> None:
    server = Recorder({"http://a.example/1": redirect(target), target: redirect("http://a.example/back")})
    server.routes["http://a.example/back"] = ok()
    async with server.client(headers={"Authorization": "Bearer client-level"}) as client:
        response = await request(
            client,
            "GET",
            "http://a.example/1",
            headers={
                "X-Api-Key": "k3y",
                "Cookie": "session=abc",
                "User-Agent": "broker-test",
                "Accept": "x/y",
            },
        )
    assert response.status_code == 200 and len(server.seen) == 3
    first, hop, back = server.seen
    assert first.headers["authorization"] == "Bearer client-level" and first.headers["x-api-key"] == "k3y"
    for later in (hop, back):  # once the chain left the origin, coming back does not restore them
        assert "authorization" not in later.headers
        assert "x-api-key" not in later.headers and "cookie" not in later.headers
        assert later.headers["user-agent"] == "broker-test" and later.headers["accept"] == "x/y"


async def test_auth_flows_are_not_applied_on_other_origins() -> None:
    server = Recorder({"http://a.example/1": redirect("http://b.example/2"), "http://b.example/2": ok()})
    async with server.client() as client:
        await request(client, "GET", "http://a.example/1", auth=("user", "pw"))
    assert server.seen[0].headers["authorization"].startswith("Basic ")
    assert "authorization" not in server.seen[1].headers


async def test_redirect_methods_and_bodies() -> None:
    server = Recorder(
        {
            "http://a.example/see-other": redirect("/landing", 303),
            "http://a.example/temporary": redirect("/landing", 307),
            "http://a.example/elsewhere": redirect("http://b.example/landing", 307),
            "http://a.example/landing": ok(),
        }
    )
    async with server.client() as client:
        await request(client, "POST", "http://a.example/see-other", json={"a": 1})
        assert (server.seen[-1].method, server.seen[-1].content) == ("GET", b"")
        assert "content-type" not in server.seen[-1].headers
        await request(client, "POST", "http://a.example/temporary", content=b"payload")
        assert (server.seen[-1].method, server.seen[-1].content) == ("POST", b"payload")
        # Resending a body (it may hold a client secret) to another origin is refused.
        with pytest.raises(Blocked, match="another origin"):
            await request(client, "POST", "http://a.example/elsewhere", content=b"client_secret=x")
    assert "http://b.example/landing" not in [str(r.url) for r in server.seen]


async def test_request_needs_a_policy_client() -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(ok())) as plain:
        with pytest.raises(TypeError, match="http_client"):
            await request(plain, "GET", "http://a.example/")


async def test_a_bad_redirect_location_is_a_protocol_error_and_not_followed() -> None:
    server = Recorder({"http://a.example/1": redirect("http://[::1/")})
    async with server.client() as client:
        with pytest.raises(httpx.RemoteProtocolError, match="location"):
            await request(client, "GET", "http://a.example/1")
    assert len(server.seen) == 1


async def test_the_body_cap_raises_or_truncates() -> None:
    server = Recorder({"http://a.example/big": ok(b"x" * 5000), "http://a.example/small": ok(b"y" * 100)})
    async with server.client(make_policy(max_response_bytes=100)) as client:
        assert (await request(client, "GET", "http://a.example/small")).content == b"y" * 100
        with pytest.raises(ResponseTooLarge, match="exceeds 100 bytes"):
            await request(client, "GET", "http://a.example/big")
        cut = await request(client, "GET", "http://a.example/big", truncate=True)
        assert cut.content == b"x" * 100 and cut.is_closed


async def test_the_cap_counts_decompressed_bytes() -> None:
    bomb = gzip.compress(b"\0" * 2_000_000)
    assert len(bomb) < 10_000
    server = Recorder(
        {
            "http://a.example/": lambda req: httpx.Response(
                200, headers={"Content-Encoding": "gzip"}, content=bomb
            )
        }
    )
    async with server.client(make_policy(max_response_bytes=50_000)) as client:
        with pytest.raises(ResponseTooLarge):
            await request(client, "GET", "http://a.example/")


async def test_read_body_on_a_streamed_response() -> None:
    server = Recorder({"http://a.example/": ok(b"z" * 300)})
    async with server.client() as client, client.stream("GET", "http://a.example/") as response:
        assert await read_body(response, 1000) == b"z" * 300
        assert response.text == "z" * 300
    async with server.client() as client, client.stream("GET", "http://a.example/") as response:
        with pytest.raises(ResponseTooLarge):
            await read_body(response, 10)
        assert response.is_closed


async def test_request_with_a_policy_makes_its_own_client() -> None:
    with pytest.raises(Blocked):
        await request(make_policy(), "GET", "http://169.254.169.254/")
