"""When an access token expires, even when the provider does not say: never leave it unknown."""

from __future__ import annotations

import base64
import binascii
import json
import math
from datetime import datetime, timedelta

from broker.oauth._types import ExpirySource

# Longer lifetimes are believed only up to this: refreshing a long-lived token early is harmless,
# and it keeps a nonsense value from pushing the expiry beyond what datetime can hold.
MAX_LIFETIME = timedelta(days=365)


def infer_expiry(
    access_token: str, expires_in: object, now: datetime, default_lifetime: timedelta
) -> tuple[datetime, ExpirySource]:
    """The expiry of a new access token and where it came from.

    `expires_in` (seconds; an integer or a numeric string) when present and positive;
    else the JWT `exp` claim when the token is a JWT expiring in the future; else
    `now + default_lifetime`. `now` must be timezone-aware.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    seconds = _seconds(expires_in)
    if seconds is not None:
        return now + min(timedelta(seconds=seconds), MAX_LIFETIME), "expires_in"
    exp = _jwt_exp(access_token)
    # Compared as numbers first: a huge `exp` must not reach fromtimestamp (OverflowError).
    if exp is not None and now.timestamp() < exp <= (now + MAX_LIFETIME).timestamp():
        return datetime.fromtimestamp(exp, tz=now.tzinfo), "jwt"
    return now + default_lifetime, "default"


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value) and value > 0:
        return float(min(value, MAX_LIFETIME.total_seconds()))
    return None


def _jwt_exp(token: str) -> float | None:
    # The signature is NOT verified, on purpose: we are the client, not the audience, and
    # hold no key to check it with. `exp` is only a hint for when to refresh; a forged one
    # costs at most an early or a late refresh, never trust.
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 16_384:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = payload.get("exp") if isinstance(payload, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return float(exp)
