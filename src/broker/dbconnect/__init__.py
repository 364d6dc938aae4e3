"""One way to connect to each network database, shared by the connection testers (`broker.testers`)
and the lease users (`broker.dbusers`): the server's settings with an address the egress policy
allowed, a pinned TLS context, and per driver the connection itself (`mysql.py`, `postgres.py`).

What a connection test does and reports stays in the testers; what a lease's administrative
session does stays in dbusers. Imports `egress` only.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.egress import EgressPolicy, parse_host
from broker.egress.hosts import host_text
from broker.egress.tcp import UnusableCa, ca_tls_context, resolve_one

__all__ = ["CleartextRefused", "DatabaseTarget", "Server", "UnusableCa", "resolve_server", "tls_context"]


class CleartextRefused(Exception):
    """Over a connection without TLS, the server asked for the password in a form it can read: in
    clear (PostgreSQL's AuthenticationCleartextPassword; MySQL's mysql_clear_password, dialog) or
    encrypted under an RSA key it sends itself (MySQL's sha256_password and the full authentication
    of caching_sha2_password). Raised before the password is sent."""


class DatabaseTarget(Protocol):
    """What `resolve_server` reads: a validated config and its secrets (a tester's `Target`)."""

    @property
    def config(self) -> Mapping[str, Any]: ...

    def secret(self, name: str) -> str: ...


@dataclass(frozen=True)
class Server:
    """A network database's settings from a validated config, plus the address the policy allowed."""

    engine: str
    host: str
    port: int
    database: str
    username: str
    password: str
    ssl: bool
    ssl_ca: str | None
    options: Mapping[str, str] = field(default_factory=dict)
    address: str = ""
    # The host as TLS must verify it: normalised (lower case, no trailing dot, IPv6 unbracketed).
    tls_name: str = ""

    def details(self, **extra: str) -> dict[str, str]:
        """Non-secret facts for a result: what was contacted, where, how."""
        return {
            "driver": self.engine,
            "host": self.host,
            "address": self.address,
            "port": str(self.port),
            "database": self.database,
            "tls": "required" if self.ssl else "off",
            **extra,
        }


async def resolve_server(target: DatabaseTarget, egress: EgressPolicy, engine: str) -> Server:
    """The server's settings with `address` set to a policy-checked IP of `host`.

    Raises `InvalidTarget` (a host that cannot be parsed), `Blocked` / `DnsFailure` (the testers'
    runner maps all three) before any packet goes to the server.
    """
    config = target.config
    host = str(config["host"])
    port = int(config["port"])
    tls_name = host_text(parse_host(host))
    address = await resolve_one(egress, host, port)
    return Server(
        engine=engine,
        host=host,
        port=port,
        database=str(config["database"]),
        username=str(config.get("username") or ""),
        password=target.secret("password"),
        ssl=bool(config.get("ssl", True)),
        ssl_ca=config.get("ssl_ca") or None,
        options={str(k): str(v) for k, v in (config.get("options") or {}).items()},
        address=str(address),
        tls_name=tls_name,
    )


def tls_context(server: Server) -> ssl.SSLContext:
    """A TLS context that verifies the certificate for the host name the user typed, although
    the driver's socket goes to the checked IP. `ssl_ca` (PEM text or a file path on the broker
    host) replaces the system trust store; without it the system CAs are used. Raises `UnusableCa`."""
    return ca_tls_context(server.tls_name, server.ssl_ca)
