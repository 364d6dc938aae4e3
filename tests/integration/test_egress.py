"""The egress policy against real sockets on loopback.

Each refusal is proven by a listening server whose accept count stays 0, next to a
control where the policy allows the same target and the count moves, so the
tests can fail. DNS is always the injected resolver: nothing here queries real DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from broker import pki
from broker.egress import Blocked, EgressPolicy, EgressSettings, ResponseTooLarge
from broker.egress.http import http_client, request
from broker.egress.tcp import open_connection, pinned_tls_context
from broker.model import TestCategory
from broker.sensitive import SecretFields
from broker.testers import Target, run_tester
from broker.testers.base import passed

pytestmark = pytest.mark.integration

Route = tuple[int, dict[str, str], bytes | None]  # status, headers, body (None: endless body)


class FakeDns:
    """An injected resolver: answers from a table, counts the questions."""

    def __init__(self, zone: dict[str, list[str]] | Callable[[str, int], list[str]]) -> None:
        self.zone = zone
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        answers = self.zone(host, len(self.asked)) if callable(self.zone) else self.zone.get(host)
        if not answers:
            raise OSError(f"no such host {host}")
        return answers


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class TinyHttp:
    """An HTTP/1.1 server on loopback that counts connections and records requests.

    One request per connection. `silent` accepts and never answers.
    """

    routes: dict[str, Route] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    tls: ssl.SSLContext | None = None
    silent: bool = False
    accepted: int = 0
    seen: list[Seen] = field(default_factory=list)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> TinyHttp:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str = "/", host: str | None = None) -> str:
        return f"{'https' if self.tls else 'http'}://{host or self.host}:{self.port}{path}"

    async def stop(self) -> None:
        self._closing.set()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.silent:
                await self._closing.wait()
                return
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
            lines = head.split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = dict(
                (k.strip().lower(), v.strip()) for k, v in (li.split(":", 1) for li in lines[1:] if li)
            )
            self.seen.append(Seen(method, path, headers))
            status, extra, body = self.routes.get(path, (404, {}, b"not found"))
            head_out = [f"HTTP/1.1 {status} X", "Connection: close"] + [f"{k}: {v}" for k, v in extra.items()]
            if body is not None:
                head_out.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(head_out) + "\r\n\r\n").encode())
            if body is not None:
                writer.write(body)
                await writer.drain()
                return
            for _ in range(20_000):  # an "endless" body (up to 1.3 GB) until the client hangs up
                writer.write(b"x" * 65536)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@pytest.fixture
async def servers() -> AsyncIterator[Callable[..., Awaitable[TinyHttp]]]:
    started: list[TinyHttp] = []

    async def start(**kwargs: object) -> TinyHttp:
        server = await TinyHttp(**kwargs).start()  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def make_policy(dns: FakeDns | None = None, **settings: object) -> EgressPolicy:
    return EgressPolicy(EgressSettings(**settings), resolver=dns or FakeDns({}))  # type: ignore[arg-type]


async def settle() -> None:
    """Give the server's accept callback a chance to run, so a count of 0 means no connection."""
    await asyncio.sleep(0.05)


# --- refused without a packet being sent -------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "[::ffff:127.0.0.1]", "svc.test", "127.1", "2130706433", "0x7f000001", " 127.0.0.1. "],
)
async def test_loopback_targets_are_refused_without_a_connection(
    servers: Callable[..., Awaitable[TinyHttp]], host: str
) -> None:
    server = await servers(routes={"/": (200, {}, b"hello")})
    dns = FakeDns({"svc.test": ["127.0.0.1"]})
    blocked = make_policy(dns)
    url = f"http://{host.strip()}:{server.port}/"
    with pytest.raises(Blocked, match="allow_loopback"):
        await request(blocked, "GET", url)
    async with http_client(blocked) as client:
        with pytest.raises(Blocked):
            await client.get(url)
    with pytest.raises(Blocked):
        await open_connection(blocked, host, server.port)
    await settle()
    assert server.accepted == 0

    # Control: the same target with loopback allowed does connect, so the count is live.
    if host != "[::ffff:127.0.0.1]":  # the mapped form needs a dual-stack socket to reach 127.0.0.1
        response = await request(make_policy(dns, allow_loopback=True), "GET", url)
        assert response.content == b"hello" and server.accepted == 1


async def test_the_runner_reports_blocked_by_policy_and_nothing_connects(
    servers: Callable[..., Awaitable[TinyHttp]],
) -> None:
    server = await servers(routes={"/": (200, {}, b"hello")})

    async def fetch(target: Target, egress: EgressPolicy) -> object:
        response = await request(egress, "GET", target.config["url"])
        return passed(f"HTTP {response.status_code}")

    target = Target("http", "generic", {"url": server.url()}, SecretFields({}))
    result = await run_tester(fetch, target, make_policy())  # type: ignore[arg-type]
    assert result.category is TestCategory.BLOCKED_BY_POLICY and "127.0.0.1" in result.message
    await settle()
    assert server.accepted == 0
    result = await run_tester(fetch, target, make_policy(allow_loopback=True))  # type: ignore[arg-type]
    assert result.success and server.accepted == 1


@pytest.mark.parametrize(
    "answers", [["93.184.215.14", "127.0.0.1"], ["127.0.0.1", "93.184.215.14"], ["8.8.8.8", "::1"]]
)
async def test_a_rebinding_answer_blocks_the_host_and_nothing_connects(
    servers: Callable[..., Awaitable[TinyHttp]], answers: list[str]
) -> None:
    server = await servers()
    policy = make_policy(FakeDns({"rebind.test": answers}))
    with pytest.raises(Blocked, match=r"rebind\.test resolves to a blocked address"):
        await request(policy, "GET", f"http://rebind.test:{server.port}/")
    with pytest.raises(Blocked):
        await open_connection(policy, "rebind.test", server.port)
    await settle()
    assert server.accepted == 0


async def test_the_name_is_resolved_once_and_the_checked_address_is_the_one_connected(
    servers: Callable[..., Awaitable[TinyHttp]],
) -> None:
    # A rebinding resolver: the first answer is allowed, every later one is denied.
    good = await servers(routes={"/": (200, {}, b"good")})
    evil = await servers(host="127.0.0.2", port=good.port, routes={"/": (200, {}, b"evil")})
    dns = FakeDns(lambda host, n: ["127.0.0.1"] if n == 1 else ["127.0.0.2"])
    policy = make_policy(dns, allow_loopback=True, deny_cidrs=("127.0.0.2/32",))
    response = await request(policy, "GET", f"http://flip.test:{good.port}/")
    assert response.content == b"good"
    assert dns.asked == ["flip.test"] and good.accepted == 1 and evil.accepted == 0
    assert good.seen[0].headers["host"] == f"flip.test:{good.port}"  # the name, not the address
    with pytest.raises(Blocked, match="deny_cidrs"):  # the second resolution is denied
        await open_connection(policy, "flip.test", good.port)
    await settle()
    assert evil.accepted == 0


# --- redirects --------------------------------------------------------------------------


async def test_redirects_to_blocked_targets_are_refused(servers: Callable[..., Awaitable[TinyHttp]]) -> None:
    denied = await servers(host="127.0.0.2", routes={"/": (200, {}, b"should not be reached")})
    start = await servers(
        routes={
            "/metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
            "/mapped": (302, {"Location": "http://[::ffff:169.254.169.254]/"}, b""),
            "/denied": (307, {"Location": f"http://internal.test:{denied.port}/"}, b""),
            "/ok": (301, {"Location": "/landing"}, b""),
            "/landing": (200, {}, b"landed"),
        }
    )
    policy = make_policy(
        FakeDns({"internal.test": ["127.0.0.2"]}), allow_loopback=True, deny_cidrs=("127.0.0.2/32",)
    )
    for path in ("/metadata", "/mapped"):
        with pytest.raises(Blocked, match=r"169\.254\.169\.254"):
            await request(policy, "GET", start.url(path))
    with pytest.raises(Blocked, match="deny_cidrs"):
        await request(policy, "GET", start.url("/denied"))
    await settle()
    assert denied.accepted == 0
    response = await request(policy, "GET", start.url("/ok"))  # control: an allowed hop is followed
    assert response.content == b"landed" and [s.path for s in start.seen][-2:] == ["/ok", "/landing"]


async def test_a_cross_origin_redirect_drops_authorization(
    servers: Callable[..., Awaitable[TinyHttp]],
) -> None:
    other = await servers(routes={"/land": (200, {}, b"other")})
    start = await servers(
        routes={
            "/same": (302, {"Location": "/next"}, b""),
            "/next": (200, {}, b"same"),
            "/away": (302, {"Location": f"http://other.test:{other.port}/land"}, b""),
        }
    )
    policy = make_policy(FakeDns({"other.test": ["127.0.0.1"]}), allow_loopback=True)
    secret = {"Authorization": "Bearer s3cret", "X-Api-Key": "k3y"}
    await request(policy, "GET", start.url("/same"), headers=secret)
    assert [s.headers.get("authorization") for s in start.seen] == ["Bearer s3cret"] * 2
    await request(policy, "GET", start.url("/away"), headers=secret)
    assert start.seen[-1].headers["authorization"] == "Bearer s3cret"
    assert other.seen[0].path == "/land"
    assert "authorization" not in other.seen[0].headers and "x-api-key" not in other.seen[0].headers


# --- TLS still verifies the host name ---------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    ca, ca_key = pki.create_ca("egress test CA")
    cert, key = pki.issue_server_cert(ca, ca_key, ["localhost"])
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    return ca.decode(), folder / "cert.pem", folder / "key.pem"


def server_context(tls_files: tuple[str, Path, Path], sni: list[str | None]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files[1], tls_files[2])
    context.sni_callback = lambda sock, name, ctx: sni.append(name)
    return context


async def test_pinned_tls_context_verifies_the_host_name_on_a_connection_to_the_ip(
    servers: Callable[..., Awaitable[TinyHttp]], tls_files: tuple[str, Path, Path]
) -> None:
    sni: list[str | None] = []
    server = await servers(tls=server_context(tls_files, sni), silent=True)
    ca = tls_files[0]
    policy = make_policy(
        FakeDns({"localhost": ["127.0.0.1"], "wrong.test": ["127.0.0.1"]}), allow_loopback=True
    )

    _, writer = await open_connection(
        policy, "localhost", server.port, tls=pinned_tls_context("localhost", cadata=ca)
    )
    assert writer.get_extra_info("peername")[0] == "127.0.0.1"
    writer.close()
    await writer.wait_closed()

    # A driver that connects by IP and passes the IP as server_hostname: the context
    # still sends SNI for, and verifies, the host name.
    _, writer = await asyncio.open_connection(
        "127.0.0.1", server.port, ssl=pinned_tls_context("localhost", cadata=ca), server_hostname="127.0.0.1"
    )
    writer.close()
    await writer.wait_closed()
    assert sni == ["localhost", "localhost"]

    # Control: an ordinary context would check the certificate against the IP and fail.
    plain = ssl.create_default_context(cadata=ca)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"127\.0\.0\.1"):
        await asyncio.open_connection("127.0.0.1", server.port, ssl=plain, server_hostname="127.0.0.1")

    # A certificate for another name fails, whichever way the socket was opened.
    with pytest.raises(ssl.SSLCertVerificationError, match=r"wrong\.test"):
        await open_connection(
            policy, "wrong.test", server.port, tls=pinned_tls_context("wrong.test", cadata=ca)
        )
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            "127.0.0.1",
            server.port,
            ssl=pinned_tls_context("wrong.test", cadata=ca),
            server_hostname="127.0.0.1",
        )
    # And an unknown CA fails too.
    with pytest.raises(ssl.SSLCertVerificationError):
        await open_connection(
            policy, "localhost", server.port, tls=pinned_tls_context("localhost", cadata=None)
        )


async def test_the_http_client_verifies_the_url_host_name(
    servers: Callable[..., Awaitable[TinyHttp]], tls_files: tuple[str, Path, Path]
) -> None:
    sni: list[str | None] = []
    server = await servers(tls=server_context(tls_files, sni), routes={"/": (200, {}, b"secure")})
    policy = make_policy(
        FakeDns({"localhost": ["127.0.0.1"], "wrong.test": ["127.0.0.1"]}), allow_loopback=True
    )
    verify = ssl.create_default_context(cadata=tls_files[0])
    async with http_client(policy, verify=verify) as client:
        response = await request(client, "GET", f"https://localhost:{server.port}/")
        assert response.content == b"secure" and sni == ["localhost"]
        with pytest.raises(httpx.ConnectError, match=r"wrong\.test"):
            await request(client, "GET", f"https://wrong.test:{server.port}/")


# --- how much and how long --------------------------------------------------------------


async def test_the_byte_cap_stops_reading_an_endless_body(
    servers: Callable[..., Awaitable[TinyHttp]],
) -> None:
    server = await servers(routes={"/endless": (200, {}, None), "/big": (200, {}, b"y" * 300_000)})
    policy = make_policy(allow_loopback=True, max_response_bytes=100_000, total_timeout=10)
    started = time.monotonic()
    with pytest.raises(ResponseTooLarge, match="100000"):
        await request(policy, "GET", server.url("/endless"))
    cut = await request(policy, "GET", server.url("/big"), truncate=True)
    assert cut.content == b"y" * 100_000
    assert time.monotonic() - started < 5


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port whose accept queue is full: further SYNs are dropped, so connecting hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.3)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            pytest.skip("this kernel accepted every connection; cannot build a black hole")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_connect_timeout_against_a_black_hole(black_hole: int) -> None:
    policy = make_policy(allow_loopback=True, connect_timeout=0.3, total_timeout=5)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await open_connection(policy, "127.0.0.1", black_hole)
    with pytest.raises(httpx.ConnectTimeout):
        await request(policy, "GET", f"http://127.0.0.1:{black_hole}/")
    assert time.monotonic() - started < 3


async def test_total_timeout_against_a_server_that_never_answers(
    servers: Callable[..., Awaitable[TinyHttp]],
) -> None:
    server = await servers(silent=True)
    policy = make_policy(allow_loopback=True, connect_timeout=0.2, total_timeout=0.5)
    started = time.monotonic()
    with pytest.raises((TimeoutError, httpx.ReadTimeout)):
        await request(policy, "GET", server.url())
    assert server.accepted == 1 and time.monotonic() - started < 3
