"""In-memory caches for the Resolve path: connection records and grants.

Writes invalidate after they commit, this process's and other replicas' alike,
through the store's change feed (`Store.watch`, `service.replicas`), never by hand. A
reader that loaded a value from the store while a write was committing must not
put that stale value back: every entry is offered with the generation seen
*before* the read, and dropped if an invalidation happened since.

While the feed is down (`changes_unseen`), the cache holds nothing and accepts
nothing, so every Resolve reads the store: slower, never stale.
"""

from __future__ import annotations

from typing import Final

from broker import metrics
from broker.model import ConnectionRecord, Grant

_MISSING: Final = object()


class ResolveCache:
    """Connection records by id and by name, and grants (including "no grant")."""

    def __init__(self, max_connections: int = 100_000) -> None:
        self._max = max_connections
        self.generation = 0
        self._keeping = True  # False while other writers' changes could go unseen
        self._by_id: dict[tuple[str, str], ConnectionRecord] = {}
        self._id_by_name: dict[tuple[str, str], str] = {}
        # (tenant, connection_id) -> principal -> grant or None (known absent)
        self._grants: dict[tuple[str, str], dict[str, Grant | None]] = {}

    def connection(self, tenant: str, connection_id: str) -> ConnectionRecord | None:
        return self._by_id.get((tenant, connection_id))

    def connection_id_by_name(self, tenant: str, name: str) -> str | None:
        return self._id_by_name.get((tenant, name))

    def put_connection(self, record: ConnectionRecord, generation: int) -> None:
        if generation != self.generation or not self._keeping:
            return
        if len(self._by_id) >= self._max:
            # Cheap bound: forget the oldest inserted entries rather than grow without limit.
            oldest = next(iter(self._by_id))
            self._forget(*oldest)
        self._by_id[(record.tenant, record.id)] = record
        if record.live:
            self._id_by_name[(record.tenant, record.name)] = record.id

    def grant(self, tenant: str, connection_id: str, principal: str) -> Grant | object | None:
        """The cached grant, None when known absent, or `MISSING` when not cached."""
        return self._grants.get((tenant, connection_id), {}).get(principal, _MISSING)

    def put_grant(
        self, tenant: str, connection_id: str, principal: str, grant: Grant | None, generation: int
    ) -> None:
        if generation != self.generation or not self._keeping:
            return
        self._grants.setdefault((tenant, connection_id), {})[principal] = grant

    def invalidate_connection(self, tenant: str, connection_id: str) -> None:
        """Forget a connection (and every name pointing at it) and its grants."""
        self.generation += 1
        self._forget(tenant, connection_id)
        self._grants.pop((tenant, connection_id), None)

    def invalidate_grant(self, tenant: str, connection_id: str, principal: str) -> None:
        self.generation += 1
        self._grants.get((tenant, connection_id), {}).pop(principal, None)

    def clear(self) -> None:
        self.generation += 1
        self._by_id.clear()
        self._id_by_name.clear()
        self._grants.clear()

    # ------------------------------------------- the change feed (ReplicaChanges)

    def changes_unseen(self) -> None:
        self._keeping = False
        self.clear()
        metrics.CHANGE_LISTENER_CONNECTED.set(0)

    def changes_seen(self) -> None:
        # Clear first: whatever was cached before may have changed unseen.
        self.clear()
        self._keeping = True
        metrics.CHANGE_LISTENER_CONNECTED.set(1)

    def _forget(self, tenant: str, connection_id: str) -> None:
        record = self._by_id.pop((tenant, connection_id), None)
        if record is not None and self._id_by_name.get((tenant, record.name)) == connection_id:
            del self._id_by_name[(tenant, record.name)]


MISSING = _MISSING
