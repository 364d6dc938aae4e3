"""Operating the broker: health status, reflection, draining and TLS certificate reload."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker import pki
from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.cli import broker as broker_cli
from broker.config import TlsFiles
from broker.server import Broker
from tests.conftest import Identity, Running, TestPki, spiffe
from tests.helpers import EXECUTOR, db_request, rpc_error

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "broker.v1.AdminService", "broker.v1.ResolveService")
# No rate limit in the way of a resolve loop.
UNLIMITED = {"resolve_per_second": 1_000_000.0, "resolve_burst": 1_000_000}


def _ports(running: Running) -> dict[str, int]:
    return {
        "broker.v1.AdminService": running.broker.admin_port,
        "broker.v1.ResolveService": running.broker.resolve_port,
    }


async def statuses(running: Running) -> set[int]:
    """Every listener's status for its own service and for "" (overall), over real Check calls."""
    seen = set()
    for service, port in _ports(running).items():
        stub = health_pb2_grpc.HealthStub(running.channel(running.identities["executor"], port))
        for name in ("", service):
            seen.add((await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status)
    return seen


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ health


async def test_listeners_report_not_serving_until_start_has_finished(
    make_broker: Callable[..., Awaitable[Running]],
    monkeypatch: pytest.MonkeyPatch,
    test_pki: TestPki,
    identities: dict[str, Identity],
) -> None:
    seen: list[int] = []
    listener = Broker._listener
    executor = identities["executor"]

    async def check(port: int, service: str) -> int:
        creds = grpc.ssl_channel_credentials(test_pki.ca, executor.key, executor.cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            request = health_pb2.HealthCheckRequest(service=service)
            return int((await health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)).status)

    def spying_listener(self: Broker, service: str, addr: str) -> grpc.aio.Server:
        server = listener(self, service, addr)
        start, port = server.start, self._ports[-1]

        async def start_then_ask() -> None:
            await start()
            seen.append(await check(port, service))
            seen.append(await check(port, ""))

        server.start = start_then_ask  # type: ignore[method-assign]
        return server

    monkeypatch.setattr(Broker, "_listener", spying_listener)
    running = await make_broker()
    try:
        # Each listener was accepting calls before start() had finished: NOT_SERVING then.
        assert seen == [NOT_SERVING] * 4
        assert await statuses(running) == {SERVING}
    finally:
        await running.close()
        await running.broker.stop(grace=0)


async def test_store_that_stops_answering_flips_health_both_ways(
    make_broker: Callable[..., Awaitable[Running]], monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await make_broker(health_probe_seconds=0.1)
    try:
        assert await statuses(running) == {SERVING}
        store = running.broker.store

        async def failing_ping() -> None:
            raise OSError("disk gone")

        monkeypatch.setattr(store, "ping", failing_ping)
        await eventually(lambda: _is(running, {NOT_SERVING}))
        monkeypatch.undo()
        await eventually(lambda: _is(running, {SERVING}))

        # A store that is really closed, then opened again.
        await store.close()
        await eventually(lambda: _is(running, {NOT_SERVING}))
        await store.open()
        await eventually(lambda: _is(running, {SERVING}))
        assert "store_unreachable" in running.logs.getvalue()
    finally:
        await running.close()
        await running.broker.stop(grace=0)


async def _is(running: Running, expected: set[int]) -> bool:
    return await statuses(running) == expected


async def test_draining_reports_not_serving_to_watchers_then_refuses_new_calls(
    make_broker: Callable[..., Awaitable[Running]],
) -> None:
    running = await make_broker()
    watches = []
    for service, port in _ports(running).items():
        stub = health_pb2_grpc.HealthStub(running.channel(running.identities["executor"], port))
        for name in ("", service):
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=name))
            assert (await watch.read()).status == SERVING
            watches.append(watch)
    stopping = asyncio.ensure_future(running.broker.stop(grace=1.0))
    try:
        for watch in watches:
            assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        await stopping
        fresh = health_pb2_grpc.HealthStub(
            running.channel(running.identities["executor"], running.broker.resolve_port)
        )
        error = await rpc_error(fresh.Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for watch in watches:
            watch.cancel()
        await stopping
        await running.close()


# -------------------------------------------------------------- reflection


async def test_reflection_is_on_the_admin_listener_only(running: Running) -> None:
    assert "broker.v1.AdminService" in await running.reflected_services(running.broker.admin_port)
    error = await rpc_error(running.reflected_services(running.broker.resolve_port, ask=False))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_reflection_can_be_turned_off(make_broker: Callable[..., Awaitable[Running]]) -> None:
    running = await make_broker(reflection=False)
    try:
        error = await rpc_error(running.reflected_services(running.broker.admin_port, ask=False))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await running.close()
        await running.broker.stop(grace=0)


# ---------------------------------------------------------- certificate reload


def peer_serial(port: int, ca: bytes, identity: Identity, tmp_path: Path) -> int:
    """The serial of the certificate a brand-new TLS connection is shown (blocking: run in a thread)."""
    cert, key = tmp_path / "peer-client.pem", tmp_path / "peer-client-key.pem"
    cert.write_bytes(identity.cert)
    key.write_bytes(identity.key)
    context = ssl.create_default_context(cadata=ca.decode())
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_of(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


class ResolveLoop:
    """Resolves on one existing channel until stopped; counts outcomes."""

    def __init__(self, resolver: Any, connection_id: str) -> None:
        self.ok = 0
        self.failures: list[str] = []
        self._resolver = resolver
        self._id = connection_id
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self._resolver.Resolve(pb.ResolveRequest(connection_id=self._id), timeout=10)
                self.ok += 1
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
            await asyncio.sleep(0.002)

    async def wait_for(self, count: int) -> None:
        await eventually(self._reached(self.ok + count))

    def _reached(self, target: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return self.ok >= target or bool(self.failures)

        return check

    async def stop(self) -> None:
        self._stop.set()
        await self._task


async def _granted(running: Running) -> str:
    created = await running.admin().CreateConnection(db_request(name="rotating"))
    await running.admin().GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    return str(created.id)


async def test_server_certificate_overwritten_under_load_is_served_to_new_connections(
    make_broker: Callable[..., Awaitable[Running]], tmp_path: Path
) -> None:
    running = await make_broker(tls_reload_seconds=0, **UNLIMITED)
    tls = tmp_path / "tls"
    loop = ResolveLoop(running.resolver(), await _granted(running))
    executor = running.identities["executor"]
    try:
        await loop.wait_for(20)
        old = serial_of(running.pki.server.cert)
        assert (
            await asyncio.to_thread(
                peer_serial, running.broker.resolve_port, running.pki.ca, executor, tmp_path
            )
            == old
        )

        new_cert, new_key = pki.issue_server_cert(
            running.pki.ca, running.pki.ca_key, ["localhost", "127.0.0.1"]
        )
        # Plain overwrite, certificate first: in between, the key does not match and is not taken up.
        (tls / "server.pem").write_bytes(new_cert)
        assert (
            await asyncio.to_thread(
                peer_serial, running.broker.resolve_port, running.pki.ca, executor, tmp_path
            )
            == old
        )
        await loop.wait_for(20)
        (tls / "server-key.pem").write_bytes(new_key)
        await loop.wait_for(20)

        for port in (running.broker.resolve_port, running.broker.admin_port):
            seen = await asyncio.to_thread(peer_serial, port, running.pki.ca, executor, tmp_path)
            assert seen == serial_of(new_cert) != old
        # A new gRPC channel works with the new certificate too.
        reply = await running.resolver().Resolve(pb.ResolveRequest(name="rotating"))
        assert reply.name == "rotating"
        await loop.wait_for(20)
    finally:
        await loop.stop()
        await running.close()
        await running.broker.stop(grace=0)
    assert loop.failures == []
    assert "tls_reload_rejected" in running.logs.getvalue() and "tls_reloaded" in running.logs.getvalue()


def _kubernetes_secret(mount: Path, files: dict[str, bytes], version: int) -> None:
    """Write `files` the way the kubelet updates a mounted Secret: a new dir, then an atomic `..data` swap."""
    target = mount / f"..2024_01_01_00_00_{version:02d}"
    target.mkdir()
    for name, content in files.items():
        (target / name).write_bytes(content)
    link = mount / "..data_tmp"
    link.symlink_to(target.name)
    link.replace(mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(Path("..data") / name)


async def test_kubernetes_secret_swap_rotates_certificate_and_client_ca(
    make_broker: Callable[..., Awaitable[Running]], tmp_path: Path, test_pki: TestPki
) -> None:
    mount = tmp_path / "secret"
    mount.mkdir()
    first = {"tls.crt": test_pki.server.cert, "tls.key": test_pki.server.key, "ca.crt": test_pki.ca}
    _kubernetes_secret(mount, first, 1)
    files = TlsFiles(mount / "tls.crt", mount / "tls.key", mount / "ca.crt")
    running = await make_broker(tls=files, tls_reload_seconds=0, **UNLIMITED)
    loop = ResolveLoop(running.resolver(), await _granted(running))
    new_ca, new_ca_key = pki.create_ca("rotated client CA")
    new_executor = Identity(
        *pki.issue_principal_cert(new_ca, new_ca_key, spiffe("default", "executor", "demo"))
    )
    try:
        await loop.wait_for(20)
        new_cert, new_key = pki.issue_server_cert(test_pki.ca, test_pki.ca_key, ["localhost", "127.0.0.1"])
        # The server certificate still comes from the old CA (clients trust it); clients now need the new CA.
        _kubernetes_secret(mount, {"tls.crt": new_cert, "tls.key": new_key, "ca.crt": new_ca}, 2)
        await loop.wait_for(20)

        port = running.broker.resolve_port
        assert await asyncio.to_thread(peer_serial, port, test_pki.ca, new_executor, tmp_path) == serial_of(
            new_cert
        )
        # A client certificate from the new CA is accepted on a new connection...
        as_new = broker_pb2_grpc.ResolveServiceStub(running.channel(new_executor, port))
        reply = await as_new.Resolve(pb.ResolveRequest(name="rotating"))
        assert reply.name == "rotating"
        # ...one from the old CA no longer is, while the existing connection goes on.
        error = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(name="rotating"), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        await loop.wait_for(20)
    finally:
        await loop.stop()
        await running.close()
        await running.broker.stop(grace=0)
    assert loop.failures == []


async def test_a_dropped_client_ca_ends_open_connections_at_their_maximum_age(
    make_broker: Callable[..., Awaitable[Running]], tmp_path: Path
) -> None:
    """TLS checks a client's chain only when the connection opens: without a maximum age, a client
    of a dropped CA could keep its connection, and its access, until the broker restarts."""
    running = await make_broker(tls_reload_seconds=0, max_connection_age_seconds=1)
    admin = running.admin()
    await admin.ListConnections(pb.ListConnectionsRequest(), timeout=5)
    other_ca, _ = pki.create_ca("the client CA of the day")
    (tmp_path / "tls" / "ca.pem").write_bytes(other_ca)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10  # 1 s of age, gRPC's jitter, and a reconnection on a busy machine
    while True:
        try:
            await admin.ListConnections(pb.ListConnectionsRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE  # the new handshake is refused
            break
        assert loop.time() < deadline, "the connection outlived its maximum age"
        await asyncio.sleep(0.2)


async def test_unusable_new_files_keep_the_old_certificate(
    make_broker: Callable[..., Awaitable[Running]], tmp_path: Path
) -> None:
    running = await make_broker(tls_reload_seconds=0)
    tls = tmp_path / "tls"
    executor = running.identities["executor"]
    old = serial_of(running.pki.server.cert)
    try:
        (tls / "server.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
        assert (
            await asyncio.to_thread(
                peer_serial, running.broker.admin_port, running.pki.ca, executor, tmp_path
            )
            == old
        )
        (tls / "ca.pem").unlink()
        assert (
            await asyncio.to_thread(
                peer_serial, running.broker.admin_port, running.pki.ca, executor, tmp_path
            )
            == old
        )
        assert (await running.admin().ListConnections(pb.ListConnectionsRequest())).connections == []
    finally:
        await running.close()
        await running.broker.stop(grace=0)
    assert running.logs.getvalue().count("tls_reload_rejected") >= 2


# ------------------------------------------------------------ broker health


def _probe_config(tmp_path: Path, identity: Identity, with_identity: bool = True) -> Path:
    probe = tmp_path / "probe"
    probe.mkdir(exist_ok=True)
    (probe / "probe.pem").write_bytes(identity.cert)
    (probe / "probe-key.pem").write_bytes(identity.key)
    health = '[health]\ncert = "probe/probe.pem"\nkey = "probe/probe-key.pem"\n' if with_identity else ""
    config = tmp_path / "broker.toml"
    config.write_text(
        '[tls]\ncert = "tls/server.pem"\nkey = "tls/server-key.pem"\nclient_ca = "tls/ca.pem"\n'
        '[storage]\npath = "broker.db"\n' + health
    )
    return config


async def test_broker_health_command_exits_0_only_when_serving(
    make_broker: Callable[..., Awaitable[Running]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = await make_broker(health_probe_seconds=0.1)
    config = _probe_config(tmp_path, running.identities["executor2"])

    async def health(*extra: str, port: int = running.broker.resolve_port) -> tuple[int, str]:
        argv = ["health", "--config", str(config), "--target", f"127.0.0.1:{port}", *extra]
        # The command blocks; the broker answers on this event loop.
        code = await asyncio.to_thread(broker_cli.main, argv)
        return code, capsys.readouterr().out

    try:
        code, out = await health()
        assert (code, out.split(":")[0]) == (0, "SERVING")
        code, out = await health("--service", "broker.v1.AdminService", port=running.broker.admin_port)
        assert (code, out.split(":")[0]) == (0, "SERVING")
        code, out = await health("--service", "broker.v1.NoSuchService")
        assert (code, out.split(":")[0]) == (1, "SERVICE_UNKNOWN")

        async def failing_ping() -> None:
            raise OSError("disk gone")

        monkeypatch.setattr(running.broker.store, "ping", failing_ping)
        await eventually(lambda: _is(running, {NOT_SERVING}))
        code, out = await health("--service", "broker.v1.ResolveService")
        assert (code, out.split(":")[0]) == (1, "NOT_SERVING")
    finally:
        await running.close()
        await running.broker.stop(grace=0)
    code, out = await health("--timeout", "1")
    assert (code, out.split(":")[0]) == (1, "UNREACHABLE")
    # Without an identity it says what to set (exit 2, like every bad setting).
    code = broker_cli.main(
        ["health", "--config", str(_probe_config(tmp_path, running.identities["executor"], False))]
    )
    assert code == 2 and "health.cert" in capsys.readouterr().err


async def test_broker_health_probes_a_dev_layout_as_its_executor(
    make_broker: Callable[..., Awaitable[Running]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = tmp_path / "dev"
    pki.ensure_dev_layout(dev)
    tls = dev / "tls"
    running = await make_broker(tls=TlsFiles(tls / "server.pem", tls / "server-key.pem", tls / "ca.pem"))
    try:
        argv = ["health", "--data-dir", str(dev), "--addr", "admin"]
        argv += ["--target", f"localhost:{running.broker.admin_port}", "--service", "broker.v1.AdminService"]
        assert await asyncio.to_thread(broker_cli.main, argv) == 0
        assert capsys.readouterr().out.startswith("SERVING: broker.v1.AdminService at localhost:")
    finally:
        await running.close()
        await running.broker.stop(grace=0)
