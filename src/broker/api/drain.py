"""Draining: a shutdown that keeps its promise to calls already sent, and ends when the work ends.

`grpc.aio`'s `server.stop(grace)` cancels, at once and whatever the grace period,
every call that gRPC core has received but not yet handed to Python (the queue
behind the one outstanding request-call), and every call that reaches the server
while the stop begins: those clients see CANCELLED. So the broker stops a server
only once no call can be in that queue. Each listener has its own gate, with these
phases (the broker runs them on every gate together, then stops the servers):

1. settle: serve every call as usual (health already says NOT_SERVING) until no
   call has arrived for `QUIET_SECONDS`, at most `server.drain_delay_seconds`;
   what was queued when SIGTERM came is dispatched and served in this phase;
2. refuse: a call dispatched now gets UNAVAILABLE at once, a retryable "shutting
   down", while the calls under way finish. A refused call is not an arrival: a
   client that retries at once on UNAVAILABLE (a retry policy, a load balancer)
   cannot hold the drain open;
3. hold: once no call is under way, a new call is held, not answered, so a client
   that retries at once waits on its call instead of sending another; when none
   has arrived for `QUIET_SECONDS` nothing is queued inside gRPC core;
4. `server.stop()` begins (no new streams, GOAWAY to every client), and only then
   are the held calls `release()`d: they get UNAVAILABLE like the refused ones, and
   a retry finds the listener closed (UNAVAILABLE, never CANCELLED).

`stop_listeners` runs all four on every listener together. Every phase ends at the
deadline the broker gives (within `server.grace_seconds`).
Only the broker's own services pass through the gate: health checks keep answering
(NOT_SERVING) and are never counted.

The gate also caches the wrapped handler chain per method. It is one gate per
listener (server), because the handler a server's continuation returns is that
server's own: a cache shared by two listeners would let one answer the other's
services (invariant 9).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from broker.api.handlers import Stream, Unary, wrap_handler

QUIET_SECONDS = 0.1
SHUTTING_DOWN = "the broker is shutting down; retry (another replica or in a moment)"
_POLL_SECONDS = 0.01
# Quiet also takes this many turns of the event loop without an arrival: a loop that was stalled
# (a loaded machine) heard no arrivals while it stood still, and calls that reached gRPC core
# meanwhile are dispatched only in the turns after it; time alone would call the stall quiet.
QUIET_TURNS = 5


class DrainGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """One listener's gate: counts the broker calls under way and, once told to, turns new ones away."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.active = 0
        self.refusing = False
        self.holding = False
        self.last_arrival = float("-inf")
        self._released = asyncio.Event()
        # The wrapped chain per method of this listener: its services are fixed, so the handlers
        # every interceptor builds are built once per method, not once per call (measurable on
        # Resolve).
        self._handlers: dict[str, Any] = {}

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        if not details.method.startswith("/broker."):
            return await continuation(details)
        # A call refused at once says nothing about what gRPC core still queues; a held one does.
        if self.holding or not self.refusing:
            self.last_arrival = self._clock()
        cached = self._handlers.get(details.method)
        if cached is None:
            cached = self._handlers[details.method] = wrap_handler(await continuation(details), self)
        return cached

    async def _refuse(self, context: Any) -> None:
        """Abort the call with UNAVAILABLE (once released, when held)."""
        if self.holding:
            await self._released.wait()
        await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    def unary(self, behaviour: Unary) -> Unary:
        async def counted(request: Any, context: Any) -> Any:
            if self.refusing:  # checked here: no extra await on a call that is served
                await self._refuse(context)
            self.active += 1
            try:
                return await behaviour(request, context)
            finally:
                self.active -= 1

        return counted

    def stream(self, behaviour: Stream) -> Stream:
        async def counted(request: Any, context: Any) -> AsyncIterator[Any]:
            if self.refusing:
                await self._refuse(context)
            self.active += 1
            try:
                async for response in behaviour(request, context):
                    yield response
            finally:
                self.active -= 1

        return counted

    def quiet(self) -> bool:
        """No call (held or served) has arrived for `QUIET_SECONDS`."""
        return self._clock() - self.last_arrival >= QUIET_SECONDS

    async def drain(self, settle_until: float, deadline: float) -> None:
        """Phases 1 to 3 above; times are `clock()` values. Returns when stopping is safe or due."""
        seen, turns = self.last_arrival, 0

        def quiet() -> bool:
            """`quiet()`, over at least `QUIET_TURNS` turns of the loop since the last arrival."""
            return turns >= QUIET_TURNS and self.last_arrival == seen and self.quiet()

        async def turn() -> None:
            nonlocal seen, turns
            await asyncio.sleep(_POLL_SECONDS)
            seen, turns = self.last_arrival, (turns + 1 if self.last_arrival == seen else 0)

        # Polling, not an Event: "quiet" is about time passing without arrivals.
        while self._clock() < min(settle_until, deadline) and not quiet():
            await turn()
        self.refusing = True
        while self._clock() < deadline and self.active:
            await turn()
        self.holding = True
        while self._clock() < deadline and (self.active or not quiet()):
            await turn()

    def release(self) -> None:
        """Answer the held calls (UNAVAILABLE); call it once the server has begun to stop."""
        self._released.set()


async def stop_listeners(
    listeners: Sequence[tuple[DrainGate, grpc.aio.Server]], settle_until: float, closed_by: float
) -> None:
    """Drain every listener together, then stop its server; `time.monotonic()` times. What still
    runs at `closed_by` is cancelled."""
    await asyncio.gather(*(gate.drain(settle_until, closed_by) for gate, _ in listeners))
    remaining = max(0.0, closed_by - time.monotonic())
    stopping = asyncio.gather(*(server.stop(remaining) for _, server in listeners))
    # One turn of the loop and each stop has begun: only now are the held calls answered, so
    # their retries cannot reach a server that is half stopped (it would answer them CANCELLED;
    # answering them first gave dozens of CANCELLED with 20 clients retrying at once).
    await asyncio.sleep(0)
    for gate, _ in listeners:
        gate.release()
    await stopping
