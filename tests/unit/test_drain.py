"""DrainGate: which calls it counts, when it refuses, and how long each drain phase lasts."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from broker.api.drain import QUIET_SECONDS, QUIET_TURNS, SHUTTING_DOWN, DrainGate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Aborted(Exception):
    pass


class Context:
    def __init__(self) -> None:
        self.aborted: tuple[Any, str] | None = None

    async def abort(self, code: Any, message: str) -> None:
        self.aborted = (code, message)
        raise Aborted


async def _gated(gate: DrainGate, method: str, body: Any) -> Any:
    async def continuation(details: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(body)

    return await gate.intercept_service(continuation, SimpleNamespace(method=method))


async def test_counts_broker_calls_under_way_and_then_refuses_new_ones() -> None:
    clock = Clock()
    gate = DrainGate(clock)
    release = asyncio.Event()

    async def slow(request: Any, context: Any) -> str:
        await release.wait()
        return "done"

    handler = await _gated(gate, "/broker.v1.ResolveService/Resolve", slow)
    assert gate.last_arrival == clock.now
    running = asyncio.ensure_future(handler.unary_unary(None, Context()))
    await asyncio.sleep(0)
    assert gate.active == 1
    gate.refusing = True
    late = await _gated(gate, "/broker.v1.ResolveService/Resolve", slow)
    context = Context()
    with pytest.raises(Aborted):
        await late.unary_unary(None, context)
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
    release.set()
    assert await running == "done" and gate.active == 0


async def test_health_checks_pass_through_uncounted_even_while_refusing() -> None:
    gate = DrainGate(Clock())
    gate.refusing = True

    async def check(request: Any, context: Any) -> str:
        return "SERVING"

    handler = await _gated(gate, "/grpc.health.v1.Health/Check", check)
    assert await handler.unary_unary(None, Context()) == "SERVING"
    assert gate.last_arrival == float("-inf") and gate.active == 0


async def test_drain_settles_until_quiet_then_refuses_until_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    gate = DrainGate(clock)
    steps: list[tuple[bool, float]] = []

    async def tick(_: float) -> None:
        steps.append((gate.refusing, clock.now))
        clock.now += 0.05
        if clock.now < 100.3:
            gate.last_arrival = clock.now  # calls keep arriving for 0.3 s
        gate.active = 1 if clock.now < 100.6 else 0  # a long call ends at 100.6

    monkeypatch.setattr(asyncio, "sleep", tick)
    gate.last_arrival, gate.active = clock.now, 1
    await gate.drain(settle_until=101.0, deadline=110.0)
    settled = [t for refusing, t in steps if not refusing]
    refused = [t for refusing, t in steps if refusing]
    # Served normally until no arrival for QUIET_SECONDS, then refused until the long call ended.
    # (the last arrival is at 100.25; quiet takes QUIET_SECONDS and QUIET_TURNS turns of 0.05 s here)
    assert settled[-1] == pytest.approx(100.25 + max(QUIET_SECONDS, QUIET_TURNS * 0.05), abs=0.051)
    assert refused and refused[-1] < 100.65 and gate.refusing


async def test_drain_never_outlasts_its_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    gate = DrainGate(clock)

    async def busy(_: float) -> None:
        clock.now += 0.05
        gate.last_arrival = clock.now  # never quiet
        gate.active = 1

    monkeypatch.setattr(asyncio, "sleep", busy)
    gate.last_arrival, gate.active = clock.now, 1
    await gate.drain(settle_until=100.5, deadline=102.0)
    assert gate.refusing and clock.now == pytest.approx(102.0, abs=0.051)
    clock.now = 200.0
    await gate.drain(settle_until=200.0, deadline=200.0)  # grace 0: no waiting at all
    assert clock.now == 200.0


async def test_refused_calls_are_not_arrivals_and_do_not_hold_the_drain_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    gate = DrainGate(clock)

    async def body(request: Any, context: Any) -> str:
        return "served"

    steps: list[float] = []

    async def tick(_: float) -> None:
        # A client that retries at once: a refused call arrives on every tick, for ever.
        steps.append(clock.now)
        clock.now += 0.01
        if gate.refusing and not gate.holding:
            handler = await _gated(gate, "/broker.v1.ResolveService/Resolve", body)
            with pytest.raises(Aborted):
                await handler.unary_unary(None, Context())
        gate.active = 1 if clock.now < 100.2 else 0  # the one call under way ends at 100.2

    monkeypatch.setattr(asyncio, "sleep", tick)
    gate.last_arrival, gate.active = clock.now, 1
    await gate.drain(settle_until=100.0, deadline=110.0)
    # Refused from the start (no settling asked for), done as soon as the call under way ended:
    # 0.2 s of retries did not count (the last arrival that counts is the one at 100.0).
    assert gate.refusing and gate.holding
    assert clock.now == pytest.approx(100.2, abs=0.011) and len(steps) > 15


async def test_once_idle_new_calls_are_held_until_released_then_refused() -> None:
    clock = Clock()
    gate = DrainGate(clock)
    served = []

    async def body(request: Any, context: Any) -> str:
        served.append(request)
        return "served"

    await gate.drain(settle_until=clock.now, deadline=clock.now)  # no time left: straight to holding
    assert gate.refusing and gate.holding
    clock.now += 1
    handler = await _gated(gate, "/broker.v1.ResolveService/Resolve", body)
    assert gate.last_arrival == clock.now  # a held call is an arrival: it is not answered yet
    context = Context()
    held = asyncio.ensure_future(handler.unary_unary("request", context))
    await asyncio.sleep(0.01)
    assert not held.done() and context.aborted is None and gate.active == 0
    gate.release()
    with pytest.raises(Aborted):
        await held
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN) and served == []


async def test_a_stalled_loop_is_not_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls that reached gRPC core while the loop stood still are dispatched only in the turns
    after the stall: the stall itself must not count as quiet (then held calls could still sit
    in core when the server stops, and be answered CANCELLED)."""
    clock = Clock()
    gate = DrainGate(clock)
    ticks = 0

    async def tick(_: float) -> None:
        nonlocal ticks
        ticks += 1
        clock.now += 0.5 if ticks == 1 else 0.01  # a stall of 0.5 s, then ordinary turns
        if ticks == 2:
            gate.last_arrival = clock.now  # what queued during the stall arrives now

    monkeypatch.setattr(asyncio, "sleep", tick)
    gate.last_arrival = clock.now
    await gate.drain(settle_until=101.0, deadline=110.0)
    assert ticks >= 2 + QUIET_TURNS
    assert clock.now >= 100.51 + QUIET_SECONDS
