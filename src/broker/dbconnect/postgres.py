"""PostgreSQL with asyncpg: a connection to the checked IP with every setting explicit.

asyncpg is always given every setting explicitly (password "" rather than None, ssl context or
False), so it never falls back to the broker host's PG* environment, ~/.pgpass or
~/.postgresql client certificates, which would leak the broker's own credentials to a
user-chosen server.
"""

from __future__ import annotations

import ssl
from typing import Any

import asyncpg

from broker.dbconnect import Server

__all__ = ["connect"]


async def connect(server: Server, tls: ssl.SSLContext | None, timeout: float, **options: Any) -> Any:  # noqa: ASYNC109
    """asyncpg to `server`'s checked address with every setting explicit (see the module
    docstring); the testers and the lease users (broker.dbusers) connect through this."""
    return await asyncpg.connect(
        host=server.address,
        port=server.port,
        user=server.username,
        password=server.password,
        database=server.database,
        ssl=tls if tls is not None else False,
        direct_tls=False,
        timeout=timeout,
        server_settings=dict(server.options) or None,
        **options,
    )
