"""SIGTERM during a stream of Resolves, against `broker serve` in a subprocess.

Every call sent before the signal completes with OK (also those still queued inside
gRPC core, which a bare `server.stop()` would cancel), calls refused afterwards are
UNAVAILABLE (never INTERNAL or CANCELLED), the process exits 0 within the grace
period (and, with clients that retry at once, as soon as the work under way is done), and the
audit log (read after a restart on the same data) holds exactly one
allowed `connection.resolve` event per OK response.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.api.drain import SHUTTING_DOWN
from tests.helpers import db_request
from tests.processes import Served, prepare

pytestmark = pytest.mark.e2e

ADMIN = "spiffe://broker.local/tenant/default/admin/cli"
EXECUTOR = "spiffe://broker.local/tenant/default/executor/demo"
PROBE = "spiffe://broker.local/tenant/default/executor/probe"
GRACE_SECONDS = 10
CLIENTS = 4
SIGTERM_AFTER_OK = 300  # responses before the signal
MAX_CALLS = 4000
RETRYING_CLIENTS = 6
MAX_RETRYING_CALLS = 200_000  # a bound on a broken run, never reached by a good one


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    identities = {"admin": ADMIN, "executor": EXECUTOR, "probe": PROBE}
    prepare(tmp_path, identities, "shutdown test CA")
    settings: dict[str, dict[str, Any]] = {
        "storage": {"path": "data/broker.db"},
        "server": {"grace_seconds": GRACE_SECONDS},
        "limits": {"resolve_per_second": 1000000, "resolve_burst": 1000000},
        "monitor": {"spike_min_count": 1000000},
    }
    (tmp_path / "data").mkdir()
    setup = Served.create(tmp_path, "broker", settings)
    try:
        yield setup
    finally:
        setup.kill(timeout=10)


@dataclass
class Outcomes:
    calls: list[tuple[float, float, grpc.StatusCode]] = field(default_factory=list)  # (sent, done, code)
    errors: list[str] = field(default_factory=list)
    ok: int = 0
    sigterm_at: float | None = None


async def _client(served: Served, connection_id: str, outcomes: Outcomes, done: asyncio.Event) -> None:
    """Resolve in a loop on one channel until told to stop or shut out for good."""
    async with served.channel("executor", served.resolve_addr) as channel:
        stub = broker_pb2_grpc.ResolveServiceStub(channel)
        refused = 0
        while not done.is_set() and len(outcomes.calls) < MAX_CALLS:
            sent = time.monotonic()
            try:
                reply = await stub.Resolve(
                    pb.ResolveRequest(connection_id=connection_id), timeout=GRACE_SECONDS * 2
                )
                code = grpc.StatusCode.OK
                assert reply.secrets["password"] == "hunter2"
                outcomes.ok += 1
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                outcomes.errors.append(
                    f"{sent - (outcomes.sigterm_at or sent):+.4f}s {code.name}: {exc.details()}"
                )
            outcomes.calls.append((sent, time.monotonic(), code))
            if code != grpc.StatusCode.OK and outcomes.sigterm_at is not None:
                refused += 1
                if refused >= 5:
                    return  # the broker is gone; a few refusals per client are evidence enough
                await asyncio.sleep(0.05)


async def test_sigterm_drains_in_flight_resolves_and_audits_each_one(served: Served) -> None:
    process = served.start()
    async with served.channel("admin", served.admin_addr) as channel:
        admin = broker_pb2_grpc.AdminServiceStub(channel)
        created = await admin.CreateConnection(db_request(name="drained"))
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))

    outcomes = Outcomes()
    done = asyncio.Event()
    clients = [asyncio.ensure_future(_client(served, created.id, outcomes, done)) for _ in range(CLIENTS)]
    deadline = time.monotonic() + 30
    while outcomes.ok < SIGTERM_AFTER_OK:
        assert time.monotonic() < deadline and not any(c.done() for c in clients), served.logs()
        await asyncio.sleep(0.005)
    outcomes.sigterm_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    returncode = await asyncio.to_thread(process.wait, GRACE_SECONDS + 10)
    exited_after = time.monotonic() - outcomes.sigterm_at
    await asyncio.wait(clients, timeout=10)
    done.set()
    await asyncio.gather(*clients)

    assert returncode == 0, served.logs()
    assert exited_after < GRACE_SECONDS, f"took {exited_after:.1f}s to exit"
    sigterm_at = outcomes.sigterm_at
    before = [code for sent, _, code in outcomes.calls if sent < sigterm_at]
    after = [code for sent, _, code in outcomes.calls if sent >= sigterm_at]
    assert len(outcomes.calls) < MAX_CALLS
    # Everything already sent when the signal came completes...
    assert set(before) == {grpc.StatusCode.OK}, outcomes.errors
    # ...and what came later is either served (still draining) or refused as UNAVAILABLE.
    assert set(after) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, outcomes.errors
    assert grpc.StatusCode.UNAVAILABLE in after
    # Refused by the drain gate while the process was still up, as a retryable "shutting down".
    assert any(SHUTTING_DOWN in error for error in outcomes.errors), outcomes.errors
    # And once it is gone, a new call cannot connect: UNAVAILABLE too.
    async with served.channel("executor", served.resolve_addr) as channel:
        stub = broker_pb2_grpc.ResolveServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Resolve(pb.ResolveRequest(connection_id=created.id), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    logs = served.logs()
    assert "broker_stopping" in logs and "broker_stopped" in logs

    # The same data, a new process: one allowed audit event per OK response, none missing.
    served.start()
    allowed = 0
    async with served.channel("admin", served.admin_addr) as channel:
        admin = broker_pb2_grpc.AdminServiceStub(channel)
        token = ""
        while True:
            page = await admin.ListAuditEvents(
                pb.ListAuditEventsRequest(action="connection.resolve", page_size=1000, page_token=token)
            )
            allowed += sum(1 for event in page.events if event.outcome == "allowed")
            token = page.next_page_token
            if not token:
                break
    assert allowed == outcomes.ok
    served.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert served.process.wait(timeout=GRACE_SECONDS + 10) == 0  # type: ignore[union-attr]


async def _retrying_client(
    served: Served, connection_id: str, outcomes: Outcomes, process: subprocess.Popen[bytes]
) -> None:
    """Resolve in a loop, retrying at once on any error (a retry policy, a load balancer), until the
    process is gone."""
    async with served.channel("executor", served.resolve_addr) as channel:
        stub = broker_pb2_grpc.ResolveServiceStub(channel)
        while len(outcomes.calls) < MAX_RETRYING_CALLS:
            sent = time.monotonic()
            try:
                await stub.Resolve(pb.ResolveRequest(connection_id=connection_id), timeout=GRACE_SECONDS * 2)
                code = grpc.StatusCode.OK
                outcomes.ok += 1
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code != grpc.StatusCode.UNAVAILABLE or SHUTTING_DOWN in (exc.details() or ""):
                    outcomes.errors.append(f"{code.name}: {exc.details()}")
            outcomes.calls.append((sent, time.monotonic(), code))
            if code != grpc.StatusCode.OK and process.poll() is not None:
                return


async def test_clients_that_retry_at_once_do_not_hold_the_drain_open(served: Served) -> None:
    """Refused calls are not arrivals: the process exits soon after the work under way is done,
    well within the grace period, and no call is ever answered CANCELLED."""
    process = served.start()
    async with served.channel("admin", served.admin_addr) as channel:
        admin = broker_pb2_grpc.AdminServiceStub(channel)
        created = await admin.CreateConnection(db_request(name="retried"))
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))

    outcomes = Outcomes()
    clients = [
        asyncio.ensure_future(_retrying_client(served, created.id, outcomes, process))
        for _ in range(RETRYING_CLIENTS)
    ]
    deadline = time.monotonic() + 30
    while outcomes.ok < SIGTERM_AFTER_OK:
        assert time.monotonic() < deadline and not any(c.done() for c in clients), served.logs()
        await asyncio.sleep(0.005)
    outcomes.sigterm_at = sigterm_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    returncode = await asyncio.to_thread(process.wait, GRACE_SECONDS + 10)
    exited_after = time.monotonic() - sigterm_at
    await asyncio.wait_for(asyncio.gather(*clients), timeout=10)

    assert returncode == 0, served.logs()
    codes = {code for _, _, code in outcomes.calls}
    refused = [e for e in outcomes.errors if SHUTTING_DOWN in e]
    unexpected = [e for e in outcomes.errors if SHUTTING_DOWN not in e]
    assert grpc.StatusCode.CANCELLED not in codes, unexpected[:10]
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, unexpected[:10]
    assert refused and not unexpected, unexpected[:10]
    # The drain settles (drain_delay_seconds, 1 s by default), refuses until the calls under way
    # are done, closes, flushes: far from the grace period, however fast the clients retry.
    assert exited_after < GRACE_SECONDS / 2, f"took {exited_after:.1f}s to exit ({len(refused)} refused)"
    assert "broker_stopped" in served.logs()
