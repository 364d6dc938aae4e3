"""Keyed fingerprints of secret values, for audit records that must say *which* value was used.

An audit event never holds a secret. Where it needs to identify one (the refresh
token an OAuth refresh used), it holds `fp1:<kek id>:<hex>`: HMAC-SHA256 of the
value's UTF-8 bytes under a key derived (HKDF-SHA256, info `FINGERPRINT_INFO`) from
the master key named by the id. Without the master key the fingerprint reveals
nothing, not even whether two tenants share a value; with it, an operator checks a
candidate value with `broker audit fingerprint --check FINGERPRINT` (value on stdin).
"""

from __future__ import annotations

import hashlib
import hmac

from broker.crypto import Kek, KeyError_, Keyring

FINGERPRINT_INFO = b"broker audit fingerprint v1"
_PREFIX = "fp1"


def fingerprint(kek: Kek, value: str) -> str:
    """The fingerprint of `value` under `kek` (normally the keyring's active key)."""
    key = kek.derive(FINGERPRINT_INFO)
    digest = hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{_PREFIX}:{kek.id}:{digest}"


def matches(keyring: Keyring, value: str, expected: str) -> bool:
    """Whether `value` has fingerprint `expected`, under the key it names; ValueError when malformed
    or when that key is not in the keyring."""
    prefix, _, rest = expected.strip().partition(":")
    kek_id, _, digest = rest.partition(":")
    if prefix != _PREFIX or not kek_id or len(digest) != 64:
        raise ValueError("not a fingerprint: expected fp1:<key id>:<64 hex digits>")
    try:
        kek = keyring.get(kek_id)
    except KeyError_:
        raise ValueError(
            f"the fingerprint was made with master key {kek_id}, which is not configured"
        ) from None
    return hmac.compare_digest(fingerprint(kek, value), expected.strip())
