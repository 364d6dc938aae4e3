"""What this replica hears from the store's change feed (`Store.watch`): its own committed writes
and other replicas', handed to what they affect.

Rows that changed and the state of the feed go to the Resolve cache; a principal
blocked by another replica's monitor goes to this replica's monitor. The lease service
hears of changed connections, grants and blocks too: a change that ends a lease's right
to exist (a revoked grant, a deleted connection, a blocked principal) queues its revocation.
"""

from __future__ import annotations

from typing import Protocol

from broker.service.cache import ResolveCache
from broker.service.monitor import Monitor


class LeaseChanges(Protocol):
    """What the lease service (`LeaseService`) hears: changes that may end leases."""

    def connection_changed(self, tenant: str, connection_id: str) -> None: ...

    def grant_changed(self, tenant: str, connection_id: str, principal: str) -> None: ...

    def principal_blocked(self, tenant: str, principal: str, until: float) -> None: ...


class ReplicaChanges:
    """The `ChangeSink` the server gives the store."""

    def __init__(self, cache: ResolveCache, monitor: Monitor, leases: LeaseChanges) -> None:
        self._cache = cache
        self._monitor = monitor
        self._leases = leases

    def connection_changed(self, tenant: str, connection_id: str) -> None:
        self._cache.invalidate_connection(tenant, connection_id)
        self._leases.connection_changed(tenant, connection_id)

    def grant_changed(self, tenant: str, connection_id: str, principal: str) -> None:
        self._cache.invalidate_grant(tenant, connection_id, principal)
        self._leases.grant_changed(tenant, connection_id, principal)

    def changes_unseen(self) -> None:
        self._cache.changes_unseen()

    def changes_seen(self) -> None:
        self._cache.changes_seen()

    def principal_blocked(self, tenant: str, principal: str, until: float) -> None:
        self._monitor.block(tenant, principal, until)
        self._leases.principal_blocked(tenant, principal, until)
