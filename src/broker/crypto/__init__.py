"""Envelope encryption, no I/O: `seal` and `open` over AES-256-GCM with a keyring of KEKs.

This package imports nothing from the rest of `broker`.
"""

from broker.crypto.aead import DecryptionFailed
from broker.crypto.envelope import (
    FORMAT_VERSION,
    FORMATS,
    UNBOUND_FORMAT_VERSION,
    Binding,
    Sealed,
    open,
    rewrap,
    seal,
)
from broker.crypto.keyring import Kek, KeyError_, Keyring

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "UNBOUND_FORMAT_VERSION",
    "Binding",
    "DecryptionFailed",
    "Kek",
    "KeyError_",
    "Keyring",
    "Sealed",
    "open",
    "rewrap",
    "seal",
]
