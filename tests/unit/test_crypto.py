"""Envelope format: pinned by vectors; every tampering fails to open, opaquely."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import broker.crypto as crypto
from broker.crypto import Binding, DecryptionFailed, Kek, KeyError_, Keyring, Sealed

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "envelope_v1.json").read_text())["cases"]


def det_random(seed: bytes) -> Callable[[int], bytes]:
    counter = 0

    def take(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            out += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
            counter += 1
        return out[:n]

    return take


def vector_parts(case: dict[str, object]) -> tuple[Keyring, Binding, Sealed]:
    keyring = Keyring(Kek(bytes.fromhex(str(case["kek"]))))
    binding = Binding(str(case["tenant"]), str(case["connection_id"]), int(case["secret_version"]))  # type: ignore[call-overload]
    sealed = Sealed(
        bytes.fromhex(str(case["ciphertext"])), bytes.fromhex(str(case["wrapped_dek"])), str(case["kek_id"])
    )
    return keyring, binding, sealed


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: c["description"])
def test_seal_reproduces_vector(case: dict[str, object]) -> None:
    keyring, binding, expected = vector_parts(case)
    assert keyring.active.id == case["kek_id"]
    sealed = crypto.seal(
        keyring, bytes.fromhex(str(case["plaintext"])), binding, det_random(str(case["random_seed"]).encode())
    )
    assert sealed == expected


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: c["description"])
def test_open_vector(case: dict[str, object]) -> None:
    keyring, binding, sealed = vector_parts(case)
    assert crypto.open(keyring, sealed, binding) == bytes.fromhex(str(case["plaintext"]))


@pytest.mark.parametrize("case", VECTORS, ids=lambda c: c["description"])
def test_vector_opens_with_plain_aes_gcm(case: dict[str, object]) -> None:
    """The layout is what the docstring says: another implementation can open it."""
    kek = bytes.fromhex(str(case["kek"]))
    wrapped = bytes.fromhex(str(case["wrapped_dek"]))
    ciphertext = bytes.fromhex(str(case["ciphertext"]))
    assert wrapped[0] == ciphertext[0] == 1
    dek = AESGCM(kek).decrypt(wrapped[1:13], wrapped[13:], bytes.fromhex(str(case["dek_aad"])))
    plain = AESGCM(dek).decrypt(ciphertext[1:13], ciphertext[13:], bytes.fromhex(str(case["secret_aad"])))
    assert plain == bytes.fromhex(str(case["plaintext"]))


@pytest.fixture
def keyring() -> Keyring:
    return Keyring(Kek(bytes(range(32))))


BINDING = Binding("default", "conn_a", 1)


def test_round_trip_uses_fresh_data_key_each_time(keyring: Keyring) -> None:
    a = crypto.seal(keyring, b"secret", BINDING)
    b = crypto.seal(keyring, b"secret", BINDING)
    assert a.ciphertext != b.ciphertext and a.wrapped_dek != b.wrapped_dek
    assert a.kek_id == keyring.active.id
    assert crypto.open(keyring, a, BINDING) == crypto.open(keyring, b, BINDING) == b"secret"


@pytest.mark.parametrize("part", ["ciphertext", "wrapped_dek"])
def test_every_flipped_byte_fails(keyring: Keyring, part: str) -> None:
    sealed = crypto.seal(keyring, b"secret value", BINDING)
    blob = getattr(sealed, part)
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        bad = dataclasses.replace(sealed, **{part: bytes(tampered)})
        with pytest.raises(DecryptionFailed):
            crypto.open(keyring, bad, BINDING)


def test_truncated_blobs_fail(keyring: Keyring) -> None:
    sealed = crypto.seal(keyring, b"x", BINDING)
    for cut in (0, 1, 12, 20):
        with pytest.raises(DecryptionFailed):
            crypto.open(keyring, Sealed(sealed.ciphertext[:cut], sealed.wrapped_dek, sealed.kek_id), BINDING)
        with pytest.raises(DecryptionFailed):
            crypto.open(keyring, Sealed(sealed.ciphertext, sealed.wrapped_dek[:cut], sealed.kek_id), BINDING)


@pytest.mark.parametrize(
    "other",
    [
        Binding("other-tenant", "conn_a", 1),
        Binding("default", "conn_b", 1),
        Binding("default", "conn_a", 2),
    ],
    ids=["tenant", "connection", "secret_version"],
)
def test_bound_to_its_row(keyring: Keyring, other: Binding) -> None:
    sealed = crypto.seal(keyring, b"secret", BINDING)
    with pytest.raises(DecryptionFailed):
        crypto.open(keyring, sealed, other)


def test_swapped_ciphertexts_between_rows_fail(keyring: Keyring) -> None:
    a_binding, b_binding = Binding("t", "conn_a", 1), Binding("t", "conn_b", 1)
    a = crypto.seal(keyring, b"secret a", a_binding)
    b = crypto.seal(keyring, b"secret b", b_binding)
    for sealed in (
        Sealed(b.ciphertext, a.wrapped_dek, a.kek_id),
        Sealed(a.ciphertext, b.wrapped_dek, b.kek_id),
        b,
    ):
        with pytest.raises(DecryptionFailed):
            crypto.open(keyring, sealed, a_binding)


def test_wrong_kek_fails(keyring: Keyring) -> None:
    sealed = crypto.seal(keyring, b"secret", BINDING)
    other = Keyring(Kek(bytes(32)))
    with pytest.raises(DecryptionFailed):
        crypto.open(other, sealed, BINDING)
    # Even when the wrong key claims the right id, the DEK's binding to the KEK fails the open.
    with pytest.raises(DecryptionFailed):
        crypto.open(other, Sealed(sealed.ciphertext, sealed.wrapped_dek, other.active.id), BINDING)


def test_old_keys_unwrap_and_active_key_wraps(keyring: Keyring) -> None:
    old_sealed = crypto.seal(keyring, b"secret", BINDING)
    rotated = Keyring(Kek(bytes(range(1, 33))), older=[keyring.active])
    assert crypto.open(rotated, old_sealed, BINDING) == b"secret"
    assert crypto.seal(rotated, b"secret", BINDING).kek_id == rotated.active.id
    assert rotated.ids == {keyring.active.id, rotated.active.id}


@pytest.mark.parametrize("text", ["", "not base64!", "AAAA", "A" * 100])
def test_malformed_master_keys_are_refused(text: str) -> None:
    with pytest.raises(KeyError_):
        Kek.from_base64(text)


def test_wrong_types_are_refused() -> None:
    with pytest.raises(KeyError_):
        Kek("x" * 32)  # type: ignore[arg-type]
    with pytest.raises(KeyError_):
        Kek(b"short")


def test_key_material_does_not_leak_through_repr_or_pickle(keyring: Keyring) -> None:
    raw = bytes(range(32))
    assert raw.hex() not in repr(keyring.active) and str(raw) not in repr(keyring)
    for obj in (keyring, keyring.active):
        with pytest.raises(TypeError):
            pickle.dumps(obj)


def test_public_names_are_complete() -> None:
    exported = {
        n for n, v in vars(crypto).items() if not n.startswith("_") and not isinstance(v, type(crypto))
    }
    assert set(crypto.__all__) == exported - {"annotations"}
