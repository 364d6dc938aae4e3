"""The destination digest: which fields it covers, that records carry it, and how sealed rows read back."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker import crypto
from broker.catalog import destination_digest, destination_fields
from broker.crypto import DecryptionFailed, Kek, Keyring
from broker.errors import SecretUnavailable
from broker.model import ConnectionRecord, ConnectionStatus
from broker.sensitive import SecretFields
from broker.service import sealing
from broker.store._codec import sealed_from_row

KEYRING = Keyring(Kek(bytes(range(32))))
NOW = datetime(2026, 12, 6, tzinfo=UTC)


def record(type_name: str = "database", provider: str = "", **config: Any) -> ConnectionRecord:
    config = config or {"driver": "postgresql", "host": "db.internal", "port": 5432, "username": "app"}
    unsealed = ConnectionRecord(
        id="conn_a", tenant="default", name="db", type=type_name, provider=provider, config=config,
        secret_fields=("password",), labels={}, status=ConnectionStatus.ACTIVE, version=1,
        secret_version=1, sealed=None, created_at=NOW, updated_at=NOW, created_by="admin",
    )  # fmt: skip
    return dataclasses.replace(
        unsealed, sealed=sealing.seal(KEYRING, SecretFields({"password": "pw"}), unsealed)
    )


def test_the_catalog_marks_where_secrets_are_sent() -> None:
    assert destination_fields("database") == ("driver", "host", "port")
    assert destination_fields("http") == ("base_url",)
    assert destination_fields("webhook") == ("url",)
    assert destination_fields("mcp") == ("server_url",)
    assert destination_fields("smtp") == destination_fields("ssh") == ("host", "port")
    assert destination_fields("oauth2") == ("authorize_url", "token_url", "revocation_url", "verify_url")
    assert destination_fields("api_key") == ("base_url",)
    assert destination_fields("custom") == destination_fields("aws") == ()


@pytest.mark.parametrize(
    ("changed", "moves"),
    [
        ({"host": "evil.example"}, True),
        ({"port": 6432}, True),
        ({"driver": "mysql"}, True),
        ({"username": "other"}, False),
        ({"ssl": False}, False),
    ],
)
def test_the_digest_covers_destination_fields_only(changed: dict[str, Any], moves: bool) -> None:
    base = {"driver": "postgresql", "host": "db.internal", "port": 5432, "username": "app"}
    before = destination_digest("database", "", base)
    assert (destination_digest("database", "", {**base, **changed}) != before) is moves


def test_the_digest_names_type_and_provider_and_missing_fields() -> None:
    config = {"api_key_header": "X"}
    assert destination_digest("api_key", "openai", config) != destination_digest("api_key", "custom", config)
    assert destination_digest("http", "", {"base_url": "https://a"}) != destination_digest(
        "webhook", "", {"url": "https://a"}
    )
    # Removing a defaulted destination field moves the destination too.
    assert destination_digest("smtp", "", {"host": "m", "port": 587}) != destination_digest(
        "smtp", "", {"host": "m"}
    )
    # Free config: every key is a destination.
    assert destination_digest("custom", "", {"a": 1}) != destination_digest("custom", "", {"a": 2})
    # A config that is not even an object (a tampered row) still has a digest, not an error.
    assert len(destination_digest("database", "", ["not", "an", "object"])) == 32


def test_a_record_carries_its_digest_and_recomputes_it_on_change() -> None:
    r = record()
    assert r.destination == destination_digest(r.type, r.provider, r.config)
    moved = dataclasses.replace(r, config={**r.config, "host": "evil.example"})
    assert moved.destination != r.destination
    assert dataclasses.replace(r, labels={"a": "b"}).destination == r.destination
    assert "destination" not in repr(r)


def test_only_the_bound_destination_opens() -> None:
    r = record()
    assert sealing.open_secrets(KEYRING, r).reveal() == {"password": "pw"}
    moved = dataclasses.replace(r, config={**r.config, "host": "evil.example"})
    with pytest.raises(SecretUnavailable):
        sealing.open_secrets(KEYRING, moved)


def test_format_1_rows_open_only_for_the_migration() -> None:
    r = record()
    old = crypto.envelope
    binding = r.binding
    dek = bytes(32)
    nonce = bytes(12)
    ciphertext = (
        b"\x01" + nonce + AESGCM(dek).encrypt(nonce, b'{"password":"pw"}', old.secret_aad(binding, 1))
    )
    wrapped = (
        b"\x01"
        + nonce
        + AESGCM(bytes(range(32))).encrypt(nonce, dek, old.dek_aad(KEYRING.active.id, binding, 1))
    )
    v1 = dataclasses.replace(r, sealed=crypto.Sealed(ciphertext, wrapped, KEYRING.active.id))
    with pytest.raises(SecretUnavailable):
        sealing.open_secrets(KEYRING, v1)
    assert sealing.open_secrets(KEYRING, v1, accept_unbound=True).reveal() == {"password": "pw"}


@pytest.mark.parametrize("value", ["text", 12345, 1 << 40, None, b""])
def test_sealed_columns_of_the_wrong_sql_type_read_as_nothing_that_opens(value: object) -> None:
    """What a store reads from a column of the wrong SQL type reaches `open` as no bytes."""
    sealed = crypto.seal(KEYRING, b"secret", record().binding)
    for column in ("ciphertext", "wrapped_dek", "kek_id"):
        row = {"ciphertext": sealed.ciphertext, "wrapped_dek": sealed.wrapped_dek, "kek_id": sealed.kek_id}
        row[column] = value
        with pytest.raises(DecryptionFailed):
            crypto.open(KEYRING, sealed_from_row(row), record().binding)
