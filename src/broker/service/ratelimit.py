"""Rate limits: a token bucket per principal and class of call.

Classes: `resolve`, `admin_write` (every admin call that changes something),
`test` (connection tests and MCP discovery). Reads are not limited. Buckets
live in this process: with several replicas each enforces its own (issue 8).
Taking a token has no await in it, so concurrent calls on the event loop can
never overshoot a bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

import structlog

from broker import metrics
from broker.errors import ResourceExhausted
from broker.model import Outcome
from broker.service.audit import AuditLog
from broker.service.context import Call

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
        tokens = min(self._burst, tokens + (now - updated) * self._rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self._rate


@dataclass(frozen=True)
class Limit:
    rate_per_second: float
    burst: int


class RateLimits:
    """One limiter per class; over the limit is audited, counted and RESOURCE_EXHAUSTED."""

    def __init__(
        self,
        limits: Mapping[str, Limit],
        audit: AuditLog,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limiters = {
            name: RateLimiter(limit.rate_per_second, limit.burst, monotonic) for name, limit in limits.items()
        }
        self._audit = audit
        self._clock = clock

    async def enforce(self, call: Call, kind: str) -> None:
        """Take a token of class `kind` for the caller, or raise RESOURCE_EXHAUSTED with a retry hint."""
        limiter = self._limiters.get(kind)
        if limiter is None:
            return
        wait = limiter.take(call.actor)
        if wait <= 0:
            return
        metrics.RATE_LIMITED.labels(kind).inc()
        event = call.audit_event(self._clock(), "rate_limited", "", Outcome.DENIED, kind)
        try:
            await self._audit.append(event)
        except Exception as exc:  # the refusal stands whether or not it could be recorded
            log.warning("rate_limit_audit_failed", error_type=type(exc).__name__)
        retry = max(0.001, wait)
        raise ResourceExhausted(
            f"too many {kind.replace('_', ' ')} calls; retry in {retry:.3g} s", retry_after=retry
        )
