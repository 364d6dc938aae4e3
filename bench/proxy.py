"""The proxy scenario: a GET through `ProxyHttp` against the same GET sent straight to the upstream.

A small HTTP/1.1 upstream (`bench.servers upstream`: keep-alive, a fixed JSON answer) and a
broker of its own (`proxy.toml`: the bench's settings, plus loopback egress and the proxy
rate limit lifted) with one `http` connection to the upstream (bearer token) and a PROXY
grant to the bench executor. One client process, the same for both paths:

* latency, one call in flight: p50 and p99 of each path, and what the proxy adds;
* throughput, `in_flight` calls in flight (closed loop): calls per second of each, and
  their ratio.

The direct client holds the token itself; through the proxy it never does.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from google.protobuf import struct_pb2

from bench import world
from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc

TOKEN = "bench-upstream-token-0123456789"  # noqa: S105 (the stand-in upstream's, not a secret)


def proxy_config(env: world.BenchEnv) -> Path:
    """`<root>/proxy.toml`: the bench broker's settings on a database of its own, the proxy rate
    limit lifted like the others, and loopback allowed to the egress policy (the upstream)."""
    text = env.config.read_text().replace('path = "broker.db"', 'path = "proxy.db"')
    text = text.replace("[limits]\n", "[limits]\nproxy_per_second = 1000000\nproxy_burst = 1000000\n", 1)
    path = env.root / "proxy.toml"
    path.write_text(text + "[egress]\nallow_loopback = true\n")
    return path


async def prepare(env: world.BenchEnv, admin_port: int, upstream_port: int) -> None:
    """The connection to the upstream and the bench executor's PROXY grant, over the admin API."""
    async with world.channel(env, env.admin, admin_port) as channel:
        admin = broker_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        config = struct_pb2.Struct()
        config.update({"base_url": f"http://127.0.0.1:{upstream_port}", "auth_type": "bearer"})
        created = await admin.CreateConnection(
            pb.CreateConnectionRequest(name="upstream", type="http", config=config, secrets={"token": TOKEN})
        )
        await admin.GrantAccess(
            pb.GrantAccessRequest(
                connection_id=created.id, principal=world.EXECUTOR, mode=pb.GRANT_MODE_PROXY
            )
        )


async def _closed_loop(call: Callable[[], Awaitable[Any]], in_flight: int, seconds: float) -> list[float]:
    """Latencies (seconds) of every call completed within `seconds`, `in_flight` at a time."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return latencies


def _summary(latencies: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "calls": len(ordered),
        "per_second": round(len(ordered) / seconds, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 3),
    }


async def measure(
    env: world.BenchEnv, resolve_port: int, upstream_port: int, seconds: float, in_flight: int
) -> dict[str, Any]:
    """Both paths, one call in flight then `in_flight`, each after a warm-up of a second."""
    request = pb.ProxyHttpRequest(name="upstream", method="GET", path="/items")
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        world.channel(env, env.executor, resolve_port) as channel,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{upstream_port}", limits=limits, headers=headers
        ) as http,
    ):
        proxy = broker_pb2_grpc.ProxyServiceStub(channel)  # type: ignore[no-untyped-call]

        async def direct() -> None:
            (await http.get("/items")).raise_for_status()

        async def proxied() -> None:
            if (await proxy.ProxyHttp(request)).status != 200:
                raise RuntimeError("the proxied call did not answer 200")

        report: dict[str, Any] = {}
        for label, concurrency in (("one_in_flight", 1), ("saturated", in_flight)):
            for path, call in (("direct", direct), ("proxy", proxied)):
                await _closed_loop(call, concurrency, 1.0)  # warm-up: connections, caches
                report[f"{path}_{label}"] = _summary(await _closed_loop(call, concurrency, seconds), seconds)
    one, sat = report["proxy_one_in_flight"], report["direct_one_in_flight"]
    report["added_p50_ms"] = round(one["p50_ms"] - sat["p50_ms"], 3)
    report["added_p99_ms"] = round(one["p99_ms"] - sat["p99_ms"], 3)
    report["throughput_ratio"] = round(
        report["proxy_saturated"]["per_second"] / report["direct_saturated"]["per_second"], 3
    )
    return report
