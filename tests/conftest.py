"""Shared fixtures: a test PKI and a real broker on loopback ports.

The event loop: asyncio's own, or uvloop's with `BROKER_TEST_LOOP=uvloop` (the whole suite must
pass on both, as `broker serve` uses uvloop when installed); tests marked `uvloop` run on it in
every run, so CI covers both loops without running the suite twice.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from broker import log as broker_log
from broker import pki
from broker._proto import broker_pb2_grpc
from broker.config import CLIENT_VARIABLES, Settings, TlsFiles
from broker.server import Broker
from broker.store.sqlite import SqliteStore

TRUST_DOMAIN = "broker.local"
TESTS = Path(__file__).resolve().parent
# Markers follow the directory, so a new test file cannot forget them and `-m "not integration"`
# is always the unit tests alone. e2e tests run real processes: they are integration tests too.
MARKERS_BY_DIRECTORY: dict[str, tuple[str, ...]] = {
    "unit": (),
    "integration": ("integration",),
    "e2e": ("e2e", "integration"),
}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        directory = item.path.resolve().relative_to(TESTS).parts[0]
        if directory not in MARKERS_BY_DIRECTORY:
            raise pytest.UsageError(
                f"{item.nodeid}: tests live in tests/unit, tests/integration or tests/e2e "
                "(the directory decides the markers; see tests/conftest.py)"
            )
        for marker in MARKERS_BY_DIRECTORY[directory]:
            item.add_marker(marker)
    # The bench smoke measures short windows and must not share the machine with the suite: it
    # runs only when asked for by name (`-m bench`, as .ci/run does).
    if "bench" not in (config.getoption("markexpr") or ""):
        benches = [item for item in items if item.get_closest_marker("bench")]
        if benches:
            config.hook.pytest_deselected(items=benches)
            items[:] = [item for item in items if not item.get_closest_marker("bench")]


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
TEST_LOOP = os.environ.get("BROKER_TEST_LOOP", "asyncio")
if TEST_LOOP not in LOOPS:
    raise pytest.UsageError(f"BROKER_TEST_LOOP={TEST_LOOP!r}: choose one of {', '.join(LOOPS)}")


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """One loop per test: uvloop for tests marked `uvloop`, else the one BROKER_TEST_LOOP names."""
    name = "uvloop" if item.get_closest_marker("uvloop") else TEST_LOOP
    return {name: LOOPS[name]}


@pytest.fixture(autouse=True)
def _brokerctl_sees_only_the_test(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """No BROKER_* client variable or brokerctl profile of the user running the suite reaches a test."""
    for variable in CLIENT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.getbasetemp() / "no-profiles"))


def spiffe(tenant: str, role: str, name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/tenant/{tenant}/{role}/{name}"


@dataclass(frozen=True)
class Identity:
    cert: bytes
    key: bytes


@dataclass
class TestPki:
    __test__ = False

    ca: bytes
    ca_key: bytes
    server: Identity

    def principal(self, spiffe_id: str) -> Identity:
        return Identity(*pki.issue_principal_cert(self.ca, self.ca_key, spiffe_id))


def client_cert(
    ca: bytes,
    ca_key: bytes,
    san: x509.GeneralName | list[x509.GeneralName],
    not_after: dt.datetime,
    *,
    is_ca: bool = False,
) -> Identity:
    """A client certificate from `ca` with the SAN (or SANs) `san`, valid from five minutes ago until
    `not_after`: for certificates `broker.pki` does not make (no SPIFFE id, several, a CA's, a lifetime
    in seconds)."""
    issuer = x509.load_pem_x509_certificate(ca)
    signer = serialization.load_pem_private_key(ca_key, None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test client")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(san if isinstance(san, list) else [san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Identity(cert.public_bytes(serialization.Encoding.PEM), key_pem)


@pytest.fixture(scope="session")
def test_pki() -> TestPki:
    ca, ca_key = pki.create_ca("broker test CA")
    return TestPki(ca, ca_key, Identity(*pki.issue_server_cert(ca, ca_key, ["localhost", "127.0.0.1"])))


@pytest.fixture(scope="session")
def identities(test_pki: TestPki) -> dict[str, Identity]:
    other_ca, other_key = pki.create_ca("some other CA")
    admin, tomorrow = spiffe("default", "admin", "cli"), dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    return {
        "admin": test_pki.principal(spiffe("default", "admin", "cli")),
        "executor": test_pki.principal(spiffe("default", "executor", "demo")),
        "executor2": test_pki.principal(spiffe("default", "executor", "other")),
        "admin_b": test_pki.principal(spiffe("tenant-b", "admin", "cli")),
        "executor_b": test_pki.principal(spiffe("tenant-b", "executor", "demo")),
        "foreign_domain": test_pki.principal("spiffe://evil.example/tenant/default/admin/cli"),
        "other_ca_admin": Identity(
            *pki.issue_principal_cert(other_ca, other_key, spiffe("default", "admin", "cli"))
        ),
        "no_spiffe": client_cert(test_pki.ca, test_pki.ca_key, x509.DNSName("client.example"), tomorrow),
        # Which of two names would be the caller? An X.509 SVID has exactly one URI.
        "two_uris": client_cert(
            test_pki.ca,
            test_pki.ca_key,
            [
                x509.UniformResourceIdentifier(admin),
                x509.UniformResourceIdentifier("https://client.example/"),
            ],
            tomorrow,
        ),
        "ca_certificate": client_cert(
            test_pki.ca, test_pki.ca_key, x509.UniformResourceIdentifier(admin), tomorrow, is_ca=True
        ),
    }


def write_settings(tmp_path: Path, test_pki: TestPki, **overrides: object) -> Settings:
    tls = tmp_path / "tls"
    tls.mkdir(exist_ok=True)
    (tls / "server.pem").write_bytes(test_pki.server.cert)
    (tls / "server-key.pem").write_bytes(test_pki.server.key)
    (tls / "ca.pem").write_bytes(test_pki.ca)
    key_file = tmp_path / "master.key"
    if not key_file.exists():
        key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    values: dict[str, object] = {
        "tls": TlsFiles(tls / "server.pem", tls / "server-key.pem", tls / "ca.pem"),
        "storage_path": tmp_path / "broker.db",
        "master_key_file": key_file,
        "admin_addr": "127.0.0.1:0",
        "resolve_addr": "127.0.0.1:0",
        "grace_seconds": 1.0,
        "metrics_listen": "",  # the metrics test turns it on
        "log_level": "debug",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An opened SQLite store in this test's temp dir, closed afterwards."""
    backend = SqliteStore(tmp_path / "broker.db")
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


class Running:
    """A started broker and clients for it."""

    def __init__(self, broker: Broker, test_pki: TestPki, identities: dict[str, Identity], logs: io.StringIO):
        self.broker = broker
        self.pki = test_pki
        self.identities = identities
        self.logs = logs
        self._channels: list[grpc.aio.Channel] = []

    def channel(self, identity: Identity | None, port: int) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.pki.ca,
            private_key=identity.key if identity else None,
            certificate_chain=identity.cert if identity else None,
        )
        channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)
        self._channels.append(channel)
        return channel

    def admin(self, who: str = "admin") -> broker_pb2_grpc.AdminServiceStub:
        return broker_pb2_grpc.AdminServiceStub(self.channel(self.identities[who], self.broker.admin_port))

    def resolver(self, who: str = "executor") -> broker_pb2_grpc.ResolveServiceStub:
        return broker_pb2_grpc.ResolveServiceStub(
            self.channel(self.identities[who], self.broker.resolve_port)
        )

    async def reflected_services(self, port: int, *, ask: bool = True) -> list[str]:
        """The services reflection lists on `port`, asked as admin. With `ask=False` the stream
        carries no request: where reflection is not served, a request still being sent when
        UNIMPLEMENTED arrives can end the call INTERNAL on the client's side instead; a served
        reflection ends it OK either way."""
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel(self.identities["admin"], port))
        requests = [reflection_pb2.ServerReflectionRequest(list_services="")] if ask else []
        call = stub.ServerReflectionInfo(iter(requests))
        return [service.name async for reply in call for service in reply.list_services_response.service]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


@pytest.fixture
async def make_broker(
    tmp_path: Path, test_pki: TestPki, identities: dict[str, Identity]
) -> AsyncIterator[Callable[..., object]]:
    """Start a broker in this test's temp dir; settings overridable. Stopped at teardown."""
    started: list[Running] = []

    async def start(clock: Callable[[], dt.datetime] | None = None, **overrides: object) -> Running:
        logs = io.StringIO()
        broker_log.configure("debug", logs)
        settings = write_settings(tmp_path, test_pki, **overrides)
        broker = Broker(settings) if clock is None else Broker(settings, clock=clock)
        await broker.start()
        running = Running(broker, test_pki, identities, logs)
        started.append(running)
        return running

    yield start
    for running in started:  # stop() is idempotent: tests that stopped theirs are untouched
        await running.close()
        await running.broker.stop(grace=0)


@pytest.fixture
async def running(make_broker: Callable[..., object]) -> AsyncIterator[Running]:
    running: Running = await make_broker()  # type: ignore[misc]
    yield running
    await running.close()
    await running.broker.stop(grace=0)
