"""Keyed fingerprints of secret values, for audit records that must say *which* value was used.

An audit event never holds a secret. Where it needs to identify one (the refresh
token an OAuth refresh used, each secret field a Resolve released), it holds
`fp1:<kek id>:<hex>`: HMAC-SHA256 of the value's UTF-8 bytes under a key derived
(HKDF-SHA256, info `FINGERPRINT_INFO`) from the master key named by the id.
Without the master key the fingerprint reveals nothing, not even whether two
tenants share a value; with it, an operator checks a candidate value with
`broker audit fingerprint --check FINGERPRINT` (value on stdin), or finds every
event of an export that names it with `--search FILE`.
"""

from __future__ import annotations

import hashlib
import hmac

from broker.crypto import Kek, KeyError_, Keyring
from broker.sensitive import SecretFields

FINGERPRINT_INFO = b"broker audit fingerprint v1"
_PREFIX = "fp1"


# Detail key of a released secret field's fingerprint in a Resolve audit event: `fp.<field>`.
RELEASED_PREFIX = "fp."


def fingerprint(kek: Kek, value: str) -> str:
    """The fingerprint of `value` under `kek` (normally the keyring's active key)."""
    key = kek.derive(FINGERPRINT_INFO)
    digest = hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{_PREFIX}:{kek.id}:{digest}"


def all_fingerprints(keyring: Keyring, value: str) -> set[str]:
    """`value`'s fingerprint under every key in the ring: events made before a rotation match too."""
    return {fingerprint(keyring.get(kek_id), value) for kek_id in keyring.ids}


class Fingerprinter:
    """Fingerprints under the keyring's active key, for the hot path: HKDF runs once per key,
    not once per value (the keyring's active key can change at rotation, so it is read each time)."""

    __slots__ = ("_base", "_kek_id", "_keyring")

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring
        self._kek_id = ""
        self._base = hmac.new(b"", digestmod=hashlib.sha256)

    def released(self, secrets: SecretFields) -> dict[str, str]:
        """`{"fp.<field>": fingerprint}` for each secret field, as a Resolve audit event records them."""
        kek = self._keyring.active
        if kek.id != self._kek_id:
            self._base = hmac.new(kek.derive(FINGERPRINT_INFO), digestmod=hashlib.sha256)
            self._kek_id = kek.id
        prefix = f"{_PREFIX}:{kek.id}:"
        fingerprints = {}
        for name, value in secrets.reveal().items():
            mac = self._base.copy()
            mac.update(value.encode("utf-8"))
            fingerprints[RELEASED_PREFIX + name] = prefix + mac.hexdigest()
        return fingerprints


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
