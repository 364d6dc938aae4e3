"""Sealing and opening a connection's secrets with the row's binding.

The binding (`ConnectionRecord.binding`) names the tenant, connection id, secret
version and the record's destination digest, so secrets of a row whose
destination was changed in the database without re-sealing do not open. Rows
sealed before the destination was bound (format 1) are opened only by the
start-up migration (`service.rebind`), which re-seals them.

A stored data key is wrapped with its owner's binding without the destination: a
connection row's (`row_binding`) or a pending OAuth authorization's (`state_binding`);
`service.keys` re-wraps both.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from broker import crypto
from broker.crypto import Binding, DecryptionFailed, Keyring
from broker.errors import SecretUnavailable
from broker.model import AuditEvent, ConnectionRecord, Outcome
from broker.sensitive import SecretFields
from broker.service.audit import AuditLog

DECRYPT_FAILED = "decrypt_failed"


class SealedRow(Protocol):
    """What opening needs of a row: a `ConnectionRecord`, or the Resolve cache's compact entry."""

    @property
    def id(self) -> str: ...

    @property
    def sealed(self) -> crypto.Sealed | None: ...

    @property
    def binding(self) -> Binding: ...


def row_binding(tenant: str, connection_id: str, secret_version: int) -> Binding:
    """A connection row's binding without its destination: enough to (re-)wrap its data key."""
    return Binding(tenant, connection_id, secret_version)


def state_binding(tenant: str, state_hash: str) -> Binding:
    """A pending OAuth authorization's binding: its sealed verifier opens only for its tenant and state."""
    return Binding(tenant=tenant, connection_id="oauth-state:" + state_hash, secret_version=0)


def seal(keyring: Keyring, secrets: SecretFields, record: ConnectionRecord) -> crypto.Sealed:
    """Seal under a fresh data key bound to `record`: its row, secret version and destination."""
    return crypto.seal(keyring, secrets.to_bytes(), record.binding)


def open_secrets(keyring: Keyring, record: SealedRow, *, accept_unbound: bool = False) -> SecretFields:
    """Open the record's secrets; any failure is one opaque `SecretUnavailable`.

    `accept_unbound` also opens format 1 (no destination bound): for the migration only.
    """
    if record.sealed is None:
        raise SecretUnavailable("the connection's secret was purged")
    try:
        plaintext = crypto.open(keyring, record.sealed, record.binding, accept_unbound=accept_unbound)
        return SecretFields.from_bytes(plaintext)
    except (DecryptionFailed, ValueError):
        raise SecretUnavailable(
            f"the secret of connection {record.id} cannot be decrypted "
            "(tampered with, re-pointed without re-sealing, or wrong master key)"
        ) from None


async def open_secrets_audited(
    keyring: Keyring, record: ConnectionRecord, audit: AuditLog, event: AuditEvent
) -> SecretFields:
    """`open_secrets`, except that a failure is first audited as `event`, failed with decrypt_failed."""
    try:
        return open_secrets(keyring, record)
    except SecretUnavailable:
        await audit.append(replace(event, outcome=Outcome.FAILED, reason=DECRYPT_FAILED))
        raise
