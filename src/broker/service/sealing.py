"""Sealing and opening a connection's secrets with the row's binding.

The binding (`ConnectionRecord.binding`) names the tenant, connection id, secret
version and the record's destination digest, so secrets of a row whose
destination (or the way the secret travels there) was changed in the database
without re-sealing do not open. Rows sealed in an older format are opened only by
the start-up migration (`service.rebind`, through `open_legacy_secrets`), which
re-seals them in the current one.

A stored data key is wrapped with its owner's binding without the destination: a
connection row's (`row_binding`) or a pending OAuth authorization's (`state_binding`);
`service.keys` re-wraps both.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from broker import catalog, crypto
from broker.crypto import Binding, DecryptionFailed, Keyring
from broker.errors import SecretUnavailable
from broker.model import AuditEvent, ConnectionRecord, Outcome
from broker.sensitive import SecretFields
from broker.service.audit import AuditLog

DECRYPT_FAILED = "decrypt_failed"

# Which envelope format binds what of a connection row, beyond the row itself (tenant, id,
# secret version): the version of `catalog.destination_digest` in its associated data.
#   1: nothing more (re-sealed at start)
#   2: digest v1, where the secrets are sent: URLs, host, port, driver (re-sealed at start)
#   3: digest v2, where and how: also TLS on or off, the trusted CA, driver options (re-sealed at start)
#   4: digest v3, where, how and to do what: also a dynamic connection's statements, role and
#      lifetimes (current)
# `ConnectionRecord.binding` holds the current format's, computed once per record.
DIGEST_OF_FORMAT: dict[int, int | None] = {1: None, 2: 1, 3: 2, 4: 3}
LEGACY_FORMATS = tuple(f for f in crypto.FORMATS if f != crypto.FORMAT_VERSION)


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


def open_secrets(keyring: Keyring, record: SealedRow) -> SecretFields:
    """Open the record's secrets, sealed in the current format; any failure is one opaque
    `SecretUnavailable`."""
    if record.sealed is None:
        raise SecretUnavailable("the connection's secret was purged")
    try:
        return SecretFields.from_bytes(crypto.open(keyring, record.sealed, record.binding))
    except (DecryptionFailed, ValueError):
        raise _unavailable(record.id) from None


def open_legacy_secrets(keyring: Keyring, record: ConnectionRecord) -> SecretFields:
    """Open secrets sealed in an older format, with that format's binding: for the migration only."""
    sealed = record.sealed
    version = sealed.format_version if sealed is not None else 0
    if sealed is None or version not in LEGACY_FORMATS:
        raise _unavailable(record.id)
    digest_version = DIGEST_OF_FORMAT[version]
    destination = (
        b""
        if digest_version is None
        else catalog.destination_digest(record.type, record.provider, record.config, digest_version)
    )
    binding = replace(record.binding, destination=destination)
    try:
        return SecretFields.from_bytes(crypto.open(keyring, sealed, binding, formats=(version,)))
    except (DecryptionFailed, ValueError):
        raise _unavailable(record.id) from None


def _unavailable(connection_id: str) -> SecretUnavailable:
    return SecretUnavailable(
        f"the secret of connection {connection_id} cannot be decrypted "
        "(tampered with, re-pointed without re-sealing, or wrong master key)"
    )


async def open_secrets_audited(
    keyring: Keyring, record: ConnectionRecord, audit: AuditLog, event: AuditEvent
) -> SecretFields:
    """`open_secrets`, except that a failure is first audited as `event`, failed with decrypt_failed."""
    try:
        return open_secrets(keyring, record)
    except SecretUnavailable:
        await audit.append(replace(event, outcome=Outcome.FAILED, reason=DECRYPT_FAILED))
        raise
