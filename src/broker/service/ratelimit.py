"""Rate limits: a token bucket per principal and class of call.

Classes: `resolve`, `admin_write` (every admin call that changes something),
`test` (connection tests and MCP discovery). Reads are not limited.

Where a bucket lives:
* `resolve`: in this process. Taking a token has no await in it, so concurrent
  calls on the event loop can never overshoot, and the hot path pays no round
  trip. With several replicas each enforces the configured rate on its own, so
  the total across R replicas is up to R times it. That is deliberate: an
  executor keeps one long-lived HTTP/2 connection to one replica, so dividing
  the rate by R would throttle every executor to 1/R of what it was given.
* `admin_write` and `test` (`shared=True`): in the store (`Coordination.take_rate_token`),
  one bucket per principal for all replicas together, so N per minute means N in
  total. These calls write to the store anyway; the bucket adds one transaction.

A class may also cap the calls a principal has under way at once (`in_flight`, per process):
`proxy`, whose calls hold an upstream connection from a pool every principal shares and,
until gRPC has sent it, an answer of up to `egress.max_response_bytes`. Without the cap one
executor that is slow to read (or that names a slow upstream) holds them all within its
rate. A call counts until gRPC ends it, its answer sent or the call cancelled.

A refusal is audited as `rate_limited` (reason: the class of call) through
`broker.service.denials`: in full up to a limit per principal and minute, then counted
and summarised, so a client looping over its limit cannot flood the audit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

import structlog

from broker import metrics, tokenbucket
from broker.errors import ResourceExhausted
from broker.service.context import Call
from broker.service.denials import DenialAudit
from broker.store import Coordination

log = structlog.get_logger("broker.ratelimit")


class RateLimiter:
    """`rate` tokens per second, up to `burst`, per key."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, updated)

    def take(self, key: str) -> float:
        """Take one token: 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        tokens, updated = self._buckets.get(key, (self._burst, now))
        tokens, wait = tokenbucket.take(tokens, updated, now, self._rate, self._burst)
        self._buckets[key] = (tokens, now)
        return wait


@dataclass(frozen=True)
class Limit:
    rate_per_second: float
    burst: int
    shared: bool = False  # one bucket in the store for every replica, not one per process
    in_flight: int = 0  # calls a principal may have under way at once in this process; 0: no cap


class RateLimits:
    """One limiter per class; over the limit is audited (bounded), counted and RESOURCE_EXHAUSTED."""

    def __init__(
        self,
        limits: Mapping[str, Limit],
        denials: DenialAudit,
        coordination: Coordination,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._shared = {name: limit for name, limit in limits.items() if limit.shared}
        self._local = {
            name: RateLimiter(limit.rate_per_second, limit.burst, monotonic)
            for name, limit in limits.items()
            if not limit.shared
        }
        self._caps = {name: limit.in_flight for name, limit in limits.items() if limit.in_flight}
        self._in_flight: dict[tuple[str, str], int] = {}  # (class, principal) -> calls under way
        self._denials = denials
        self._coordination = coordination

    async def enforce(self, call: Call, kind: str) -> Callable[[], None] | None:
        """Take a token of class `kind` for the caller, or raise RESOURCE_EXHAUSTED with a retry hint.

        For a class with an in-flight cap, also count the call as under way, or refuse it when the
        caller is at the cap; then the function that ends the count is returned, for the caller to
        call exactly once when the call has ended."""
        limiter = self._local.get(kind)
        if limiter is not None:
            wait = limiter.take(call.actor)
        elif (shared := self._shared.get(kind)) is not None:
            wait = await self._coordination.take_rate_token(
                kind, call.actor, shared.rate_per_second, shared.burst
            )
        else:
            return None
        if wait > 0:
            retry = max(0.001, wait)
            await self._refuse(
                call, kind, f"too many {kind.replace('_', ' ')} calls; retry in {retry:.3g} s", retry
            )
        cap = self._caps.get(kind)
        if cap is None:
            return None
        key = (kind, call.actor)
        under_way = self._in_flight.get(key, 0)
        if under_way >= cap:
            message = f"at most {cap} {kind} calls may be under way at once; retry when one has ended"
            await self._refuse(call, f"{kind}_in_flight", message, 1.0)
        self._in_flight[key] = under_way + 1
        return lambda: self._ended(key)

    def _ended(self, key: tuple[str, str]) -> None:
        left = self._in_flight[key] - 1
        if left:
            self._in_flight[key] = left
        else:
            del self._in_flight[key]

    async def _refuse(self, call: Call, reason: str, message: str, retry: float) -> NoReturn:
        metrics.RATE_LIMITED.labels(reason).inc()
        try:
            await self._denials.refused(call, "rate_limited", reason)
        except Exception as exc:  # the refusal stands whether or not it could be recorded
            log.warning("rate_limit_audit_failed", error_type=type(exc).__name__)
        raise ResourceExhausted(message, retry_after=retry)
