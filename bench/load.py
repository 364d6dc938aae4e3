"""The load client: several processes, each with a few warm channels and many calls in flight.

Closed loop (`rate == 0`): every process keeps `concurrency` calls in flight and
starts the next as soon as one ends; the throughput is the saturation.
Open loop (`rate > 0`): every process sends at a fixed rate whether or not
earlier calls have finished; a call's latency counts from its *scheduled* send
time, so a stalled server cannot hide its queueing (no coordinated omission).

Every call's gRPC status code is counted; a call counts as done only when its
status is known. Processes agree on one wall-clock window: a warm-up first
(connections open, caches fill, nothing recorded), then the measured window.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import struct_pb2

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc

# Open loop: calls beyond this many in flight in one process are dropped (and counted).
MAX_OUTSTANDING = 4096


@dataclass(frozen=True)
class LoadSpec:
    port: int
    ca: bytes
    cert: bytes
    key: bytes
    call: str  # "resolve" or "create"
    # Several servers (replicas): each process's channels go round-robin over these instead
    # of `port`; with `concurrency` a multiple of `channels`, calls in flight split evenly.
    ports: tuple[int, ...] = ()
    ids: tuple[str, ...] = ()  # Resolve targets, picked uniformly at random
    concurrency: int = 32  # closed loop: calls in flight per process
    channels: int = 2  # HTTP/2 connections per process
    warmup: float = 2.0
    duration: float = 10.0
    rate: float = 0.0  # open loop: calls per second per process
    start_at: float = 0.0  # wall clock; set by `run_load`


@dataclass
class LoadResult:
    duration: float
    codes: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    dropped: int = 0

    @property
    def calls(self) -> int:
        return sum(self.codes.values())

    @property
    def ok(self) -> int:
        return self.codes.get("OK", 0)

    def percentile(self, p: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _caller(
    spec: LoadSpec, channel: grpc.aio.Channel, seq: Callable[[], int]
) -> Callable[[], Awaitable[Any]]:
    if spec.call == "resolve":
        resolve = broker_pb2_grpc.ResolveServiceStub(channel).Resolve  # type: ignore[no-untyped-call]
        ids = spec.ids
        requests = [pb.ResolveRequest(connection_id=i, purpose="bench") for i in ids]
        if len(requests) == 1:
            only = requests[0]
            return lambda: resolve(only, timeout=30)
        return lambda: resolve(random.choice(requests), timeout=30)  # noqa: S311 (load, not keys)
    if spec.call == "create":
        create = broker_pb2_grpc.AdminServiceStub(channel).CreateConnection  # type: ignore[no-untyped-call]
        config = struct_pb2.Struct()
        config.update({"auth_type": "bearer"})
        pid = os.getpid()

        def one() -> Awaitable[Any]:
            n = seq()
            request = pb.CreateConnectionRequest(
                name=f"new-{pid}-{n}",
                type="http",
                config=config,
                secrets={"token": f"bench-token-{pid}-{n}"},
                labels={"team": "bench"},
            )
            request.config["base_url"] = f"https://api.example.com/{pid}/{n}"
            call: Awaitable[Any] = create(request, timeout=30)
            return call

        return one
    raise ValueError(f"unknown call {spec.call!r}")


def _channel_ports(spec: LoadSpec) -> list[int]:
    """The port of each of a process's channels: every target gets the same number."""
    targets = spec.ports or (spec.port,)
    if spec.channels % len(targets):
        raise ValueError(f"{spec.channels} channels do not split evenly over {len(targets)} ports")
    return [targets[i % len(targets)] for i in range(spec.channels)]


async def _run(spec: LoadSpec) -> LoadResult:
    creds = grpc.ssl_channel_credentials(spec.ca, spec.key, spec.cert)
    # A local subchannel pool: each channel really is its own HTTP/2 connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options) for port in _channel_ports(spec)]
    counter = itertools.count()
    callers = [_caller(spec, ch, lambda: next(counter)) for ch in channels]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 10)
        offset = time.time() - time.perf_counter()
        record_from = spec.start_at + spec.warmup - offset
        end = record_from + spec.duration
        await asyncio.sleep(max(0.0, spec.start_at - offset - time.perf_counter()))
        result = LoadResult(spec.duration)
        if spec.rate > 0:
            await _open_loop(spec, callers, record_from, end, result)
        else:
            tasks = [
                _closed_loop(callers[i % len(callers)], record_from, end, result)
                for i in range(spec.concurrency)
            ]
            await asyncio.gather(*tasks)
        return result
    finally:
        for channel in channels:
            await channel.close()


async def _one(call: Callable[[], Awaitable[Any]]) -> str:
    try:
        await call()
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    return "OK"


async def _closed_loop(
    call: Callable[[], Awaitable[Any]], record_from: float, end: float, result: LoadResult
) -> None:
    clock = time.perf_counter
    while (started := clock()) < end:
        code = await _one(call)
        if started >= record_from:
            result.latencies_ms.append((clock() - started) * 1000)
            result.codes[code] += 1


async def _open_loop(
    spec: LoadSpec,
    callers: list[Callable[[], Awaitable[Any]]],
    record_from: float,
    end: float,
    result: LoadResult,
) -> None:
    clock = time.perf_counter
    interval = 1.0 / spec.rate
    pending: set[asyncio.Task[None]] = set()

    async def timed(call: Callable[[], Awaitable[Any]], scheduled: float) -> None:
        code = await _one(call)
        if scheduled >= record_from:
            result.latencies_ms.append((clock() - scheduled) * 1000)
            result.codes[code] += 1

    scheduled = record_from - spec.warmup
    for n in itertools.count():
        if scheduled >= end:
            break
        wait = scheduled - clock()
        if wait > 0:
            await asyncio.sleep(wait)
        if len(pending) >= MAX_OUTSTANDING:
            result.dropped += scheduled >= record_from
        else:
            task = asyncio.create_task(timed(callers[n % len(callers)], scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        scheduled += interval
    if pending:
        await asyncio.gather(*pending)


def _worker(spec: LoadSpec) -> LoadResult:
    return asyncio.run(_run(spec))


class Window:
    """Called at the start and at the end of the measured window (in the parent process)."""

    def start(self) -> None: ...

    def end(self) -> None: ...


def client_pool(processes: int) -> Any:
    """The load processes, started once (spawned: no state inherited) and reused by every run."""
    return multiprocessing.get_context("spawn").Pool(processes)


def run_load(
    spec: LoadSpec, pool: Any, processes: int, window: Window | None = None, lead: float = 1.0
) -> LoadResult:
    """Run `spec` in each of the pool's `processes`, merged; `window` brackets the measured part."""
    spec = LoadSpec(**{**spec.__dict__, "start_at": time.time() + lead})
    window = window or Window()
    # One long task per process: while one worker holds its task, the next task goes to another.
    pending = pool.map_async(_worker, [spec] * processes, chunksize=1)
    time.sleep(max(0.0, spec.start_at + spec.warmup - time.time()))
    window.start()
    time.sleep(max(0.0, spec.start_at + spec.warmup + spec.duration - time.time()))
    window.end()
    parts = pending.get(timeout=spec.warmup + spec.duration + 120)
    merged = LoadResult(spec.duration)
    for part in parts:
        merged.codes.update(part.codes)
        merged.latencies_ms.extend(part.latencies_ms)
        merged.dropped += part.dropped
    return merged


def _noop(_: int) -> int:
    return os.getpid()


def warm_pool(pool: Any, processes: int) -> list[int]:
    """Import grpc and the stubs in every worker before anything is timed; the workers' pids."""
    return sorted(set(pool.map(_noop, range(processes * 4), chunksize=1)))
