"""Token buckets per key (principal and class of call). A later issue generalises this."""

from __future__ import annotations

import time
from collections.abc import Callable

from broker.errors import ResourceExhausted


class RateLimiter:
    """`rate` tokens per second, up to `burst`, per key. Not shared across processes."""

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

    def check(self, key: str, what: str) -> None:
        """Take a token or raise RESOURCE_EXHAUSTED saying when to retry."""
        wait = self.take(key)
        if wait > 0:
            raise ResourceExhausted(f"too many {what}; retry in {max(1, round(wait))} s")
