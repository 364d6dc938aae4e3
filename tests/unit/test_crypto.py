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
from broker.catalog import destination_digest, destination_fields
from broker.crypto import Binding, DecryptionFailed, Kek, KeyError_, Keyring, Sealed

_VECTOR_DIR = Path(__file__).parent.parent / "vectors"
# Formats 1 (no destination bound), 2 (destination digest v1) and 3 (digest v2): still opened,
# for the migration, but never written.
V1_VECTORS = json.loads((_VECTOR_DIR / "envelope_v1.json").read_text())["cases"]
V2_VECTORS = json.loads((_VECTOR_DIR / "envelope_v2.json").read_text())["cases"]
V3_VECTORS = json.loads((_VECTOR_DIR / "envelope_v3.json").read_text())["cases"]
VECTORS = json.loads((_VECTOR_DIR / "envelope_v4.json").read_text())["cases"]
ALL_VECTORS = [*V1_VECTORS, *V2_VECTORS, *V3_VECTORS, *VECTORS]
# The destination digest version each format's vectors name.
DIGESTS = [
    *((1, case) for case in V2_VECTORS),
    *((2, case) for case in V3_VECTORS),
    *((3, case) for case in VECTORS),
]


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
    destination = bytes.fromhex(str(case.get("destination", "")))
    binding = Binding(
        str(case["tenant"]), str(case["connection_id"]), int(case["secret_version"]), destination
    )  # type: ignore[call-overload]
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
    assert sealed.format_version == crypto.FORMAT_VERSION == 4
    assert crypto.open(keyring, sealed, binding) == bytes.fromhex(str(case["plaintext"]))


@pytest.mark.parametrize("case", V1_VECTORS, ids=lambda c: c["description"])
def test_format_1_opens_only_when_unbound_is_accepted(case: dict[str, object]) -> None:
    keyring, binding, sealed = vector_parts(case)
    assert sealed.format_version == crypto.UNBOUND_FORMAT_VERSION == 1
    with pytest.raises(DecryptionFailed):
        crypto.open(keyring, sealed, binding)
    plaintext = bytes.fromhex(str(case["plaintext"]))
    assert crypto.open(keyring, sealed, binding, formats=(1,)) == plaintext
    # Format 1 binds no destination: whatever the caller names is not checked.
    elsewhere = dataclasses.replace(binding, destination=b"\xff" * 32)
    assert crypto.open(keyring, sealed, elsewhere, formats=(1,)) == plaintext
    # Rotation keeps the format: the re-wrapped key is still format 1 and opens the same way.
    rotated = Keyring(Kek(bytes(range(32))), older=[keyring.active])
    rewrapped = crypto.rewrap(rotated, sealed, binding)
    assert rewrapped.wrapped_dek[0] == rewrapped.format_version == 1
    assert crypto.open(rotated, rewrapped, binding, formats=(1,)) == plaintext


@pytest.mark.parametrize(
    "case", [*V2_VECTORS, *V3_VECTORS], ids=lambda c: f"v{c['ciphertext'][:2]} {c['description']}"
)
def test_formats_2_and_3_open_only_when_asked_for_and_still_bind_their_destination(
    case: dict[str, object],
) -> None:
    keyring, binding, sealed = vector_parts(case)
    version = sealed.format_version
    assert version in (2, 3)
    with pytest.raises(DecryptionFailed):
        crypto.open(keyring, sealed, binding)
    plaintext = bytes.fromhex(str(case["plaintext"]))
    assert crypto.open(keyring, sealed, binding, formats=(version,)) == plaintext
    assert crypto.open(keyring, sealed, binding, formats=crypto.FORMATS) == plaintext
    # Unlike format 1, the destination it was sealed with is checked.
    elsewhere = dataclasses.replace(binding, destination=b"\xff" * 32)
    with pytest.raises(DecryptionFailed):
        crypto.open(keyring, sealed, elsewhere, formats=(version,))
    rotated = Keyring(Kek(bytes(range(32))), older=[keyring.active])
    rewrapped = crypto.rewrap(rotated, sealed, binding)
    assert rewrapped.wrapped_dek[0] == rewrapped.format_version == version
    assert crypto.open(rotated, rewrapped, binding, formats=(version,)) == plaintext


@pytest.mark.parametrize(
    ("version", "case"), DIGESTS, ids=lambda c: c if isinstance(c, int) else c["description"]
)
def test_destination_digest_matches_vector(version: int, case: dict[str, object]) -> None:
    """The digests are pinned: a change to one would make every row sealed with it fail to open."""
    where = case["destination_of"]
    if where is None:
        assert case["destination"] == ""
        return
    assert isinstance(where, dict)
    digest = destination_digest(where["type"], where["provider"], where["config"], version)
    assert digest.hex() == case["destination"]
    # An independent computation of what broker/catalog/_destination.py documents.
    fields = destination_fields(where["type"])
    if version >= 2:
        fields += TRANSPORT_FIELDS.get(where["type"], ())
    if version >= 3:
        fields += USE_FIELDS.get(where["type"], ())
    chosen = where["config"] if where["type"] == "custom" else {f: where["config"].get(f) for f in fields}
    doc = {"config": chosen, "provider": where["provider"], "type": where["type"]}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    domain = f"broker.destination.v{version}\n".encode()
    assert hashlib.sha256(domain + canonical.encode()).hexdigest() == case["destination"]


# What decides how a secret travels to its destination, per type (digest version 2 binds them too).
TRANSPORT_FIELDS = {"database": ("ssl", "ssl_ca", "options"), "smtp": ("encryption", "ssl_ca")}
# What decides what is done with it there (digest version 3 binds them too).
USE_FIELDS = {
    "database": (
        "dynamic",
        "default_ttl",
        "max_ttl",
        "username_prefix",
        "group_role",
        "creation_statements",
        "renewal_statements",
        "revocation_statements",
    )
}


@pytest.mark.parametrize("case", ALL_VECTORS, ids=lambda c: f"v{c['ciphertext'][:2]} {c['description']}")
def test_vector_opens_with_plain_aes_gcm(case: dict[str, object]) -> None:
    """The layout is what the docstring says: another implementation can open it."""
    kek = bytes.fromhex(str(case["kek"]))
    wrapped = bytes.fromhex(str(case["wrapped_dek"]))
    ciphertext = bytes.fromhex(str(case["ciphertext"]))
    assert wrapped[0] == ciphertext[0] in (1, 2, 3, 4)
    dek = AESGCM(kek).decrypt(wrapped[1:13], wrapped[13:], bytes.fromhex(str(case["dek_aad"])))
    plain = AESGCM(dek).decrypt(ciphertext[1:13], ciphertext[13:], bytes.fromhex(str(case["secret_aad"])))
    assert plain == bytes.fromhex(str(case["plaintext"]))


@pytest.fixture
def keyring() -> Keyring:
    return Keyring(Kek(bytes(range(32))))


BINDING = Binding("default", "conn_a", 1, hashlib.sha256(b"where").digest())


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
        Binding("default", "conn_a", 1, hashlib.sha256(b"elsewhere").digest()),
    ],
    ids=["tenant", "connection", "secret_version", "destination"],
)
def test_bound_to_its_row(keyring: Keyring, other: Binding) -> None:
    sealed = crypto.seal(keyring, b"secret", BINDING)
    with pytest.raises(DecryptionFailed):
        crypto.open(keyring, sealed, other)


@pytest.mark.parametrize("older", [1, 2, 3])
def test_relabelling_as_an_older_format_does_not_drop_what_it_binds(keyring: Keyring, older: int) -> None:
    """A downgrade: both version bytes set to an older format's must not open, even when that
    format is accepted (formats 2 and 3 have the same layout: only the version byte differs)."""
    sealed = crypto.seal(keyring, b"secret", BINDING)
    prefix = bytes([older])
    relabelled = Sealed(prefix + sealed.ciphertext[1:], prefix + sealed.wrapped_dek[1:], sealed.kek_id)
    with pytest.raises(DecryptionFailed):
        crypto.open(keyring, relabelled, BINDING, formats=crypto.FORMATS)


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
