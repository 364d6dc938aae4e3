"""Which `Store` the settings ask for: PostgreSQL when `storage.url` is set, else SQLite.

Wiring for `server.py` and the CLI commands that open the store themselves (the
key rotation commands), so every entry point picks the same backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from broker.errors import ConfigError
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from broker.config import Settings
    from broker.store.base import Store

log = structlog.get_logger("broker.store")


def store_for(settings: Settings) -> Store:
    """A new, unopened store for these settings (`await store.open()` next)."""
    if settings.storage_url:
        # Said at run time, not only in the README: replicas do not yet invalidate
        # each other's Resolve caches (issue 8, second half).
        log.warning(
            "storage_postgres_single_replica_only",
            detail="cross-replica cache invalidation, single-flight refresh and shared rate limits are "
            "not implemented yet: a change made through one replica is not seen by another replica "
            "that cached the entry; run one replica",
        )
        return PostgresStore(
            settings.storage_url, pool_min=settings.storage_pool_min, pool_max=settings.storage_pool_max
        )
    if settings.storage_path is None:
        raise ConfigError("storage.path is required (or set BROKER_STORAGE_PATH)")
    return SqliteStore(settings.storage_path)
