"""The bench's world in a temporary directory: PKI, master key, broker settings, seeded store.

Seeding goes through the real services (catalog validation, envelope sealing,
grant checks) straight into the store, with `synchronous = OFF` on the store's
writer for the duration: the bench database is throw-away, and 10,000 fsyncs
would otherwise dominate the run. The broker reopens the file with its own
pragmas (`synchronous = FULL`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from dataclasses import dataclass
from pathlib import Path

from broker import pki
from broker.config import Settings
from broker.identity import parse_spiffe_id
from broker.sensitive import SecretFields
from broker.service.access import AccessService
from broker.service.cache import ResolveCache
from broker.service.connections import ConnectionService, NewConnection, utc_now
from broker.service.context import Call
from broker.store.sqlite import SqliteStore

TRUST_DOMAIN = "broker.local"
ADMIN = f"spiffe://{TRUST_DOMAIN}/tenant/bench/admin/bench"
EXECUTOR = f"spiffe://{TRUST_DOMAIN}/tenant/bench/executor/bench"

# Limits raised so they never cap the numbers: the bench measures the broker, not its
# token buckets (the defaults are 200 Resolves/s per executor, 600 admin writes/min).
BENCH_CONFIG = """\
trust_domain = "{trust_domain}"
[listen]
admin = "127.0.0.1:0"
resolve = "127.0.0.1:0"
[tls]
cert = "tls/server.pem"
key = "tls/server-key.pem"
client_ca = "tls/ca.pem"
[storage]
path = "broker.db"
[master_key]
file = "master.key"
[log]
level = "{log_level}"
[server]
grace_seconds = 2
[metrics]
listen = "127.0.0.1:0"
[limits]
resolve_per_second = 1000000
resolve_burst = 1000000
admin_writes_per_minute = 1000000
tests_per_minute = 100000
"""


@dataclass(frozen=True)
class Identity:
    cert: bytes
    key: bytes


@dataclass(frozen=True)
class BenchEnv:
    root: Path
    ca: bytes
    admin: Identity
    executor: Identity

    @property
    def config(self) -> Path:
        return self.root / "broker.toml"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    def settings(self) -> Settings:
        return Settings.load(self.config, environ={})


def make_env(root: Path, log_level: str = "info") -> BenchEnv:
    """CA, server and client certificates, a master key and the broker's TOML in `root`."""
    ca, ca_key = pki.create_ca("broker bench CA")
    server = pki.issue_server_cert(ca, ca_key, ["127.0.0.1", "localhost"])
    tls = root / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    (tls / "ca.pem").write_bytes(ca)
    (tls / "server.pem").write_bytes(server[0])
    pki.write_private(tls / "server-key.pem", server[1])
    pki.write_private(root / "master.key", base64.b64encode(os.urandom(32)))
    (root / "broker.toml").write_text(BENCH_CONFIG.format(trust_domain=TRUST_DOMAIN, log_level=log_level))
    admin = Identity(*pki.issue_principal_cert(ca, ca_key, ADMIN))
    executor = Identity(*pki.issue_principal_cert(ca, ca_key, EXECUTOR))
    return BenchEnv(root, ca, admin, executor)


def new_http_connection(name: str) -> NewConnection:
    """A typical HTTP API connection: a base URL, bearer auth, one secret token."""
    return NewConnection(
        name=name,
        type="http",
        provider="",
        config={"base_url": f"https://api.example.com/v1/{name}", "auth_type": "bearer"},
        secrets=SecretFields({"token": "bench-" + base64.b64encode(os.urandom(24)).decode()}),
        labels={"team": "bench"},
    )


async def seed(env: BenchEnv, count: int, *, grant: bool = True, chunk: int = 64) -> tuple[list[str], float]:
    """Create `count` connections (granted to the bench executor); their ids and the seconds taken."""
    settings = env.settings()
    assert settings.storage_path is not None
    store = SqliteStore(settings.storage_path)
    await store.open()
    started = time.perf_counter()
    try:
        # The store's one writer connection: throw-away data, so no fsync per seeded row.
        await store._writer.execute("PRAGMA synchronous = OFF")  # type: ignore[union-attr]
        keyring = settings.load_keyring()
        cache = ResolveCache()
        connections = ConnectionService(store, keyring, cache)
        access = AccessService(store, cache, utc_now)
        admin = Call(parse_spiffe_id(ADMIN, TRUST_DOMAIN), "seed")
        ids: list[str] = []
        for first in range(0, count, chunk):
            batch = range(first, min(count, first + chunk))
            records = await asyncio.gather(
                *(connections.create(admin, new_http_connection(f"conn-{i:06d}")) for i in batch)
            )
            if grant:
                await asyncio.gather(*(access.grant(admin, r.id, EXECUTOR, None) for r in records))
            ids.extend(r.id for r in records)
    finally:
        await store.close()
    return ids, time.perf_counter() - started
