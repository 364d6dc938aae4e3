"""Draining: a shutdown that keeps its promise to calls already sent.

`grpc.aio`'s `server.stop(grace)` cancels, at once and whatever the grace period,
every call that gRPC core has received but not yet handed to Python (the queue
behind the one outstanding request-call): those clients see CANCELLED although
they sent their call before the shutdown began (seen with grpcio 1.85 under load).
So the broker does not stop its servers while calls may still be queued:

1. settle: serve every call as usual (health already says NOT_SERVING) until no
   call has arrived for `QUIET_SECONDS`, at most `server.drain_delay_seconds`;
   what was queued when SIGTERM came is dispatched and served in this phase;
2. refuse: a call dispatched now gets UNAVAILABLE at once, a retryable "shutting
   down", while the calls under way finish; until none is under way and none has
   arrived for `QUIET_SECONDS`, at most until the grace period ends;
3. then `server.stop()` with what is left of the grace period.

Only the broker's own services pass through the gate: health checks keep
answering (NOT_SERVING) and are never counted as calls under way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

QUIET_SECONDS = 0.1
SHUTTING_DOWN = "the broker is shutting down; retry (another replica or in a moment)"
_POLL_SECONDS = 0.01


class DrainGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts the broker calls under way and, once told to refuse, turns new ones away."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.active = 0
        self.refusing = False
        self.last_arrival = float("-inf")
        # The wrapped chain per broker method: the services are fixed, so the handlers every
        # interceptor builds are built once per method, not once per call (measurable on Resolve).
        self._handlers: dict[str, Any] = {}

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        if not details.method.startswith("/broker."):
            return await continuation(details)
        self.last_arrival = self._clock()
        cached = self._handlers.get(details.method)
        if cached is None:
            cached = self._handlers[details.method] = self._wrap(await continuation(details))
        return cached

    def _wrap(self, handler: Any) -> Any:
        if handler is None:
            return None
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def counted(request: Any, context: Any) -> Any:
                if self.refusing:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                self.active += 1
                try:
                    return await unary(request, context)
                finally:
                    self.active -= 1

            return grpc.unary_unary_rpc_method_handler(counted, **kwargs)
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def counted_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                if self.refusing:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                self.active += 1
                try:
                    async for response in stream(request, context):
                        yield response
                finally:
                    self.active -= 1

            return grpc.unary_stream_rpc_method_handler(counted_stream, **kwargs)
        return handler

    def quiet(self) -> bool:
        """No call has arrived for `QUIET_SECONDS`."""
        return self._clock() - self.last_arrival >= QUIET_SECONDS

    async def drain(self, settle_until: float, deadline: float) -> None:
        """Phases 1 and 2 above; times are `clock()` values. Returns when stopping is safe or due."""
        # Polling, not an Event: "quiet" is about time passing without arrivals.
        while self._clock() < min(settle_until, deadline) and not self.quiet():  # noqa: ASYNC110
            await asyncio.sleep(_POLL_SECONDS)
        self.refusing = True
        while self._clock() < deadline and (self.active or not self.quiet()):  # noqa: ASYNC110
            await asyncio.sleep(_POLL_SECONDS)
