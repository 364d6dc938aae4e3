"""The destination digest: which fields it covers, that records carry it, and how sealed rows read back."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker import crypto
from broker.catalog import destination_digest, destination_fields, fields_needing_secrets, list_types
from broker.catalog._destination import bound_fields
from broker.crypto import DecryptionFailed, Kek, Keyring
from broker.errors import SecretUnavailable
from broker.model import ConnectionRecord, ConnectionStatus
from broker.sensitive import SecretFields
from broker.service import sealing
from broker.store._codec import sealed_from_row
from tests.unit.test_crypto import USE_FIELDS

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


DYNAMIC = USE_FIELDS["database"]  # listed once, by hand, beside the digest vectors


def test_the_catalog_marks_how_secrets_travel_and_what_is_done_with_them() -> None:
    """Digest version 2 also covers what decides whether the wire is encrypted and whom the broker
    trusts at the far end; version 3 also what a dynamic connection does with the administrator's
    credentials. Every other type has no such field."""
    assert bound_fields("database", 2) == ("driver", "host", "port", "ssl", "ssl_ca", "options")
    assert bound_fields("database") == ("driver", "host", "port", "ssl", "ssl_ca", "options", *DYNAMIC)
    assert bound_fields("smtp") == bound_fields("smtp", 2) == ("host", "port", "encryption", "ssl_ca")
    for ctype in list_types():
        if ctype.name not in ("database", "smtp"):
            assert bound_fields(ctype.name) == destination_fields(ctype.name), ctype.name
        assert bound_fields(ctype.name, 1) == destination_fields(ctype.name)
    # What an edit without the secrets may not change: where they go and what is done with them.
    assert fields_needing_secrets("database") == ("driver", "host", "port", *DYNAMIC)
    assert fields_needing_secrets("smtp") == ("host", "port")


PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("changed", "moves"),
    [
        ({"host": "evil.example"}, True),
        ({"port": 6432}, True),
        ({"driver": "mysql"}, True),
        ({"ssl": False}, True),
        ({"ssl_ca": PEM}, True),
        ({"options": {"sslmode": "disable"}}, True),
        ({"dynamic": False}, True),
        ({"creation_statements": ["ALTER ROLE \"admin\" PASSWORD 'x'"]}, True),
        ({"revocation_statements": ["SELECT 1"]}, True),
        ({"group_role": "pg_write_all_data"}, True),
        ({"username_prefix": "app"}, True),
        ({"max_ttl": 31_536_000}, True),
        ({"username": "other"}, False),
        ({"database": "other"}, False),
    ],
)
def test_the_digest_covers_destination_transport_and_use_fields_only(
    changed: dict[str, Any], moves: bool
) -> None:
    base = {"driver": "postgresql", "host": "db.internal", "port": 5432, "username": "app", "ssl": True}
    base |= {"dynamic": True, "group_role": "app_readers", "creation_statements": []}
    before = destination_digest("database", "", base)
    assert (destination_digest("database", "", {**base, **changed}) != before) is moves
    # Digest version 1 (envelope format 2) covered where only: a change of how stays unseen there.
    where_moved = any(name in changed for name in ("host", "port", "driver"))
    assert (
        destination_digest("database", "", {**base, **changed}, 1)
        != destination_digest("database", "", base, 1)
    ) is where_moved


@pytest.mark.parametrize(
    "changed", [{"encryption": "none"}, {"encryption": "ssl"}, {"ssl_ca": PEM}, {"ssl_ca": "/etc/evil.pem"}]
)
def test_smtp_encryption_and_ca_move_the_digest(changed: dict[str, Any]) -> None:
    base = {"host": "mail.example", "port": 587, "encryption": "tls", "username": "u"}
    assert destination_digest("smtp", "", {**base, **changed}) != destination_digest("smtp", "", base)
    assert destination_digest("smtp", "", {**base, "username": "v"}) == destination_digest("smtp", "", base)


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


@pytest.mark.parametrize(
    "changed",
    [{"host": "evil.example"}, {"ssl": False}, {"ssl_ca": PEM}, {"options": {"sslmode": "disable"}}],
    ids=["host", "ssl", "ssl_ca", "options"],
)
def test_only_the_bound_destination_opens(changed: dict[str, Any]) -> None:
    r = record()
    assert sealing.open_secrets(KEYRING, r).reveal() == {"password": "pw"}
    moved = dataclasses.replace(r, config={**r.config, **changed})
    with pytest.raises(SecretUnavailable):
        sealing.open_secrets(KEYRING, moved)


def test_each_format_binds_the_digest_it_says_and_the_current_one_is_the_records() -> None:
    assert sealing.DIGEST_OF_FORMAT[crypto.FORMAT_VERSION] == 3  # catalog's current digest version
    assert set(sealing.DIGEST_OF_FORMAT) == set(crypto.FORMATS)
    assert sealing.LEGACY_FORMATS == (1, 2, 3)
    r = record(ssl=True, ssl_ca=PEM, driver="postgresql", host="db.internal", port=5432, dynamic=True)
    assert r.destination == destination_digest(r.type, r.provider, r.config, 3)


def sealed_as(version: int, r: ConnectionRecord, destination: bytes = b"") -> ConnectionRecord:
    """`r` with its secrets sealed the way an older broker did, in format `version`."""
    old = crypto.envelope
    binding = dataclasses.replace(r.binding, destination=destination)
    dek = bytes(32)
    nonce = bytes(12)
    prefix = bytes([version])
    aad = old.secret_aad(binding, version)
    ciphertext = prefix + nonce + AESGCM(dek).encrypt(nonce, b'{"password":"pw"}', aad)
    wrapped = (
        prefix
        + nonce
        + AESGCM(bytes(range(32))).encrypt(nonce, dek, old.dek_aad(KEYRING.active.id, binding, version))
    )
    return dataclasses.replace(r, sealed=crypto.Sealed(ciphertext, wrapped, KEYRING.active.id))


def test_format_1_rows_open_only_for_the_migration() -> None:
    v1 = sealed_as(1, record())
    with pytest.raises(SecretUnavailable):
        sealing.open_secrets(KEYRING, v1)
    assert sealing.open_legacy_secrets(KEYRING, v1).reveal() == {"password": "pw"}


@pytest.mark.parametrize("version", [2, 3])
def test_format_2_and_3_rows_open_only_for_the_migration_with_the_digest_they_were_sealed_with(
    version: int,
) -> None:
    r = record(driver="postgresql", host="db.internal", port=5432, ssl=True)
    v2 = sealed_as(version, r, destination_digest(r.type, r.provider, r.config, version - 1))
    with pytest.raises(SecretUnavailable):
        sealing.open_secrets(KEYRING, v2)
    assert sealing.open_legacy_secrets(KEYRING, v2).reveal() == {"password": "pw"}
    # Formats 2 and 3 bound where the secret goes: a host changed before the upgrade does not open ...
    moved = dataclasses.replace(v2, config={**r.config, "host": "evil.example"})
    with pytest.raises(SecretUnavailable):
        sealing.open_legacy_secrets(KEYRING, moved)
    # ... and a row of the current format is never opened as a legacy one.
    with pytest.raises(SecretUnavailable):
        sealing.open_legacy_secrets(KEYRING, r)


@pytest.mark.parametrize("value", ["text", 12345, 1 << 40, None, b""])
def test_sealed_columns_of_the_wrong_sql_type_read_as_nothing_that_opens(value: object) -> None:
    """What a store reads from a column of the wrong SQL type reaches `open` as no bytes."""
    sealed = crypto.seal(KEYRING, b"secret", record().binding)
    for column in ("ciphertext", "wrapped_dek", "kek_id"):
        row = {"ciphertext": sealed.ciphertext, "wrapped_dek": sealed.wrapped_dek, "kek_id": sealed.kek_id}
        row[column] = value
        with pytest.raises(DecryptionFailed):
            crypto.open(KEYRING, sealed_from_row(row), record().binding)
