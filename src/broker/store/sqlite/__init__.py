"""The embedded SQLite backend of the `Store` protocol (aiosqlite).

One writer connection, serialised by an `asyncio.Lock`, runs every change as
`BEGIN IMMEDIATE ... COMMIT` (rolled back on any exception, so a change and
its audit event land together or not at all). A second, query-only connection
serves reads; WAL lets it read while the writer writes. `secure_delete` zeroes
freed space, so a purged wrapped data key does not linger in the file.

The class is put together from one part per concern: `_base` (lifecycle and
plumbing), `_connections`, `_access` (grants, OAuth states, security events,
seen facts, rate buckets), `_audit` and `_keys` (meta and master keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.store.sqlite._access import Access
from broker.store.sqlite._audit import Audit
from broker.store.sqlite._connections import Connections
from broker.store.sqlite._keys import Keys

if TYPE_CHECKING:
    from broker.store.protocols import Store

__all__ = ["SqliteStore"]


class SqliteStore(Connections, Access, Audit, Keys):
    """`Store` on one SQLite file; see the module docstring for the connection layout."""


if TYPE_CHECKING:

    def _satisfies_protocol(store: SqliteStore) -> Store:
        return store
