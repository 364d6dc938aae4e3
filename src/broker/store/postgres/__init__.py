"""The PostgreSQL backend of the `Store` protocol (asyncpg), for several broker replicas.

A pool of connections (`pool_min`..`pool_max`). Reads are single statements in
autocommit (READ COMMITTED). Every change runs in one READ COMMITTED transaction,
rolled back on any exception, so a change and its audit event land together or
not at all. Concurrency between replicas rests on these:

* `replace_connection` is a compare-and-swap, `UPDATE ... WHERE version = $n`: a
  concurrent writer of the same row waits for the row lock, re-checks the WHERE
  clause against the committed row and updates nothing (then `Aborted`).
* Audit appends are serialised by a transaction-level advisory lock
  (`pg_advisory_xact_lock(AUDIT_LOCK)`), taken as the last step of every
  transaction that writes an event, so all replicas extend one hash chain with
  contiguous ids. The cost: audited writes of every replica commit one after
  another (the group commit in `service.audit` makes one lock turn per batch, and
  the lock is held only from the append to the commit, one round trip and one
  WAL flush). Because nothing takes a row lock after the advisory lock, a
  transaction holding it never waits for one: no deadlock.
* `take_oauth_state` is a single `DELETE ... RETURNING`: one caller gets the row.
* Writes that change what Resolve serves (a connection row, a grant, re-wrapped keys)
  NOTIFY in their transaction; every replica LISTENs and invalidates its cache
  (`_pg_changes`, which also says what happens while a listener is down).
* An OAuth2 refresh holds a per-connection advisory lock (`refresh_lock`) on a
  session of a separate small pool, so one replica calls the token endpoint.
* Shared rate-limit buckets are rows taken under their row lock, on the server's clock.

Every session carries `application_name` = `broker/<pid>/<use>/<host>` (use: query,
lock or listen), so pg_stat_activity tells replicas, and a replica's sessions, apart.

Purging overwrites the sealed columns with NULL in the UPDATE, as on SQLite. Unlike
SQLite's `secure_delete`, PostgreSQL keeps the old row version in the table until
VACUUM reclaims it (and even then does not zero the space), in the WAL until it is
recycled, and in any base backup or replica. The store does not run VACUUM per
purge: it cannot run in a transaction and would not erase the WAL or backups
anyway. What makes a purged secret unrecoverable on PostgreSQL is cryptographic:
its data key is wrapped by a master key, and rotating that key away (and
destroying it) leaves the lingering bytes useless. See the README.

The class is put together from one part per concern: `_base` (lifecycle, pools and
plumbing), `_connections`, `_access` (grants, OAuth states, security events, seen
facts, rate buckets), `_audit` and `_keys` (meta and master keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.store.postgres._access import Access
from broker.store.postgres._audit import Audit
from broker.store.postgres._connections import Connections
from broker.store.postgres._keys import Keys

if TYPE_CHECKING:
    from broker.store.protocols import Store

__all__ = ["PostgresStore"]


class PostgresStore(Connections, Access, Audit, Keys):
    """`Store` on a PostgreSQL database; see the module docstring for the concurrency model."""


if TYPE_CHECKING:

    def _satisfies_protocol(store: PostgresStore) -> Store:
        return store
