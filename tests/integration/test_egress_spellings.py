"""Odd spellings of an address, on every path that sends to a user-given URL (issue 12, item 6).

Each URL is read by the egress policy's own parser before any HTTP client sees it,
so a spelling is judged as the address it denotes (the way inet_aton and a browser
read it): `blocked_by_policy` when that address is blocked, `invalid_config` when
the host is not valid at all, and an allowed address is contacted at its standard
form. The same answer on every path, against real servers on loopback; a refusal
is proven by the server's request count staying put, next to the allowed spellings
that move it.
"""

from __future__ import annotations

import contextlib
import socketserver
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from broker import catalog, oauth
from broker._proto import broker_pb2 as pb
from broker.config import MonitorSettings
from broker.egress import Blocked, EgressPolicy, EgressSettings, InvalidTarget
from broker.egress.http import request
from broker.errors import InvalidArgument
from broker.model import TestCategory
from broker.sensitive import SecretFields
from broker.testers import Target, run_test, run_tester
from broker.testers._mcp_client import discover_tools
from tests import mcpserver, oauthserver
from tests.conftest import Running
from tests.helpers import field_violations, rpc_error, struct
from tests.httpservers import Answer, LocalServer, Seen, serve

pytestmark = pytest.mark.integration

LOOPBACK_SPELLINGS = [
    "0177.0.0.1",  # octal
    "0177.0.0.01",
    "0x7f.0.0.1",  # hex
    "0x7f000001",
    "017700000001",  # one octal number
    "2130706433",  # one decimal number
    "127.1",  # short forms
    "127.0.1",
    "\uff11\uff12\uff17.\uff10.\uff10.\uff11",  # full-width digits
    "127\u30020\u30020\u30021",  # ideographic full stops
    "%31%32%37.0.0.1",  # percent-encoded, as a browser decodes it
    "127.0.0.1.",  # trailing dot
]
METADATA_SPELLINGS = [
    "169.254.169.254",
    "0251.0376.0251.0376",  # octal
    "169.254.169.0254",  # zero-padded: octal 0254 is 172, still link-local
    "0251.254.169.254",  # mixed
    "0xa9.0xfe.0xa9.0xfe",  # hex
    "0xa9fea9fe",
    "2852039166",  # integer
    "169.254.43518",  # short form with a 16-bit tail
    "\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14",  # full-width
    "%31%36%39.254.169.254",
    "[::ffff:169.254.169.254]",  # IPv4-mapped
    "[::ffff:a9fe:a9fe]",
    "[64:ff9b::a9fe:a9fe]",  # NAT64
    "[fe80::1%25eth0]",  # link-local with a zone id
]
INVALID_HOSTS = [
    "256.0.0.1",
    "127.0.0.1.5",
    "0999.0.0.1",  # 9 is not an octal digit
    "%ff.0.0.1",  # not UTF-8 once decoded
    "127.0.0.1%2F",  # decodes to a delimiter
    "[::ffff:999.0.0.1]",
]

ALLOW = EgressPolicy(EgressSettings(allow_loopback=True))
DENY = EgressPolicy(EgressSettings(allow_loopback=False))
TOKEN = "t0ken-for-spelling-tests"


class _SshBanner(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.accepted += 1  # type: ignore[attr-defined]
        self.request.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")


@contextlib.contextmanager
def ssh_banner() -> Iterator[socketserver.ThreadingTCPServer]:
    """A loopback TCP server that greets like sshd and counts connections."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SshBanner)
    server.accepted = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class Servers:
    http: LocalServer
    mcp: mcpserver.McpTestServer
    oauth: oauthserver.OAuthTestServer
    ssh: socketserver.ThreadingTCPServer

    def received(self) -> int:
        ssh: int = self.ssh.accepted  # type: ignore[attr-defined]
        return len(self.http.requests) + len(self.mcp.seen) + sum(self.oauth.token_requests.values()) + ssh


def _answer(seen: Seen) -> Answer:
    if seen.path == "/v1/models":
        return Answer.json({"data": []})
    if seen.path == "/moved":
        return Answer(302, headers={"Location": "http://0251.0376.0251.0376/latest/meta-data"})
    return Answer.json({"sub": "someone"})


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with (
        serve(_answer) as http,
        mcpserver.running() as mcp,
        oauthserver.running() as auth,
        ssh_banner() as ssh,
    ):
        yield Servers(http, mcp, auth, ssh)


def _category(result: Any) -> str:
    return str(result.category.value)


def _target(kind: str, provider: str, config: dict[str, Any], secrets: dict[str, str]) -> Target:
    # Not through the catalog: a row stored before this change may hold any URL.
    return Target(kind, provider, config, SecretFields(secrets))


async def _http_test(host: str, s: Servers, policy: EgressPolicy) -> str:
    url = f"http://{host}:{s.http.port}/"
    return _category(await run_test(_target("http", "", {"base_url": url}, {}), policy))


async def _webhook_test(host: str, s: Servers, policy: EgressPolicy) -> str:
    url = f"http://{host}:{s.http.port}/hook"
    return _category(await run_test(_target("webhook", "", {"url": url}, {}), policy))


async def _provider_test(host: str, s: Servers, policy: EgressPolicy) -> str:
    config = {"base_url": f"http://{host}:{s.http.port}"}
    return _category(await run_test(_target("api_key", "openai", config, {"api_key": TOKEN}), policy))


async def _oauth_verify(host: str, s: Servers, policy: EgressPolicy) -> str:
    config = {"verify_url": f"http://{host}:{s.http.port}/userinfo"}
    target = _target("oauth2", "custom", config, {"access_token": TOKEN})
    return _category(await run_test(target, policy))


async def _mcp_test(host: str, s: Servers, policy: EgressPolicy) -> str:
    url = f"http://{host}:{s.mcp.port}/mcp"
    return _category(await run_test(_target("mcp", "", {"server_url": url}, {}), policy))


async def _mcp_discover(host: str, s: Servers, policy: EgressPolicy) -> str:
    url = f"http://{host}:{s.mcp.port}/mcp"

    async def discovering(target: Target, egress: EgressPolicy) -> Any:
        result, _tools = await discover_tools(target, egress)
        return result

    target = _target("mcp", "", {"server_url": url}, {})
    return _category(await run_tester(discovering, target, policy))


async def _oauth_token(host: str, s: Servers, policy: EgressPolicy) -> str:
    """The token endpoint, named the way the OAuth service reports it."""
    provider = oauth.provider_for("custom", {"token_url": f"http://{host}:{s.oauth.port}/token"})
    client = oauth.ClientCredentials(s.oauth.client_id, s.oauth.client_secret)
    try:
        await oauth.client_credentials_token(
            policy, provider, client, [], now=datetime.now(UTC), default_lifetime=timedelta(hours=1)
        )
    except oauth.OAuthError as exc:
        return exc.kind
    except InvalidTarget:
        return "InvalidTarget escaped"  # must have become invalid_config
    except Blocked:
        return TestCategory.BLOCKED_BY_POLICY.value
    return TestCategory.OK.value


async def _ssh_test(host: str, s: Servers, policy: EgressPolicy) -> str:
    """A host field rather than a URL: read by the same parser (`parse_host`)."""
    port = s.ssh.server_address[1]
    # A host field has neither brackets nor percent-encoding: the same host as typed there.
    typed = host.strip("[]") if host.startswith("[") else urllib.parse.unquote(host)
    config = {"host": typed, "port": port, "username": "u"}
    return _category(await run_test(_target("ssh", "", config, {"password": "p"}), policy))


Path = Callable[[str, Servers, EgressPolicy], Awaitable[str]]
PATHS: dict[str, Path] = {
    "http test": _http_test,
    "webhook test": _webhook_test,
    "provider test": _provider_test,
    "oauth verify": _oauth_verify,
    "mcp test": _mcp_test,
    "mcp discover": _mcp_discover,
    "oauth token": _oauth_token,
    "ssh host": _ssh_test,
}
OK = TestCategory.OK.value
BLOCKED = TestCategory.BLOCKED_BY_POLICY.value
INVALID = TestCategory.INVALID_CONFIG.value


@pytest.mark.parametrize("path", PATHS)
async def test_the_standard_spelling_reaches_every_server(path: str, servers: Servers) -> None:
    # The control: with loopback allowed every path succeeds and the server sees it.
    before = servers.received()
    assert await PATHS[path]("127.0.0.1", servers, ALLOW) == OK
    assert servers.received() > before


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
@pytest.mark.parametrize("path", PATHS)
async def test_a_spelling_of_a_blocked_address_is_blocked_by_policy_and_sends_nothing(
    path: str, host: str, servers: Servers
) -> None:
    before = servers.received()
    assert await PATHS[path](host, servers, DENY) == BLOCKED
    assert servers.received() == before


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
@pytest.mark.parametrize("path", PATHS)
async def test_a_spelling_of_an_allowed_address_is_contacted_at_that_address(
    path: str, host: str, servers: Servers
) -> None:
    before = servers.received()
    assert await PATHS[path](host, servers, ALLOW) == OK
    assert servers.received() > before


@pytest.mark.parametrize("host", METADATA_SPELLINGS)
@pytest.mark.parametrize("path", PATHS)
async def test_every_spelling_of_the_metadata_address_is_blocked_by_policy(
    path: str, host: str, servers: Servers
) -> None:
    before = servers.received()
    assert await PATHS[path](host, servers, ALLOW) == BLOCKED
    assert servers.received() == before


@pytest.mark.parametrize("host", INVALID_HOSTS)
@pytest.mark.parametrize("path", PATHS)
async def test_a_host_that_is_no_address_or_name_is_invalid_config(
    path: str, host: str, servers: Servers
) -> None:
    before = servers.received()
    assert await PATHS[path](host, servers, ALLOW) == INVALID
    assert servers.received() == before


async def test_a_redirect_to_a_spelling_of_the_metadata_address_is_blocked(servers: Servers) -> None:
    # Followed by the policy's request(): the token endpoint's path. Only the first hop arrives.
    before = len(servers.http.requests)
    with pytest.raises(Blocked, match=r"169\.254\.169\.254"):
        await request(ALLOW, "GET", f"{servers.http.url}/moved")
    assert len(servers.http.requests) == before + 1


async def test_the_http_tester_reports_where_an_odd_redirect_points(servers: Servers) -> None:
    # Not followed (another host); shown in its standard form rather than failing the test.
    target = _target("http", "", {"base_url": f"{servers.http.url}/moved"}, {})
    result = await run_test(target, ALLOW)
    assert result.success, result.message
    assert result.details["location"] == "http://169.254.169.254/latest/meta-data"


OAUTH_CONFIG = {"client_id": "c", "authorize_url": "https://a.example/authorize"}
URL_FIELDS = [
    ("http", "", "base_url", {}, {}),
    ("webhook", "", "url", {}, {}),
    ("mcp", "", "server_url", {}, {}),
    ("api_key", "openai", "base_url", {}, {"api_key": "k"}),
    ("oauth2", "custom", "verify_url", {**OAUTH_CONFIG, "token_url": "https://a.example/t"}, {}),
    ("oauth2", "custom", "token_url", OAUTH_CONFIG, {}),
]


def test_the_catalog_refuses_a_host_field_the_policy_cannot_read() -> None:
    for host in INVALID_HOSTS[:3]:
        with pytest.raises(InvalidArgument) as caught:
            catalog.validate("ssh", "", {"host": host, "username": "u"}, {"password": "p"})
        assert [v.field for v in caught.value.violations] == ["config.host"], host
    for host in ["0177.0.0.1", "0x7f.1", "2852039166", "169.254.169.0254"]:
        assert catalog.validate("ssh", "", {"host": host, "username": "u"}, {"password": "p"})


@pytest.mark.parametrize(("kind", "provider", "field", "config", "secrets"), URL_FIELDS)
def test_the_catalog_refuses_a_url_the_policy_cannot_read_and_keeps_the_others(
    kind: str, provider: str, field: str, config: dict[str, Any], secrets: dict[str, str]
) -> None:
    for host in INVALID_HOSTS:
        with pytest.raises(InvalidArgument) as caught:
            catalog.validate(kind, provider, {**config, field: f"https://{host}/x"}, secrets)
        assert [v.field for v in caught.value.violations] == [f"config.{field}"], host
    for host in LOOPBACK_SPELLINGS + METADATA_SPELLINGS:
        # Valid spellings are kept as typed; the policy judges them when they are used.
        url = f"https://{host}/x"
        assert catalog.validate(kind, provider, {**config, field: url}, secrets).config[field] == url


# --------------------------------------------------------------------- through the admin API


def _draft(kind: str, field: str, url: str) -> pb.ConnectionDraft:
    return pb.ConnectionDraft(type=kind, config=struct({field: url}))


API_FIELDS = [("http", "base_url", "/"), ("webhook", "url", "/hook"), ("mcp", "server_url", "/mcp")]


@pytest.mark.parametrize(("kind", "field", "path"), API_FIELDS)
async def test_the_api_answers_the_same_category_for_a_stored_or_draft_test(
    running: Running, servers: Servers, kind: str, field: str, path: str
) -> None:
    """The default policy blocks loopback; every spelling of it is blocked_by_policy, nothing sent."""
    admin = running.admin()
    port = servers.mcp.port if kind == "mcp" else servers.http.port
    before = servers.received()
    for host in ["127.0.0.1", "0177.0.0.1", "2130706433", "\uff11\uff12\uff17.0.0.1", "0251.0376.0251.0376"]:
        url = f"http://{host}:{port}{path}"
        draft = await admin.TestConnection(pb.TestConnectionRequest(draft=_draft(kind, field, url)))
        assert draft.category == pb.TEST_CATEGORY_BLOCKED_BY_POLICY, (host, draft.message)
        created = await admin.CreateConnection(
            pb.CreateConnectionRequest(name=f"c{abs(hash(host))}", type=kind, config=struct({field: url}))
        )
        assert created.config[field] == url  # kept as typed
        stored = await admin.TestConnection(pb.TestConnectionRequest(id=created.id))
        assert stored.category == pb.TEST_CATEGORY_BLOCKED_BY_POLICY, (host, stored.message)
        if kind == "mcp":
            found = await admin.DiscoverMcpTools(pb.DiscoverMcpToolsRequest(id=created.id))
            assert found.result.category == pb.TEST_CATEGORY_BLOCKED_BY_POLICY
    assert servers.received() == before


@pytest.mark.parametrize(("kind", "field", "path"), API_FIELDS)
async def test_a_url_that_is_not_valid_at_all_is_invalid_argument_naming_the_field(
    running: Running, kind: str, field: str, path: str
) -> None:
    admin = running.admin()
    for host in INVALID_HOSTS:
        url = f"http://{host}:8080{path}"
        create = pb.CreateConnectionRequest(name="x", type=kind, config=struct({field: url}))
        for call in (
            admin.CreateConnection(create),
            admin.TestConnection(pb.TestConnectionRequest(draft=_draft(kind, field, url))),
        ):
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, host
            assert list(field_violations(error)) == [f"config.{field}"], host
    assert (await admin.ListConnections(pb.ListConnectionsRequest())).connections == []


async def test_the_alert_webhook_reads_its_url_like_every_other_path(make_broker: Any) -> None:
    with serve(lambda seen: Answer(204)) as hook:
        first: Running = await make_broker()
        url = f"http://0177.0.0.1:{hook.port}/alerts"
        created = await first.admin().CreateConnection(
            pb.CreateConnectionRequest(name="soc", type="webhook", config=struct({"url": url}))
        )
        await first.close()
        await first.broker.stop(grace=0)
        monitor = MonitorSettings(
            denied_resolves=1, new_principal_peer=False, alert_webhook=f"default/{created.id}"
        )
        running: Running = await make_broker(monitor=monitor, egress=EgressSettings(allow_loopback=True))
        try:
            resolve = running.resolver().Resolve(pb.ResolveRequest(connection_id="conn_probe"))
            assert (await rpc_error(resolve)).code() == grpc.StatusCode.PERMISSION_DENIED
            await running.broker.services.monitor.settle()
            await running.broker.services.monitor.close()  # lets the queued alert go
            assert [(seen.method, seen.path) for seen in hook.requests] == [("POST", "/alerts")]
            assert "security_alert_failed" not in running.logs.getvalue()
        finally:
            await running.close()
            await running.broker.stop(grace=0)
