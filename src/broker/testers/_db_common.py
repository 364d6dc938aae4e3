"""What the network database testers share: the pinned TLS context as a test failure, the
classification of errors that happen before the database protocol starts (TCP, TLS, timeouts), and
what a successful test says. The server's settings and the connections are `broker.dbconnect`'s.
"""

from __future__ import annotations

import errno
import ssl

from broker import dbconnect
from broker.dbconnect import Server, UnusableCa
from broker.model import TestCategory, TestStage
from broker.testers.base import TestFailure


def tls_context(server: Server) -> ssl.SSLContext:
    """The connection's pinned TLS context (`broker.dbconnect.tls_context`); an unusable `ssl_ca`
    is an invalid config, found before anything is sent."""
    try:
        return dbconnect.tls_context(server)
    except UnusableCa as exc:
        raise TestFailure(TestCategory.INVALID_CONFIG, TestStage.TLS, str(exc)) from None


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


def cleartext_refused(server: Server) -> TestFailure:
    """Without TLS the server asked for the password in a form it can read (`CleartextRefused`);
    it was not sent."""
    return TestFailure(
        TestCategory.AUTH_FAILED,
        TestStage.AUTHENTICATE,
        "the server asked for the password in a form it can read (in clear text, or encrypted"
        " under an RSA key of its own) without TLS; refused (enable ssl)",
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
