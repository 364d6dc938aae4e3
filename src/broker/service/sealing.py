"""Sealing and opening a connection's secrets with the row's binding."""

from __future__ import annotations

from broker import crypto
from broker.crypto import Binding, DecryptionFailed, Keyring
from broker.errors import SecretUnavailable
from broker.model import ConnectionRecord
from broker.sensitive import SecretFields


def binding(tenant: str, connection_id: str, secret_version: int) -> Binding:
    return Binding(tenant=tenant, connection_id=connection_id, secret_version=secret_version)


def seal(
    keyring: Keyring, secrets: SecretFields, tenant: str, connection_id: str, version: int
) -> crypto.Sealed:
    """Seal under a fresh data key bound to this row and secret version."""
    return crypto.seal(keyring, secrets.to_bytes(), binding(tenant, connection_id, version))


def open_secrets(keyring: Keyring, record: ConnectionRecord) -> SecretFields:
    """Open the record's secrets; any failure is one opaque `SecretUnavailable`."""
    if record.sealed is None:
        raise SecretUnavailable("the connection's secret was purged")
    try:
        plaintext = crypto.open(
            keyring, record.sealed, binding(record.tenant, record.id, record.secret_version)
        )
        return SecretFields.from_bytes(plaintext)
    except (DecryptionFailed, ValueError):
        raise SecretUnavailable(
            f"the secret of connection {record.id} cannot be decrypted (tampered or wrong master key)"
        ) from None
