"""MySQL / MariaDB with aiomysql: connect to the checked IP, authenticate, `SELECT 1`, close.

The connection is `broker.dbconnect.mysql`'s TLS-strict one (no clear-text fallback, no clear-text
password without TLS, no LOAD DATA LOCAL, no option file); this module is what the test does with
it and how it reports what went wrong.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pymysql
import structlog

from broker.dbconnect import Server, resolve_server
from broker.dbconnect.mysql import (
    ACCESS_DENIED,
    ACCESS_DENIED_NO_PASSWORD,
    CANNOT_CONNECT,
    DB_ACCESS_DENIED,
    HOST_NOT_ALLOWED,
    UNKNOWN_DATABASE,
    CleartextRefused,
    TlsNotOffered,
    connect,
    error_code,
    strict_connection,
)
from broker.egress import EgressPolicy
from broker.model import TestCategory, TestResult, TestStage
from broker.testers._db_common import (
    cleartext_refused,
    success_notes,
    tls_context,
    tls_not_offered,
    transport_failure,
)
from broker.testers.base import Target, TestFailure, passed

log = structlog.get_logger("broker.testers.database")

# Options passed to the driver; anything else in `options` is reported as ignored.
_SUPPORTED_OPTIONS = ("charset",)


async def test_mysql(target: Target, egress: EgressPolicy) -> TestResult:
    """Connect to MySQL / MariaDB through the egress policy, authenticate and run `SELECT 1`."""
    server = await resolve_server(target, egress, "mysql")
    timeout = egress.settings.connect_timeout
    ignored = sorted(k for k in server.options if k not in _SUPPORTED_OPTIONS)
    extra = {"ignored_options": ",".join(ignored)} if ignored else {}
    conn = strict_connection(
        server,
        tls_context(server) if server.ssl else None,
        timeout,
        charset=server.options.get("charset", "utf8mb4"),
    )
    try:
        await connect(conn)
    except Exception as exc:
        conn.close()
        failure = _classify(exc, server, timeout)
        log.info("database_test_failed", driver="mysql", category=failure.result.category)
        raise failure from None
    try:
        async with asyncio.timeout(timeout), conn.cursor() as cursor:
            await cursor.execute("SELECT 1")
            row = await cursor.fetchone()
        version = _version(str(conn.get_server_info()))
    except pymysql.MySQLError as exc:
        raise TestFailure(
            TestCategory.UNEXPECTED_RESPONSE,
            TestStage.SAMPLE_OPERATION,
            f"connected, but SELECT 1 failed (error {error_code(exc)})",
            server.details(mysql_error=str(error_code(exc))),
        ) from None
    except TimeoutError:
        raise TestFailure(
            TestCategory.TIMEOUT,
            TestStage.SAMPLE_OPERATION,
            f"connected, but SELECT 1 did not answer within {timeout:g} s",
            server.details(),
        ) from None
    finally:
        await _close(conn)
    if not row or row[0] != 1:
        raise TestFailure(
            TestCategory.UNEXPECTED_RESPONSE,
            TestStage.SAMPLE_OPERATION,
            "connected, but SELECT 1 did not return 1",
            server.details(),
        )
    verified, not_verified = success_notes(server, f"login as {server.username}")
    return passed(
        f"connected to {_product(version)} {version.split('-')[0]} as {server.username} and ran SELECT 1",
        details=server.details(server_version=version, **extra),
        verified=verified,
        not_verified=not_verified,
    )


async def _close(conn: Any) -> None:
    """Say goodbye (COM_QUIT) if the server listens; always release the socket."""
    try:
        async with asyncio.timeout(2):
            await conn.ensure_closed()
    except Exception:
        conn.close()


def _version(reported: str) -> str:
    """The server's version; MariaDB prefixes it with "5.5.5-" for old clients' sake."""
    return reported.removeprefix("5.5.5-") if "mariadb" in reported.lower() else reported


def _product(version: str) -> str:
    return "MariaDB" if "mariadb" in version.lower() else "MySQL"


def _classify(exc: Exception, server: Server, timeout: float) -> TestFailure:
    """A connect-time error as a test failure, in our words plus the MySQL error number."""
    if isinstance(exc, TlsNotOffered):
        return tls_not_offered(server)
    if isinstance(exc, CleartextRefused):
        return cleartext_refused(server)
    # aiomysql wraps TCP and TLS failures in error 2003; the cause says what happened.
    cause = exc.__cause__ if error_code(exc) == CANNOT_CONNECT and exc.__cause__ is not None else exc
    failure = transport_failure(cause, server, timeout)
    if failure is not None:
        return failure
    if isinstance(exc, pymysql.MySQLError) and error_code(exc):
        return _server_error(exc, server)
    # Without an error number the driver itself gave up on what it read (bad packet, early EOF).
    if isinstance(exc, pymysql.MySQLError | ConnectionError | asyncio.IncompleteReadError):
        return TestFailure(
            TestCategory.PROTOCOL_ERROR,
            TestStage.CONNECT,
            f"{server.host}:{server.port} did not speak the MySQL protocol as expected",
            server.details(error_type=type(exc).__name__),
            verified=("address allowed by egress policy", "tcp connect"),
        )
    raise exc


def _server_error(exc: BaseException, server: Server) -> TestFailure:
    """An error the server sent during the handshake, by error number."""
    code = error_code(exc)
    details = server.details(mysql_error=str(code))
    reached = ("address allowed by egress policy", "tcp connect") + (("tls",) if server.ssl else ())
    if code in (ACCESS_DENIED, ACCESS_DENIED_NO_PASSWORD):
        return TestFailure(
            TestCategory.AUTH_FAILED,
            TestStage.AUTHENTICATE,
            f"the server rejected the login for user {server.username} (error {code})",
            details,
            verified=reached,
            not_verified=("credentials",),
        )
    if code == UNKNOWN_DATABASE:
        return TestFailure(
            TestCategory.NOT_FOUND,
            TestStage.AUTHENTICATE,
            f"database {server.database} does not exist on {server.host} (error {code})",
            details,
            verified=reached,
        )
    if code in (DB_ACCESS_DENIED, HOST_NOT_ALLOWED):
        # For 1044 MariaDB does not say whether the database exists, so neither can we.
        what = (
            f"database {server.database} (or it does not exist)"
            if code == DB_ACCESS_DENIED
            else "this server from the broker's address"
        )
        return TestFailure(
            TestCategory.PERMISSION_DENIED,
            TestStage.AUTHENTICATE,
            f"user {server.username} may not access {what} (error {code})",
            details,
            verified=reached,
        )
    return TestFailure(
        TestCategory.UNEXPECTED_RESPONSE,
        TestStage.AUTHENTICATE,
        f"the server refused the session (error {code})",
        server.details(mysql_error=str(code), server_message=str(exc)),
        verified=reached,
    )
