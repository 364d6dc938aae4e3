"""AES-256-GCM with a random 96-bit nonce: `nonce || ciphertext || tag`.

Every failure to open is the one opaque `DecryptionFailed`, so a caller cannot
learn which check failed (wrong key, flipped byte, wrong associated data).
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

Random = Callable[[int], bytes]


class DecryptionFailed(Exception):
    """The ciphertext could not be opened with this key and associated data."""

    def __init__(self) -> None:
        super().__init__("decryption failed")


def encrypt(key: bytes, plaintext: bytes, aad: bytes, random: Random) -> bytes:
    """Encrypt under a fresh nonce drawn from `random`."""
    nonce = random(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Open a blob made by `encrypt`; raise `DecryptionFailed` on any mismatch."""
    if len(key) != KEY_SIZE or len(blob) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionFailed()
    try:
        return AESGCM(key).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecryptionFailed() from None
