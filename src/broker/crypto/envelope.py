"""Envelope encryption: a fresh data key (DEK) per seal, wrapped by the active KEK.

    ciphertext  = v || AES-GCM(DEK, plaintext, aad=secret_aad(v, binding))
    wrapped_dek = v || AES-GCM(KEK, DEK,       aad=dek_aad(v, kek_id, binding))

`v` is the format version byte. Both associated data strings name it, the tenant,
connection id and secret version, so a ciphertext or wrapped key copied to another
row fails to open; the wrapped DEK is also bound to the id of the KEK that wrapped it.

Formats 2, 3 and 4 add the binding's `destination` (a digest of where the secret may be
sent) to the ciphertext's associated data, so a row re-pointed elsewhere without
re-sealing fails to open. Their layouts are the same; the version byte says which
digest the caller must name, which is the caller's business (for connections:
`broker.service.sealing.DIGEST_OF_FORMAT`): a digest that came to cover more
(format 3: also how the secret travels; format 4: also what is done with it there) is a new
format, so the reader knows which
digest to compute and a re-labelled blob fails like any other tampering. The wrapped
DEK's associated data does not carry the destination, so master-key rotation re-wraps
without reading any config.

`seal` writes format 4 (current). `open` opens the formats the caller accepts
(`formats`, by default the current one only): older ones to migrate old rows, any
for values that have no destination. The layouts are pinned by the JSON vectors in
tests/vectors/.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Container
from dataclasses import dataclass

from broker.crypto import aead
from broker.crypto.aead import DecryptionFailed, Random
from broker.crypto.keyring import KeyError_, Keyring

FORMAT_VERSION = 4
UNBOUND_FORMAT_VERSION = 1  # sealed before the destination was bound
FORMATS = (UNBOUND_FORMAT_VERSION, 2, 3, FORMAT_VERSION)  # every format `open` knows
_CURRENT = (FORMAT_VERSION,)
_PREFIX = {version: bytes([version]) for version in FORMATS}


@dataclass(frozen=True, slots=True)
class Binding:
    """Where a sealed secret belongs; bound into the associated data.

    `destination` is an opaque digest of where the secret may be sent (empty for
    values that are never sent anywhere); format 1 does not bind it. The format the
    blob was sealed in decides which digest it must be (see the module's docstring).
    """

    tenant: str
    connection_id: str
    secret_version: int
    destination: bytes = b""


@dataclass(frozen=True, slots=True)
class Sealed:
    """What the store keeps for a connection's secrets."""

    ciphertext: bytes
    wrapped_dek: bytes
    kek_id: str

    @property
    def format_version(self) -> int:
        """The format version byte the ciphertext starts with (0 when there is none)."""
        return self.ciphertext[0] if self.ciphertext else 0


def _field(value: str) -> bytes:
    return _bytes(value.encode("utf-8"))


def _bytes(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def _row(binding: Binding) -> bytes:
    return _field(binding.tenant) + _field(binding.connection_id) + struct.pack(">Q", binding.secret_version)


def secret_aad(binding: Binding, version: int = FORMAT_VERSION) -> bytes:
    """Associated data for the secret ciphertext."""
    if version == UNBOUND_FORMAT_VERSION:
        return b"broker.secret\x01" + _row(binding)
    return b"broker.secret" + _PREFIX[version] + _row(binding) + _bytes(binding.destination)


def dek_aad(kek_id: str, binding: Binding, version: int = FORMAT_VERSION) -> bytes:
    """Associated data for the wrapped data key."""
    return b"broker.dek" + _PREFIX[version] + _field(kek_id) + _row(binding)


def seal(keyring: Keyring, plaintext: bytes, binding: Binding, random: Random = os.urandom) -> Sealed:
    """Encrypt `plaintext` under a fresh DEK and wrap the DEK under the active KEK."""
    kek = keyring.active
    dek = random(aead.KEY_SIZE)
    prefix = _PREFIX[FORMAT_VERSION]
    ciphertext = prefix + aead.encrypt(dek, plaintext, secret_aad(binding), random)
    wrapped = prefix + aead.encrypt(kek._key, dek, dek_aad(kek.id, binding), random)
    keyring.count_wrap(kek.id)
    return Sealed(ciphertext=ciphertext, wrapped_dek=wrapped, kek_id=kek.id)


def _unwrap(keyring: Keyring, sealed: Sealed, binding: Binding) -> tuple[int, bytes]:
    """(format version, DEK)."""
    version = sealed.ciphertext[0] if sealed.ciphertext else 0
    if version not in _PREFIX or sealed.wrapped_dek[:1] != _PREFIX[version]:
        raise DecryptionFailed()
    try:
        kek = keyring.get(sealed.kek_id)
    except KeyError_:
        raise DecryptionFailed() from None
    return version, aead.decrypt(kek._key, sealed.wrapped_dek[1:], dek_aad(kek.id, binding, version))


def open(keyring: Keyring, sealed: Sealed, binding: Binding, *, formats: Container[int] = _CURRENT) -> bytes:
    """Unwrap the DEK and open the ciphertext; any mismatch raises `DecryptionFailed`.

    Only a blob of one of `formats` opens (by default the current format): an older
    one is opened only by a caller that asks for it, with the binding of that format.
    """
    version, dek = _unwrap(keyring, sealed, binding)
    if version not in formats:
        raise DecryptionFailed()
    return aead.decrypt(dek, sealed.ciphertext[1:], secret_aad(binding, version))


def rewrap(keyring: Keyring, sealed: Sealed, binding: Binding, random: Random = os.urandom) -> Sealed:
    """Wrap the same DEK under the active KEK: the ciphertext bytes are kept as they are.

    The data is never decrypted and the format version is kept. The DEK must unwrap
    under its recorded KEK with this binding (else `DecryptionFailed`); the new
    wrapped DEK carries the same binding.
    """
    version, dek = _unwrap(keyring, sealed, binding)
    kek = keyring.active
    wrapped = _PREFIX[version] + aead.encrypt(kek._key, dek, dek_aad(kek.id, binding, version), random)
    keyring.count_wrap(kek.id)
    return Sealed(ciphertext=sealed.ciphertext, wrapped_dek=wrapped, kek_id=kek.id)
