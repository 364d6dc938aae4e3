"""Envelope encryption: a fresh data key (DEK) per seal, wrapped by the active KEK.

    ciphertext  = 0x01 || AES-GCM(DEK, plaintext, aad=secret_aad(binding))
    wrapped_dek = 0x01 || AES-GCM(KEK, DEK,       aad=dek_aad(kek_id, binding))

Both associated data strings name the format version, tenant, connection id and
secret version, so a ciphertext or wrapped key copied to another row fails to
open; the wrapped DEK is also bound to the id of the KEK that wrapped it. The
layout is pinned by the JSON vectors in tests/vectors/.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from broker.crypto import aead
from broker.crypto.aead import DecryptionFailed, Random
from broker.crypto.keyring import KeyError_, Keyring

FORMAT_VERSION = 1
_VERSION_BYTE = bytes([FORMAT_VERSION])


@dataclass(frozen=True, slots=True)
class Binding:
    """Where a sealed secret belongs; bound into the associated data."""

    tenant: str
    connection_id: str
    secret_version: int


@dataclass(frozen=True, slots=True)
class Sealed:
    """What the store keeps for a connection's secrets."""

    ciphertext: bytes
    wrapped_dek: bytes
    kek_id: str


def _field(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


def secret_aad(binding: Binding) -> bytes:
    """Associated data for the secret ciphertext."""
    return (
        b"broker.secret"
        + _VERSION_BYTE
        + _field(binding.tenant)
        + _field(binding.connection_id)
        + struct.pack(">Q", binding.secret_version)
    )


def dek_aad(kek_id: str, binding: Binding) -> bytes:
    """Associated data for the wrapped data key."""
    return (
        b"broker.dek"
        + _VERSION_BYTE
        + _field(kek_id)
        + _field(binding.tenant)
        + _field(binding.connection_id)
        + struct.pack(">Q", binding.secret_version)
    )


def seal(keyring: Keyring, plaintext: bytes, binding: Binding, random: Random = os.urandom) -> Sealed:
    """Encrypt `plaintext` under a fresh DEK and wrap the DEK under the active KEK."""
    kek = keyring.active
    dek = random(aead.KEY_SIZE)
    ciphertext = _VERSION_BYTE + aead.encrypt(dek, plaintext, secret_aad(binding), random)
    wrapped = _VERSION_BYTE + aead.encrypt(kek._key, dek, dek_aad(kek.id, binding), random)
    keyring.count_wrap(kek.id)
    return Sealed(ciphertext=ciphertext, wrapped_dek=wrapped, kek_id=kek.id)


def _unwrap(keyring: Keyring, sealed: Sealed, binding: Binding) -> bytes:
    try:
        kek = keyring.get(sealed.kek_id)
    except KeyError_:
        raise DecryptionFailed() from None
    if sealed.wrapped_dek[:1] != _VERSION_BYTE or sealed.ciphertext[:1] != _VERSION_BYTE:
        raise DecryptionFailed()
    return aead.decrypt(kek._key, sealed.wrapped_dek[1:], dek_aad(kek.id, binding))


def open(keyring: Keyring, sealed: Sealed, binding: Binding) -> bytes:
    """Unwrap the DEK and open the ciphertext; any mismatch raises `DecryptionFailed`."""
    dek = _unwrap(keyring, sealed, binding)
    return aead.decrypt(dek, sealed.ciphertext[1:], secret_aad(binding))


def rewrap(keyring: Keyring, sealed: Sealed, binding: Binding, random: Random = os.urandom) -> Sealed:
    """Wrap the same DEK under the active KEK: the ciphertext bytes are kept as they are.

    The data is never decrypted. The DEK must unwrap under its recorded KEK with this
    binding (else `DecryptionFailed`); the new wrapped DEK carries the same binding.
    """
    dek = _unwrap(keyring, sealed, binding)
    kek = keyring.active
    wrapped = _VERSION_BYTE + aead.encrypt(kek._key, dek, dek_aad(kek.id, binding), random)
    keyring.count_wrap(kek.id)
    return Sealed(ciphertext=sealed.ciphertext, wrapped_dek=wrapped, kek_id=kek.id)
