"""The token-bucket arithmetic, shared by the in-process limiter and the stores' shared buckets."""

from __future__ import annotations


def take(tokens: float, updated: float, now: float, rate: float, burst: float) -> tuple[float, float]:
    """Refill a bucket last left with `tokens` at `updated`, then take one token at `now`.

    Returns (tokens left, wait): wait is 0.0 when a token was taken, else the
    seconds until one will be there (nothing is taken then). A clock that went
    backwards refills nothing.
    """
    tokens = min(burst, tokens + max(0.0, now - updated) * rate)
    if tokens >= 1.0:
        return tokens - 1.0, 0.0
    return tokens, (1.0 - tokens) / rate
