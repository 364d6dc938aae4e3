"""Key-encryption keys (KEKs): one active for wrapping, older ones kept for unwrapping.

Key material is hard to leak by accident: a `Kek` has a masked repr and refuses
to be pickled; the raw bytes are reachable only through the envelope module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from typing import NoReturn

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.crypto.aead import KEY_SIZE


class KeyError_(ValueError):
    """A master key is malformed or missing from the keyring."""


class Kek:
    """A 256-bit master key and its id (a short hash of the key, safe to store and log)."""

    __slots__ = ("_key", "id")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise KeyError_(f"a master key must be exactly {KEY_SIZE} bytes")
        self._key = key
        self.id = hashlib.sha256(b"broker kek id\x00" + key).hexdigest()[:16]

    @classmethod
    def from_base64(cls, text: str) -> Kek:
        """Parse a base64-encoded 32-byte key (the format of the key file and BROKER_MASTER_KEY)."""
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise KeyError_("a master key must be base64 text") from None
        if len(raw) != KEY_SIZE:
            raise KeyError_(f"a master key must decode to {KEY_SIZE} bytes, got {len(raw)}")
        return cls(raw)

    def derive(self, info: bytes) -> bytes:
        """A 32-byte subkey for one purpose named by `info` (HKDF-SHA256); the key itself stays here."""
        return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(self._key)

    def __repr__(self) -> str:
        return f"Kek(id={self.id!r}, key=<redacted>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("key material cannot be pickled")


class Keyring:
    """The active KEK wraps new data keys; every KEK in the ring can unwrap.

    Mutable on purpose: every service shares one ring, so `activate` (master-key
    rotation) switches all of them at once. It also counts, per KEK id, the wraps
    made since the last `take_wrap_counts`, for the persisted AES-GCM usage count.
    """

    __slots__ = ("_by_id", "_wraps", "active")

    def __init__(self, active: Kek, older: Iterable[Kek] = ()) -> None:
        self.active = active
        self._by_id = {k.id: k for k in (*older, active)}
        self._wraps: dict[str, int] = {}

    def add(self, kek: Kek) -> None:
        """Make `kek` available for unwrapping (it does not become active)."""
        self._by_id.setdefault(kek.id, kek)

    def activate(self, kek: Kek) -> None:
        """Wrap new data keys under `kek` from now on; the previous active key keeps unwrapping."""
        self.add(kek)
        self.active = self._by_id[kek.id]

    def count_wrap(self, kek_id: str, n: int = 1) -> None:
        """Record `n` AES-GCM encryptions under `kek_id` (the envelope module counts each wrap)."""
        self._wraps[kek_id] = self._wraps.get(kek_id, 0) + n

    def take_wrap_counts(self) -> dict[str, int]:
        """The wraps counted since the last call, per KEK id; the counters restart at zero."""
        counts, self._wraps = self._wraps, {}
        return counts

    def get(self, kek_id: str) -> Kek:
        try:
            return self._by_id[kek_id]
        except KeyError:
            raise KeyError_(f"master key {kek_id} is not in the keyring") from None

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(self._by_id)

    def __repr__(self) -> str:
        return f"Keyring(active={self.active.id!r}, ids={sorted(self._by_id)!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("key material cannot be pickled")
