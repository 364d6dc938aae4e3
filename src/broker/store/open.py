"""Which `Store` the settings ask for: PostgreSQL when `storage.url` is set, else SQLite.

Wiring for `server.py` and the CLI commands that open the store themselves (the
key rotation commands), so every entry point picks the same backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from broker.errors import ConfigError
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from broker.config import Settings
    from broker.store.protocols import Store


def store_for(settings: Settings) -> Store:
    """A new, unopened store for these settings (`await store.open()` next)."""
    if settings.storage_url:
        return PostgresStore(
            settings.storage_url, pool_min=settings.storage_pool_min, pool_max=settings.storage_pool_max
        )
    if settings.storage_path is None:
        raise ConfigError("storage.path is required (or set BROKER_STORAGE_PATH)")
    return SqliteStore(settings.storage_path)
