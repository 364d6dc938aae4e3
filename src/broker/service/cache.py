"""In-memory cache for the Resolve path: compact connection entries and their grants.

Writes invalidate after they commit, this process's and other replicas' alike,
through the store's change feed (`Store.watch`, `service.replicas`), never by hand. A
reader that loaded a value from the store while a write was committing must not
put that stale value back: every entry is offered with the generation seen
*before* the read, and dropped if an invalidation happened since.

While the feed is down (`changes_unseen`), the cache holds nothing and accepts
nothing, so every Resolve reads the store: slower, never stale.

The cache holds at most `max_entries` connections and forgets the least recently
used one first; a connection's grants live on its entry and go with it. An entry
keeps only what Resolve needs (`CachedConnection`: about 1.0 KB of heap with a grant,
against 3.3 KB for the store's `ConnectionRecord` and `Grant`; measured in
tests/unit/test_resolve_cache.py), with the non-secret part of the answer already
serialised, once per record version: an update is a new version, which the feed
invalidates, so the next Resolve builds a new entry and the old bytes are never
served again.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from broker import catalog, metrics
from broker.crypto import Binding, Sealed
from broker.model import ConnectionRecord, Grant, GrantMode
from broker.service.lookup import refusal

_MISSING: Final = object()
# The end of a grant that does not end: compares later than any `now`.
FOREVER: Final = datetime.max.replace(tzinfo=UTC)
DEFAULT_ENTRIES: Final = 100_000


@dataclass(frozen=True, slots=True)
class GrantTerms:
    """What Resolve needs of a grant: when it ends (`FOREVER` if never) and its mode."""

    ends: datetime
    mode: GrantMode


# The terms of most grants: one object shared by every entry, so they cost an entry nothing.
_RESOLVE_FOREVER: Final = GrantTerms(FOREVER, GrantMode.RESOLVE)


def grant_terms(grant: Grant | None) -> GrantTerms | None:
    """`grant`'s terms; None for no grant."""
    if grant is None:
        return None
    if grant.expires_at is None and grant.mode is GrantMode.RESOLVE:
        return _RESOLVE_FOREVER
    return GrantTerms(grant.expires_at or FOREVER, grant.mode)


class CachedConnection:
    """What Resolve needs of one version of a connection record, and its cached grants.

    Strings shared by many entries (tenant, type, key id) are interned; the sealed
    secrets stay the store's bytes; config, provider and the connection's identity
    are kept once, as `public`: the serialised non-secret part of the answer.
    """

    __slots__ = (
        "binding",
        "dynamic",
        "grantee",
        "grantee_terms",
        "id",
        "live",
        "name",
        "oauth",
        "other_grants",
        "public",
        "refusal",
        "sealed",
        "tenant",
        "withheld",
    )

    def __init__(self, record: ConnectionRecord, public: bytes) -> None:
        self.tenant = sys.intern(record.tenant)
        self.id = record.id
        self.name = record.name
        self.live = record.live
        self.refusal = refusal(record)
        sealed = record.sealed
        if sealed is not None:
            sealed = Sealed(sealed.ciphertext, sealed.wrapped_dek, sys.intern(sealed.kek_id))
        self.sealed = sealed
        self.binding = Binding(self.tenant, self.id, record.secret_version, record.binding.destination)
        self.public = public
        # The secrets Resolve keeps back (an OAuth2 client secret and refresh token): one shared
        # set per type.
        self.withheld = catalog.withheld_fields(record.type)
        # OAuth2 decides per call whether to refresh from the token times in the config: those
        # few connections keep their whole record.
        self.oauth = record if record.type == "oauth2" else None
        # A dynamic database connection makes a lease per Resolve from its config: kept whole too.
        self.dynamic = record if record.dynamic else None
        # Grants cached for this connection: each principal's terms, or None when it is known to
        # have none. Most connections have one caller: it is kept in two slots
        # (a dict costs ~300 bytes per entry); any others in a dict.
        self.grantee: str | None = None
        self.grantee_terms: GrantTerms | None = None
        self.other_grants: dict[str, GrantTerms | None] | None = None

    def grant(self, principal: str) -> GrantTerms | object | None:
        """`principal`'s cached grant terms, None when known absent, `MISSING` when not cached."""
        if self.grantee == principal:
            return self.grantee_terms
        others = self.other_grants
        return _MISSING if others is None else others.get(principal, _MISSING)

    def put_grant(self, principal: str, terms: GrantTerms | None) -> None:
        if self.grantee is None or self.grantee == principal:
            self.grantee, self.grantee_terms = sys.intern(principal), terms
        else:
            if self.other_grants is None:
                self.other_grants = {}
            self.other_grants[sys.intern(principal)] = terms

    def forget_grant(self, principal: str) -> None:
        if self.grantee == principal:
            self.grantee = self.grantee_terms = None
        elif self.other_grants is not None:
            self.other_grants.pop(principal, None)

    @property
    def secret_version(self) -> int:
        return self.binding.secret_version


class ResolveCache:
    """Connections by id (least recently used first) and by tenant and name, each with its grants.

    Keyed by the connection id alone (ids are random; no tuple to build per call): an entry
    answers only for its own tenant, so another tenant's id is a miss, as it is in the store.
    """

    def __init__(
        self, *, public_part: Callable[[ConnectionRecord], bytes], max_entries: int = DEFAULT_ENTRIES
    ) -> None:
        """`public_part` serialises a record's non-secret answer (the API layer knows the encoding)."""
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.public_part = public_part
        self._max = max_entries
        self.generation = 0
        self._keeping = True  # False while other writers' changes could go unseen
        self._by_id: OrderedDict[str, CachedConnection] = OrderedDict()
        self._id_by_name: dict[str, dict[str, str]] = {}  # tenant -> name -> id

    def __len__(self) -> int:
        return len(self._by_id)

    def connection(self, tenant: str, connection_id: str) -> CachedConnection | None:
        """The cached entry, now the most recently used; None when not cached."""
        entry = self._by_id.get(connection_id)
        if entry is None or entry.tenant != tenant:
            return None
        self._by_id.move_to_end(connection_id)
        return entry

    def _entry(self, tenant: str, connection_id: str) -> CachedConnection | None:
        """The entry, without touching its recency."""
        entry = self._by_id.get(connection_id)
        return entry if entry is not None and entry.tenant == tenant else None

    def connection_id_by_name(self, tenant: str, name: str) -> str | None:
        names = self._id_by_name.get(tenant)
        return None if names is None else names.get(name)

    def put_connection(self, record: ConnectionRecord, generation: int) -> CachedConnection:
        """The record's entry, kept unless an invalidation happened since `generation` was read."""
        entry = CachedConnection(record, self.public_part(record))
        if generation != self.generation or not self._keeping:
            return entry
        self._forget(self._by_id.get(entry.id))  # a deleted record may still hold its name's place
        while len(self._by_id) >= self._max:
            _, oldest = self._by_id.popitem(last=False)
            self._unname(oldest)
            metrics.RESOLVE_CACHE_EVICTIONS.inc()
        self._by_id[entry.id] = entry
        if entry.live:
            self._id_by_name.setdefault(entry.tenant, {})[entry.name] = entry.id
        metrics.RESOLVE_CACHE_ENTRIES.set(len(self._by_id))
        return entry

    def grant(self, tenant: str, connection_id: str, principal: str) -> GrantTerms | object | None:
        """The cached grant's terms, None when known absent, or `MISSING`."""
        entry = self._entry(tenant, connection_id)
        return _MISSING if entry is None else entry.grant(principal)

    def put_grant(
        self, tenant: str, connection_id: str, principal: str, grant: Grant | None, generation: int
    ) -> None:
        """Kept on the connection's cached entry, unless something was invalidated since `generation`."""
        entry = self._entry(tenant, connection_id)
        if generation != self.generation or not self._keeping or entry is None:
            return
        entry.put_grant(principal, grant_terms(grant))

    def invalidate_connection(self, tenant: str, connection_id: str) -> None:
        """Forget a connection (and every name pointing at it) and its grants."""
        self.generation += 1
        self._forget(self._entry(tenant, connection_id))

    def invalidate_grant(self, tenant: str, connection_id: str, principal: str) -> None:
        self.generation += 1
        entry = self._entry(tenant, connection_id)
        if entry is not None:
            entry.forget_grant(principal)

    def clear(self) -> None:
        self.generation += 1
        self._by_id.clear()
        self._id_by_name.clear()
        metrics.RESOLVE_CACHE_ENTRIES.set(0)

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

    def _forget(self, entry: CachedConnection | None) -> None:
        if entry is not None:
            del self._by_id[entry.id]
            self._unname(entry)
            metrics.RESOLVE_CACHE_ENTRIES.set(len(self._by_id))

    def _unname(self, entry: CachedConnection) -> None:
        names = self._id_by_name.get(entry.tenant)
        if names is not None and names.get(entry.name) == entry.id:
            del names[entry.name]
            if not names:
                del self._id_by_name[entry.tenant]


MISSING = _MISSING
