"""`SqlStore`: the whole `Store`, written once over an `Engine` (`broker.store.engine`).

Put together from one part per concern: `connections`, `access` (grants, OAuth
states, security events, seen facts, rate buckets), `audit`, `keys` (meta and
master keys) and `leases`, each on `lifecycle.EngineStore`. `sqlite.SqliteStore` and
`postgres.PostgresStore` are this class over their engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.store.access import Access
from broker.store.audit import Audit
from broker.store.connections import Connections
from broker.store.keys import Keys
from broker.store.leases import Leases

if TYPE_CHECKING:
    from broker.store.protocols import Store


class SqlStore(Connections, Access, Audit, Keys, Leases):
    """`Store` over an engine; see the module docstring."""


if TYPE_CHECKING:

    def _satisfies_protocol(store: SqlStore) -> Store:
        return store
