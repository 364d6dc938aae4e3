"""Persistence: the store's role protocols (`broker.store.protocols`) and its backends."""

from broker.store.protocols import (
    AuditLogStore,
    ChangeSink,
    ConnectionStore,
    Coordination,
    GrantStore,
    KeyStore,
    LeaseStore,
    Lifecycle,
    OAuthStateStore,
    RevocationQueue,
    SecretVersionStore,
    SecurityEventStore,
    Store,
    WrappedDek,
)

__all__ = [
    "AuditLogStore",
    "ChangeSink",
    "ConnectionStore",
    "Coordination",
    "GrantStore",
    "KeyStore",
    "LeaseStore",
    "Lifecycle",
    "OAuthStateStore",
    "RevocationQueue",
    "SecretVersionStore",
    "SecurityEventStore",
    "Store",
    "WrappedDek",
]
