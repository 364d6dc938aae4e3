"""The token bucket's arithmetic, with a fake clock."""

from __future__ import annotations

import pytest

from broker.service.ratelimit import RateLimiter


def test_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)  # one token needs half a second at 2/s
    assert limiter.take("b") == 0.0  # keys are independent
    now[0] = 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    now[0] = 100.0
    assert [limiter.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # capped at the burst


def test_nonsense_limits_are_refused() -> None:
    for rate, burst in ((0, 1), (1, 0), (-1, 5)):
        with pytest.raises(ValueError):
            RateLimiter(rate=rate, burst=burst)
