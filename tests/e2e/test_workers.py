"""`broker serve --workers 2` on PostgreSQL, as a subprocess on free ports with a fresh database.

Which worker holds a channel is read from the kernel, not from the broker: each channel gets its
own TCP connection (a local subchannel pool), and the worker is the process whose descriptors
include the accepted socket (/proc/<pid>/fd against /proc/net/tcp6). So the tests can open a
channel on each worker and write through one, read through the other.

Without BROKER_TEST_POSTGRES_DSN the PostgreSQL tests are skipped with the reason; the SQLite
refusal needs no server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.api.drain import SHUTTING_DOWN
from tests.helpers import EXECUTOR, db_request
from tests.postgres_db import fresh_database
from tests.processes import BROKER, PROBE, Served, prepare, without_broker_variables

pytestmark = pytest.mark.e2e

ADMIN = "spiffe://broker.local/tenant/default/admin/cli"
GRACE_SECONDS = 10
START_SECONDS = 45
NO_LIMITS = {"resolve_per_second": 1000000, "resolve_burst": 1000000}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """`broker serve --workers 2` set up (not started) on a fresh PostgreSQL database."""
    async with fresh_database() as dsn:
        prepare(tmp_path, {"probe": PROBE, "admin": ADMIN, "executor": EXECUTOR}, "workers test CA")
        settings = {
            "storage": {"url": dsn, "pool_max": 4},
            "server": {"grace_seconds": GRACE_SECONDS},
            "limits": NO_LIMITS,
            "monitor": {"spike_min_count": 1000000},
        }
        # TMPDIR: the supervisor's metrics directory, left behind when a test kills it outright.
        env = {**without_broker_variables(), "TMPDIR": str(tmp_path)}
        setup = Served.create(tmp_path, "broker", settings, metrics=True, env=env)
        setup.serve_args = ("--workers", "2")
        try:
            yield setup
        finally:
            pids = _worker_pids(setup)
            setup.kill(timeout=10)
            for pid in pids:  # the supervisor was killed: its workers stop on their lifeline; make sure
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _events(served: Served) -> list[dict[str, Any]]:
    found = []
    for line in served.logs().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                found.append(event)
    return found


def _worker_pids(served: Served) -> list[int]:
    """The pid of each worker slot's latest SERVING process, by the supervisor's log."""
    latest: dict[int, int] = {}
    for event in _events(served):
        if event.get("event") == "worker_serving":
            latest[event["worker"]] = event["pid"]
    return [latest[index] for index in sorted(latest)]


def _start(served: Served) -> list[int]:
    """Start the supervisor; return the workers' pids once it logs that every worker is SERVING."""
    process = served.spawn()
    deadline = time.monotonic() + START_SECONDS
    while not any(e.get("event") == "broker_started" and e.get("workers") == 2 for e in _events(served)):
        assert process.poll() is None, f"the supervisor exited early:\n{served.logs()}"
        assert time.monotonic() < deadline, f"not SERVING in time:\n{served.logs()}"
        time.sleep(0.1)
    pids = _worker_pids(served)
    assert len(pids) == 2 and served.pid not in pids, served.logs()
    return pids


def _established(port: int) -> set[int]:
    """Socket inodes of the established TCP connections accepted on local `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def _sockets(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _holders(pids: list[int], port: int) -> dict[int, set[int]]:
    """For each pid, its established connections on `port`."""
    accepted = _established(port)
    return {pid: _sockets(pid) & accepted for pid in pids}


def _channel(served: Served, who: str, addr: str) -> grpc.aio.Channel:
    tls = served.root / "tls"
    credentials = grpc.ssl_channel_credentials(
        (tls / "ca.pem").read_bytes(),
        (tls / f"{who}-key.pem").read_bytes(),
        (tls / f"{who}.pem").read_bytes(),
    )
    # Its own subchannel: a TCP connection of its own, not one shared with the other channels.
    return grpc.aio.secure_channel(addr, credentials, options=[("grpc.use_local_subchannel_pool", 1)])


async def _channel_on_each(
    served: Served, who: str, addr: str, pids: list[int]
) -> dict[int, grpc.aio.Channel]:
    """A channel held by each worker: open channels (at most 40) until every worker holds one."""
    port = int(addr.rpartition(":")[2])
    found: dict[int, grpc.aio.Channel] = {}
    spare: list[grpc.aio.Channel] = []
    for _ in range(40):
        before = _holders(pids, port)
        channel = _channel(served, who, addr)
        await asyncio.wait_for(channel.channel_ready(), 10)
        await asyncio.sleep(0.05)  # the worker's accept() may trail the client's handshake a little
        after = _holders(pids, port)
        owners = [pid for pid in pids if after[pid] - before[pid]]
        assert len(owners) == 1, f"a new connection seen in {owners} (before {before}, after {after})"
        if owners[0] in found:
            spare.append(channel)
        else:
            found[owners[0]] = channel
        if len(found) == len(pids):
            break
    for channel in spare:
        await channel.close()
    assert len(found) == len(pids), f"40 connections, all to one worker: {list(found)}"
    return found


def _metrics(served: Served) -> str:
    with urllib.request.urlopen(served.metrics_url, timeout=5) as reply:
        return str(reply.read().decode())


async def _connection(admin: broker_pb2_grpc.AdminServiceStub, name: str) -> str:
    created = await admin.CreateConnection(db_request(name=name))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    return str(created.id)


async def test_both_workers_serve_and_a_revoke_through_one_reaches_the_other_within_a_second(
    served: Served,
) -> None:
    pids = _start(served)
    admins = await _channel_on_each(served, "admin", served.admin_addr, pids)
    executors = await _channel_on_each(served, "executor", served.resolve_addr, pids)
    writer, reader = pids  # write through worker 0's admin listener, read through worker 1's resolver
    admin = broker_pb2_grpc.AdminServiceStub(admins[writer])
    connection_id = await _connection(admin, "shared")

    # Each worker serves Resolve on the one port; the reader's cache now holds the connection.
    calls = 0
    for pid in pids:
        for _ in range(3):
            reply = await broker_pb2_grpc.ResolveServiceStub(executors[pid]).Resolve(
                pb.ResolveRequest(connection_id=connection_id)
            )
            assert reply.secrets["password"] == "hunter2"
            calls += 1

    # One endpoint for both workers' metrics: the Resolves of both, summed; one change listener each.
    text = _metrics(served)
    assert f'broker_resolves_total{{outcome="allowed",reason=""}} {float(calls)}' in text, text
    assert "broker_change_listener_connected 1.0" in text
    assert "broker_rpcs_total" in text and "broker_rpc_duration_seconds_bucket" in text

    # Revoked through the writer, refused by the reader within a second.
    await admin.RevokeConnection(pb.RevokeConnectionRequest(id=connection_id, reason="test"))
    revoked_at = time.monotonic()
    resolver = broker_pb2_grpc.ResolveServiceStub(executors[reader])
    while True:
        try:
            await resolver.Resolve(pb.ResolveRequest(connection_id=connection_id), timeout=5)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION), exc
            break
        assert time.monotonic() - revoked_at < 1.0, "the other worker still released the revoked connection"
        await asyncio.sleep(0.01)
    assert time.monotonic() - revoked_at < 1.0
    for channel in [*admins.values(), *executors.values()]:
        await channel.close()


async def test_a_killed_worker_is_logged_and_restarted(served: Served) -> None:
    pids = _start(served)
    killed = pids[0]
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + START_SECONDS
    while True:
        now = _worker_pids(served)
        if len(now) == 2 and killed not in now:
            break
        assert served.running(), served.logs()
        assert time.monotonic() < deadline, f"not restarted:\n{served.logs()}"
        await asyncio.sleep(0.1)
    exits = [e for e in _events(served) if e.get("event") == "worker_exited"]
    assert [(e["pid"], e["signal"], e["worker"]) for e in exits] == [(killed, "SIGKILL", 0)], exits
    assert exits[0]["restart_in_seconds"] > 0
    # The new worker serves on the shared port, next to the one that never stopped.
    async with _channel(served, "admin", served.admin_addr) as channel:
        connection_id = await _connection(broker_pb2_grpc.AdminServiceStub(channel), "after-restart")
    executors = await _channel_on_each(served, "executor", served.resolve_addr, now)
    for channel in executors.values():
        stub = broker_pb2_grpc.ResolveServiceStub(channel)
        assert (await stub.Resolve(pb.ResolveRequest(connection_id=connection_id))).secrets["password"]
        await channel.close()

    # The supervisor itself dies (SIGKILL, nothing forwarded): the workers see their lifeline close,
    # drain and stop, rather than hold the port unsupervised.
    served.process.kill()  # type: ignore[union-attr]
    served.process.wait(10)  # type: ignore[union-attr]
    deadline = time.monotonic() + GRACE_SECONDS + 10
    while any(_alive(pid) for pid in now):
        assert time.monotonic() < deadline, f"workers outlived their supervisor:\n{served.logs()}"
        await asyncio.sleep(0.1)
    gone = [e for e in _events(served) if e.get("event") == "supervisor_gone"]
    assert sorted(e["worker"] for e in gone) == [0, 1], gone


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it has stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def _load(channel: grpc.aio.Channel, connection_id: str, calls: list[tuple[float, str]]) -> None:
    """Resolve in a loop (bounded) until refused; record (sent at, code) of each call."""
    stub = broker_pb2_grpc.ResolveServiceStub(channel)
    for _ in range(5000):
        sent = time.monotonic()
        try:
            await stub.Resolve(pb.ResolveRequest(connection_id=connection_id), timeout=GRACE_SECONDS * 2)
            calls.append((sent, "OK"))
        except grpc.aio.AioRpcError as exc:
            calls.append((sent, f"{exc.code().name}: {exc.details()}"))
            return


async def test_sigterm_drains_both_workers_with_no_failed_call(served: Served) -> None:
    pids = _start(served)
    admins = await _channel_on_each(served, "admin", served.admin_addr, pids)
    connection_id = await _connection(
        broker_pb2_grpc.AdminServiceStub(next(iter(admins.values()))), "drained"
    )
    executors = await _channel_on_each(served, "executor", served.resolve_addr, pids)
    calls: list[tuple[float, str]] = []
    load = [
        asyncio.ensure_future(_load(ch, connection_id, calls)) for ch in executors.values() for _ in range(3)
    ]
    deadline = time.monotonic() + 30
    while sum(1 for _, code in calls if code == "OK") < 300:
        assert time.monotonic() < deadline and not any(task.done() for task in load), served.logs()
        await asyncio.sleep(0.005)
    sigterm_at = time.monotonic()
    served.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    returncode = await asyncio.to_thread(served.process.wait, GRACE_SECONDS + 15)  # type: ignore[union-attr]
    await asyncio.wait_for(asyncio.gather(*load), 10)

    assert returncode == 0, served.logs()
    # Every call sent before the signal completed OK; later ones were served, or refused with
    # UNAVAILABLE (retryable): "shutting down" by a draining worker, or, once both had closed their
    # listeners, no connection. As for one broker (tests/e2e/test_shutdown.py), never CANCELLED.
    assert {code for sent, code in calls if sent < sigterm_at} == {"OK"}
    later = {code for sent, code in calls if sent >= sigterm_at}
    # On failure: when each refused call was sent, and the last OK one, relative to the signal.
    refusals = sorted((round(sent - sigterm_at, 3), code[:40]) for sent, code in calls if code != "OK")
    last_ok = max(sent for sent, code in calls if code == "OK") - sigterm_at
    assert all(code == "OK" or code.startswith("UNAVAILABLE") for code in later), (refusals, last_ok)
    assert any(SHUTTING_DOWN in code for code in later), later
    # Both drained and stopped: no worker left behind.
    for pid in pids:
        assert not _alive(pid), f"worker {pid} still runs"
    events = _events(served)
    stopped = [e for e in events if e.get("event") == "worker_stopped"]
    assert sorted((e["pid"], e["exit_code"]) for e in stopped) == sorted((pid, 0) for pid in pids), stopped
    assert sum(1 for e in events if e.get("event") == "broker_stopped" and "worker" in e) == 2
    for channel in [*admins.values(), *executors.values()]:
        await channel.close()


def _serve(root: Path, config: Path, *args: str) -> Any:
    import subprocess

    argv = [*BROKER, "serve", "--config", str(config), *args]
    env = without_broker_variables()
    return subprocess.run(argv, capture_output=True, text=True, cwd=root, env=env, timeout=60, check=False)


@pytest.fixture
def sqlite_served(tmp_path: Path) -> Iterator[Served]:
    prepare(tmp_path, {"probe": PROBE}, "workers test CA")
    yield Served.create(tmp_path, "broker", {"storage": {"path": "broker.db"}})


def test_workers_on_sqlite_are_refused_with_the_setting_named(sqlite_served: Served) -> None:
    for args, config in ((("--workers", "2"), {}), ((), {"server": {"workers": 3}})):
        sqlite_served.settings.update(config)
        sqlite_served.write_config()
        refused = _serve(sqlite_served.root, sqlite_served.config, *args)
        assert refused.returncode == 2, refused.stderr
        assert "storage.url" in refused.stderr and "SQLite has no cross-process change feed" in refused.stderr
        assert not (sqlite_served.root / "broker.db").exists()  # refused before anything was opened


def test_workers_that_cannot_work_are_refused_before_any_starts(tmp_path: Path) -> None:
    prepare(tmp_path, {"probe": PROBE}, "workers test CA")
    # No database behind this URL: every refusal here comes before anything would connect.
    served = Served.create(tmp_path, "broker", {"storage": {"url": "postgresql://127.0.0.1:1/none"}})
    refused = _serve(tmp_path, served.config, "--workers", "0")
    assert refused.returncode == 2 and "--workers must be at least 1" in refused.stderr, refused.stderr

    # A port held by another process (here a plain listener; a broker's workers would be refused too).
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", int(served.admin_addr.rpartition(":")[2])))
        holder.listen()
        refused = _serve(tmp_path, served.config, "--workers", "2")
    assert refused.returncode == 2, refused.stderr
    assert f"{served.admin_addr} is in use" in refused.stderr and "listen.admin" in refused.stderr

    served.resolve_addr = "127.0.0.1:0"
    served.write_config()
    refused = _serve(tmp_path, served.config, "--workers", "2")
    assert refused.returncode == 2, refused.stderr
    assert "listen.resolve" in refused.stderr and "port 0" in refused.stderr
