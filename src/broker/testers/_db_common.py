"""What the network database testers share: the server's settings, a pinned TLS context, and
the classification of errors that happen before the database protocol starts (TCP, TLS, timeouts).
"""

from __future__ import annotations

import errno
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from broker.egress import EgressPolicy, InvalidTarget, parse_host
from broker.egress.hosts import host_text
from broker.egress.tcp import pinned_tls_context, resolve_one
from broker.model import TestCategory, TestStage
from broker.testers.base import Target, TestFailure

PEM_MARKER = "-----BEGIN"


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


async def resolve_server(target: Target, egress: EgressPolicy, engine: str) -> Server:
    """The server's settings with `address` set to a policy-checked IP of `host`.

    Raises `Blocked` / `DnsFailure` (mapped by the runner) before any packet goes to the server.
    """
    config = target.config
    host = str(config["host"])
    port = int(config["port"])
    try:
        tls_name = host_text(parse_host(host))
    except InvalidTarget as exc:
        raise TestFailure(TestCategory.INVALID_CONFIG, TestStage.RESOLVE_ADDRESS, exc.reason) from None
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
    host) replaces the system trust store; without it the system CAs are used."""
    ca = server.ssl_ca
    pem = ca is not None and ca.lstrip().startswith(PEM_MARKER)
    try:
        return pinned_tls_context(
            server.tls_name, cafile=None if pem else ca, cadata=ca.strip() if pem and ca else None
        )
    except FileNotFoundError:
        raise TestFailure(
            TestCategory.INVALID_CONFIG, TestStage.TLS, "ssl_ca names a file that does not exist"
        ) from None
    except (ssl.SSLError, ValueError, OSError):
        raise TestFailure(
            TestCategory.INVALID_CONFIG, TestStage.TLS, "ssl_ca is not a readable PEM CA certificate"
        ) from None


def transport_failure(exc: BaseException, server: Server, timeout: float) -> TestFailure | None:
    """Classify an error from below the database protocol (TCP, TLS, timeouts), or None."""
    details = server.details(error_type=type(exc).__name__)
    if isinstance(exc, ssl.SSLCertVerificationError):
        # verify_message is OpenSSL's short reason ("Hostname mismatch", "unable to get local issuer").
        reason = getattr(exc, "verify_message", "") or "verification failed"
        return TestFailure(
            TestCategory.TLS_ERROR,
            TestStage.TLS,
            f"the server's TLS certificate is not valid for {server.host}: {reason}",
            details,
            verified=("address allowed by egress policy", "tcp connect"),
        )
    if isinstance(exc, ssl.SSLError):
        return TestFailure(
            TestCategory.TLS_ERROR,
            TestStage.TLS,
            f"TLS handshake with {server.host} failed ({exc.reason or 'ssl error'})",
            details,
            verified=("address allowed by egress policy", "tcp connect"),
        )
    if isinstance(exc, TimeoutError):
        return TestFailure(
            TestCategory.TIMEOUT,
            TestStage.CONNECT,
            f"no answer from {server.host}:{server.port} within {timeout:g} s",
            details,
        )
    if isinstance(exc, ConnectionRefusedError):
        return TestFailure(
            TestCategory.CONNECTION_REFUSED,
            TestStage.CONNECT,
            f"connection to {server.host}:{server.port} was refused",
            details,
            verified=("address allowed by egress policy",),
        )
    if isinstance(exc, OSError) and exc.errno is not None:
        details["errno"] = errno.errorcode.get(exc.errno, str(exc.errno))
        return TestFailure(
            TestCategory.CONNECTION_REFUSED,
            TestStage.CONNECT,
            f"cannot connect to {server.host}:{server.port}: {exc.strerror or 'network error'}",
            details,
            verified=("address allowed by egress policy",),
        )
    return None


def tls_not_offered(server: Server) -> TestFailure:
    """The server does not offer TLS although the connection requires it; nothing was sent in clear."""
    return TestFailure(
        TestCategory.TLS_ERROR,
        TestStage.TLS,
        f"the server at {server.host}:{server.port} does not offer TLS, but ssl is required",
        server.details(),
        verified=("address allowed by egress policy", "tcp connect"),
        not_verified=("credentials",),
    )


def success_notes(server: Server, login_checked: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(verified, not_verified) for a successful network database test, said honestly."""
    verified = ["address allowed by egress policy", "tcp connect"]
    not_verified = [
        # A server may trust the login (trust auth, unix_socket...): we cannot tell it checked the password.
        "that the server checked the password (it may trust this login)",
        "privileges beyond connecting and SELECT 1",
    ]
    if server.ssl:
        verified.append(f"tls, certificate valid for {server.host}")
    else:
        not_verified.append("tls (ssl is off)")
    verified += [login_checked, f"database {server.database} accessible", "SELECT 1"]
    return tuple(verified), tuple(not_verified)
