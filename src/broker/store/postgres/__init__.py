"""The PostgreSQL store (asyncpg), for several broker replicas: `SqlStore` over `PostgresEngine`.

Reads are single statements in autocommit; every change is one READ COMMITTED transaction,
so a change and its audit event land together or not at all. docs/ARCHITECTURE.md
("Several replicas on one database") describes the change feed, locks and shared buckets;
what the code relies on between replicas:

* `replace_connection` is a compare-and-swap, `UPDATE ... WHERE version = $n`: a
  concurrent writer of the same row waits for the row lock, re-checks the WHERE
  clause against the committed row and updates nothing (then `Aborted`).
* Audit appends take `pg_advisory_xact_lock(AUDIT_LOCK)` as the last step of their
  transaction, so all replicas extend one chain with contiguous ids. Audited writes of
  every replica therefore commit one after another (group commit in `service.audit`
  makes one lock turn per batch); nothing takes a row lock after it, so no deadlock.
* `take_oauth_state` is a single `DELETE ... RETURNING`: one caller gets the row.

A purge overwrites the sealed columns with NULL, but PostgreSQL keeps the old row
version until VACUUM (which does not zero it), in the WAL and in backups: what makes
a purged secret unrecoverable there is rotating its master key away (see the README).
"""

from __future__ import annotations

from typing import Any

from broker.store.postgres.changes import Listener
from broker.store.postgres.engine import PostgresEngine
from broker.store.sql import SqlStore

__all__ = ["PostgresStore"]


class PostgresStore(SqlStore):
    """`Store` on a PostgreSQL database; see the module docstring."""

    def __init__(self, dsn: str, **options: Any) -> None:
        """`options` are `PostgresEngine`'s: pool sizes, command timeout, listener heartbeat."""
        self.engine = PostgresEngine(dsn, **options)
        super().__init__(self.engine)

    def __repr__(self) -> str:
        # The DSN may carry a password: never part of a repr or a log line.
        return f"PostgresStore(pool_min={self.engine.pool_min}, pool_max={self.engine.pool_max})"

    @property
    def listener(self) -> Listener | None:
        """The change listener once `watch()` was called (its state: `listening`, `server_pid`)."""
        return self.engine.listener
