"""ssh, aws, gcp and azure reachability testers against real servers on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker import catalog, pki
from broker.egress import EgressPolicy, EgressSettings
from broker.model import TestCategory, TestResult, TestStage
from broker.sensitive import SecretFields
from broker.testers import Target, run_tester
from broker.testers import reachability as r

pytestmark = pytest.mark.integration

SSH_BANNER = b"SSH-2.0-OpenSSH_9.6\r\n"
GUID = "0b1d2c3e-4f50-4a6b-8c7d-9e0f1a2b3c4d"


class Listener:
    """A loopback TCP (optionally TLS) server that runs `reply` for each connection and counts them."""

    def __init__(self, reply: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.reply = reply
        self.accepted = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        await self.reply(writer)

    async def start(self, tls: ssl.SSLContext | None = None) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=tls)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


Serve = Callable[..., Awaitable[tuple[Listener, int]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    listeners: list[Listener] = []

    async def start(
        reply: Callable[[asyncio.StreamWriter], Awaitable[None]], tls: ssl.SSLContext | None = None
    ) -> tuple[Listener, int]:
        listener = Listener(reply)
        listeners.append(listener)
        return listener, await listener.start(tls)

    yield start
    for listener in listeners:
        await listener.stop()


def _writes(data: bytes, close: bool = False) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return reply


async def _silent(writer: asyncio.StreamWriter) -> None:
    return None


async def _loopback(host: str, port: int) -> Sequence[str]:
    return ["127.0.0.1"]


def _policy(**settings: Any) -> EgressPolicy:
    return EgressPolicy(EgressSettings(**{"allow_loopback": True, **settings}), resolver=_loopback)


async def _run(
    tester: Any, type_name: str, config: dict[str, Any], secrets: dict[str, str], policy: EgressPolicy
) -> TestResult:
    valid = catalog.validate(type_name, "", config, secrets)
    target = Target(valid.type, valid.provider, valid.config, SecretFields(valid.secrets))
    return await run_tester(tester, target, policy)


async def _ssh(port: int, policy: EgressPolicy | None = None, host: str = "localhost") -> TestResult:
    config = {"host": host, "port": port, "username": "deploy"}
    return await _run(r.test_ssh, "ssh", config, {"password": "ssh-pa55word"}, policy or _policy())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---- ssh ----


async def test_ssh_banner(serve: Serve) -> None:
    listener, port = await serve(_writes(SSH_BANNER))

    result = await _ssh(port)

    assert result.success, result
    assert result.stage is TestStage.CONNECT
    assert result.details["banner"] == "SSH-2.0-OpenSSH_9.6"
    assert result.details["software"] == "OpenSSH_9.6"
    assert result.verified == ("tcp reachable", "ssh protocol banner")
    assert result.not_verified == ("credentials", "host key")
    assert listener.accepted == 1


async def test_ssh_banner_after_other_lines(serve: Serve) -> None:
    # RFC 4253, 4.2: a server may send other lines before its identification string.
    _, port = await serve(_writes(b"Welcome\r\nauthorised use only\r\n" + SSH_BANNER))

    result = await _ssh(port)

    assert result.success, result
    assert result.details["protocol"] == "2.0"


async def test_ssh_http_server_is_protocol_error(serve: Serve) -> None:
    _, port = await serve(_writes(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", close=True))

    result = await _ssh(port)

    assert result.category is TestCategory.PROTOCOL_ERROR
    assert result.stage is TestStage.CONNECT
    assert "HTTP/1.1 400" in result.message
    assert result.details["endpoint"] == f"localhost:{port}"


async def test_ssh_garbage_without_close_is_protocol_error(serve: Serve) -> None:
    # Data that is not a banner and then silence: not SSH, rather than a timeout.
    _, port = await serve(_writes(b"HTTP/1.1 400 Bad Request\r\n"))

    result = await _ssh(port, _policy(connect_timeout=0.3))

    assert result.category is TestCategory.PROTOCOL_ERROR


async def test_ssh_endless_stream_is_bounded(serve: Serve) -> None:
    _, port = await serve(_writes(b"x" * 100_000))

    result = await _ssh(port)

    assert result.category is TestCategory.PROTOCOL_ERROR
    assert result.latency_ms < 2000


async def test_ssh_protocol_1_is_protocol_error(serve: Serve) -> None:
    _, port = await serve(_writes(b"SSH-1.5-ancient\r\n"))

    result = await _ssh(port)

    assert result.category is TestCategory.PROTOCOL_ERROR
    assert result.details["banner"] == "SSH-1.5-ancient"


async def test_ssh_silent_server_is_timeout(serve: Serve) -> None:
    _, port = await serve(_silent)

    result = await _ssh(port, _policy(connect_timeout=0.3, total_timeout=2.0))

    assert result.category is TestCategory.TIMEOUT
    assert result.stage is TestStage.CONNECT


async def test_ssh_closed_port_is_connection_refused() -> None:
    result = await _ssh(_free_port())

    assert result.category is TestCategory.CONNECTION_REFUSED
    assert result.stage is TestStage.CONNECT


async def test_ssh_blocked_host_is_not_contacted(serve: Serve) -> None:
    listener, port = await serve(_writes(SSH_BANNER))

    result = await _ssh(port, EgressPolicy(EgressSettings()), host="127.0.0.1")

    assert result.category is TestCategory.BLOCKED_BY_POLICY
    assert result.stage is TestStage.RESOLVE_ADDRESS
    assert listener.accepted == 0


# ---- cloud ----


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context for `localhost`, whose CA the cloud testers trust via reachability.CAFILE."""
    ca, ca_key = pki.create_ca("cloud test CA")
    cert, key = pki.issue_server_cert(ca, ca_key, ["localhost"])
    for name, data in (("ca.pem", ca), ("server.crt", cert), ("server.key", key)):
        (tmp_path / name).write_bytes(data)
    monkeypatch.setattr(r, "CAFILE", str(tmp_path / "ca.pem"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    return context


def _service_account(**overrides: Any) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    document = {
        "type": "service_account",
        "project_id": "my-project-123",
        "private_key_id": "abc123",
        "private_key": pem,
        "client_email": "robot@my-project-123.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
        **overrides,
    }
    return json.dumps({k: v for k, v in document.items() if v is not None})


CLOUD: dict[str, tuple[Any, dict[str, Any], Callable[[], dict[str, str]]]] = {
    "aws": (
        r.test_aws,
        {"access_key_id": "AKIAIOSFODNN7EXAMPLE", "region": "eu-west-1"},
        lambda: {"secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"},
    ),
    "gcp": (r.test_gcp, {}, lambda: {"service_account_json": _service_account()}),
    "azure": (
        r.test_azure,
        {"tenant_id": GUID, "client_id": GUID},
        lambda: {"client_secret": "azure-client-secret-value"},
    ),
}


async def _cloud(kind: str, policy: EgressPolicy | None = None, **secrets: str) -> TestResult:
    tester, config, make_secrets = CLOUD[kind]
    return await _run(tester, kind, config, {**make_secrets(), **secrets}, policy or _policy())


@pytest.mark.parametrize("kind", sorted(CLOUD))
async def test_cloud_endpoint_reachable_over_tls(
    kind: str, serve: Serve, tls_server: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, port = await serve(_silent, tls_server)
    monkeypatch.setitem(r.ENDPOINTS, kind, ("localhost", port))

    result = await _cloud(kind)

    assert result.success, result
    assert result.stage is TestStage.TLS
    assert result.details["endpoint"] == f"localhost:{port}"
    assert result.details["tls_version"].startswith("TLS")
    assert "endpoint reachable over TLS" in result.verified
    assert result.not_verified == ("credentials",)
    assert listener.accepted == 1


async def test_aws_endpoint_names_the_region() -> None:
    # The real template, resolved by a resolver that records the name and refuses to answer.
    asked: list[str] = []

    async def record(host: str, port: int) -> Sequence[str]:
        asked.append(f"{host}:{port}")
        raise OSError("no DNS in tests")

    policy = EgressPolicy(EgressSettings(), resolver=record)
    result = await _cloud("aws", policy)

    assert asked == ["sts.eu-west-1.amazonaws.com:443"]
    assert result.category is TestCategory.DNS_FAILURE


async def test_gcp_key_file_checked(
    serve: Serve, tls_server: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, port = await serve(_silent, tls_server)
    monkeypatch.setitem(r.ENDPOINTS, "gcp", ("localhost", port))

    result = await _cloud("gcp")

    assert result.success, result
    assert "key file well-formed" in result.verified
    assert result.details["client_email"] == "robot@my-project-123.iam.gserviceaccount.com"
    assert all("PRIVATE KEY" not in value for value in result.details.values())


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"client_email": None}, "client_email"),
        ({"private_key": None}, "private_key"),
        ({"private_key": "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"}, "PEM"),
    ],
)
async def test_gcp_bad_key_file_is_invalid_config_without_connecting(
    overrides: dict[str, Any],
    problem: str,
    serve: Serve,
    tls_server: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listener, port = await serve(_silent, tls_server)
    monkeypatch.setitem(r.ENDPOINTS, "gcp", ("localhost", port))

    result = await _cloud("gcp", service_account_json=_service_account(**overrides))

    assert result.category is TestCategory.INVALID_CONFIG
    assert problem in result.message
    assert listener.accepted == 0


@pytest.mark.parametrize("kind", sorted(CLOUD))
async def test_cloud_closed_port_is_connection_refused(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(r.ENDPOINTS, kind, ("localhost", _free_port()))

    result = await _cloud(kind)

    assert result.category is TestCategory.CONNECTION_REFUSED
    assert result.stage is TestStage.CONNECT


async def test_cloud_untrusted_certificate_is_tls_error(
    serve: Serve, tls_server: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other_ca, _ = pki.create_ca("not the server's CA")
    (tmp_path / "other.pem").write_bytes(other_ca)
    monkeypatch.setattr(r, "CAFILE", str(tmp_path / "other.pem"))
    _, port = await serve(_silent, tls_server)
    monkeypatch.setitem(r.ENDPOINTS, "azure", ("localhost", port))

    result = await _cloud("azure")

    assert result.category is TestCategory.TLS_ERROR
    assert result.stage is TestStage.TLS


async def test_cloud_plain_server_is_not_tls(
    serve: Serve, tls_server: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, port = await serve(_writes(b"HTTP/1.1 400 Bad Request\r\n\r\n", close=True))
    monkeypatch.setitem(r.ENDPOINTS, "azure", ("localhost", port))

    result = await _cloud("azure")

    assert result.category is TestCategory.TLS_ERROR
    assert result.stage is TestStage.TLS


async def test_cloud_blocked_endpoint_is_not_contacted(
    serve: Serve, tls_server: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener, port = await serve(_silent, tls_server)
    monkeypatch.setitem(r.ENDPOINTS, "aws", ("127.0.0.1", port))

    result = await _cloud("aws", EgressPolicy(EgressSettings()))

    assert result.category is TestCategory.BLOCKED_BY_POLICY
    assert listener.accepted == 0
