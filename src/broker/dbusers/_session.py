"""What an administrative session is to `UserAdmin`, and the steps both drivers share: the
server's address through the egress policy, TLS, and the errors below the database protocol."""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import Protocol

from broker.dbconnect import Server, UnusableCa, resolve_server, tls_context
from broker.dbusers._errors import LeaseDbError
from broker.egress import Blocked, DnsFailure, EgressPolicy, InvalidTarget
from broker.testers import Target


class Session(Protocol):
    """One driver's administrative connection. Every method is bounded by the session's timeout
    and raises only LeaseDbError (close: nothing)."""

    mariadb: bool
    # Whether the server accepts a password as the form it stores (what {{password_hash}} needs).
    password_hashes: bool

    def password_form(self, password: str) -> str:
        """What the {{password}} placeholder stands for: the password, or a form of it the server
        stores as it is and cannot turn back into the password (PostgreSQL's SCRAM verifier)."""
        ...

    def password_hash(self, password: str) -> str:
        """What the {{password_hash}} placeholder stands for: the password as the server stores it
        (PostgreSQL: its SCRAM verifier; MariaDB: its mysql_native_password hash). Only called
        when `password_hashes`."""
        ...

    async def quote(self, values: Mapping[str, str]) -> dict[str, str]:
        """Each placeholder's value quoted as the server reads it (identifier or literal)."""
        ...

    async def run(self, statements: Sequence[str]) -> None:
        """Run rendered statements in order, each on its own (never a multi-statement string)."""
        ...

    async def revoke(self, name: str, statements: Sequence[str]) -> None:
        """End every session of user `name` (but ours), run the rendered revocation statements,
        and end any session that logged in meanwhile."""
        ...

    async def ping(self) -> None:
        """A trivial query: LeaseDbError when the session no longer works (a kept session the server
        or the network ended while it was idle)."""
        ...

    async def users_with_prefix(self, prefix: str) -> list[str]:
        """Users whose name starts with `prefix` (compared as text, not as a pattern)."""
        ...

    async def close(self) -> None: ...


async def checked_server(target: Target, egress: EgressPolicy, engine: str) -> Server:
    """The server's settings with a policy-checked address, or LeaseDbError before any packet."""
    try:
        return await resolve_server(target, egress, engine)
    except (Blocked, InvalidTarget):  # InvalidTarget: a host that cannot be parsed
        raise LeaseDbError("blocked") from None
    except DnsFailure:
        raise LeaseDbError("dns") from None
    except TimeoutError:
        raise LeaseDbError("timeout") from None


def tls_for(server: Server) -> ssl.SSLContext | None:
    """The pinned TLS context when the connection requires TLS; an unusable ssl_ca is "tls"."""
    if not server.ssl:
        return None
    try:
        return tls_context(server)
    except UnusableCa:
        raise LeaseDbError("tls") from None


def transport_reason(exc: BaseException) -> str | None:
    """The reason for an error below the database protocol (TCP, TLS, timeouts), or None."""
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return "tls"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):  # refused, unreachable, reset
        return "connect_failed"
    return None
