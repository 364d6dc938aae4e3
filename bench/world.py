"""The bench's world in a temporary directory: PKI, master key, broker settings, seeded store.

Seeding goes through the real services (catalog validation, envelope sealing,
grant checks) straight into the store, with `synchronous = OFF` on the store's
writer for the duration: the bench database is throw-away, and 10,000 fsyncs
would otherwise dominate the run. The broker reopens the file with its own
pragmas (`synchronous = FULL`).

Replicas on PostgreSQL get one TOML each (`replica_config`) beside the first: the same
TLS files, CA and master key, their own ports. Their store is seeded through the admin
API of a running replica (`seed_through_admin`), the way an operator would fill it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf import struct_pb2

from broker import pki
from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.config import Settings
from broker.identity import parse_spiffe_id
from broker.sensitive import SecretFields
from broker.service.access import AccessService
from broker.service.audit import AuditLog
from broker.service.connections import ConnectionService, NewConnection, utc_now
from broker.service.context import Call
from broker.store.sqlite import SqliteStore

TRUST_DOMAIN = "broker.local"
ADMIN = f"spiffe://{TRUST_DOMAIN}/tenant/bench/admin/bench"
EXECUTOR = f"spiffe://{TRUST_DOMAIN}/tenant/bench/executor/bench"
T = TypeVar("T")
R = TypeVar("R")

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
{storage}
[master_key]
file = "master.key"
[log]
level = "{log_level}"
[server]
grace_seconds = 2
[metrics]
listen = "{metrics_listen}"
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
    (root / "broker.toml").write_text(
        _broker_toml('path = "broker.db"', metrics_listen="127.0.0.1:0", log_level=log_level)
    )
    admin = Identity(*pki.issue_principal_cert(ca, ca_key, ADMIN))
    executor = Identity(*pki.issue_principal_cert(ca, ca_key, EXECUTOR))
    return BenchEnv(root, ca, admin, executor)


def _broker_toml(storage: str, *, metrics_listen: str, log_level: str = "info") -> str:
    return BENCH_CONFIG.format(
        trust_domain=TRUST_DOMAIN, log_level=log_level, storage=storage, metrics_listen=metrics_listen
    )


def replica_config(env: BenchEnv, name: str, database_url: str) -> Path:
    """`<root>/<name>.toml`: a broker on PostgreSQL at `database_url`, metrics off.

    Relative paths resolve against the TOML's directory, so every replica written here
    shares the TLS files, the CA and the master key of `env`; ports are picked by the OS.
    """
    # A JSON string is a valid TOML basic string (same escapes), whatever the URL holds.
    path = env.root / f"{name}.toml"
    path.write_text(_broker_toml(f"url = {json.dumps(database_url)}", metrics_listen=""))
    return path


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
        await store.engine.writer.execute("PRAGMA synchronous = OFF")  # type: ignore[union-attr]
        keyring = settings.load_keyring()
        connections = ConnectionService(store, keyring, AuditLog(store))
        access = AccessService(store, store, utc_now)
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


def channel(env: BenchEnv, identity: Identity, port: int) -> grpc.aio.Channel:
    """A channel to 127.0.0.1:`port` over the bench's mTLS, as `identity`."""
    creds = grpc.ssl_channel_credentials(env.ca, identity.key, identity.cert)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


async def _each(items: Iterable[T], work: Callable[[T], Awaitable[R]], in_flight: int) -> list[R]:
    """`work` on every item, at most `in_flight` at a time; the results in order."""
    gate = asyncio.Semaphore(in_flight)

    async def one(item: T) -> R:
        async with gate:
            return await work(item)

    return list(await asyncio.gather(*(one(item) for item in items)))


def _create_request(new: NewConnection) -> pb.CreateConnectionRequest:
    config = struct_pb2.Struct()
    config.update(new.config)
    return pb.CreateConnectionRequest(
        name=new.name, type=new.type, config=config, secrets=new.secrets.reveal(), labels=new.labels
    )


async def seed_through_admin(
    env: BenchEnv, admin_port: int, count: int, *, in_flight: int = 32
) -> tuple[list[str], float]:
    """`seed`'s connections and grants, made over a running broker's admin API; ids and seconds."""
    async with channel(env, env.admin, admin_port) as admin_channel:
        admin = broker_pb2_grpc.AdminServiceStub(admin_channel)  # type: ignore[no-untyped-call]
        await asyncio.wait_for(admin_channel.channel_ready(), 10)

        async def create_and_grant(i: int) -> str:
            created = await admin.CreateConnection(
                _create_request(new_http_connection(f"conn-{i:06d}")), timeout=30
            )
            grant = pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR)
            await admin.GrantAccess(grant, timeout=30)
            return str(created.id)

        started = time.perf_counter()
        ids = await _each(range(count), create_and_grant, in_flight)
    return ids, time.perf_counter() - started


async def warm_caches(env: BenchEnv, resolve_ports: Iterable[int], ids: list[str]) -> None:
    """Resolve every id once on every port, so each replica's own Resolve cache holds them all."""
    await asyncio.gather(*(_resolve_each(env, port, ids, in_flight=32) for port in resolve_ports))


async def _resolve_each(env: BenchEnv, port: int, ids: list[str], *, in_flight: int) -> None:
    async with channel(env, env.executor, port) as resolve_channel:
        resolve = broker_pb2_grpc.ResolveServiceStub(resolve_channel).Resolve  # type: ignore[no-untyped-call]

        async def resolve_one(connection_id: str) -> None:
            await resolve(pb.ResolveRequest(connection_id=connection_id, purpose="bench warm-up"), timeout=30)

        await _each(ids, resolve_one, in_flight)
