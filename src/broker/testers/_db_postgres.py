"""PostgreSQL with asyncpg: connect to the checked IP, authenticate, `SELECT 1`, close.

The connection is `broker.dbconnect.postgres`'s, every setting explicit so asyncpg never reads the
broker host's PG* environment, ~/.pgpass or client certificates; this module is what the test does
with it and how it reports what went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import structlog

from broker.dbconnect import CleartextRefused, Server, resolve_server
from broker.dbconnect.postgres import connect
from broker.egress import EgressPolicy
from broker.model import TestCategory, TestResult, TestStage
from broker.testers._db_common import cleartext_refused, success_notes, tls_context, transport_failure
from broker.testers._db_common import tls_not_offered as _tls_not_offered
from broker.testers.base import Target, TestFailure, passed

log = structlog.get_logger("broker.testers.database")

_AUTH_STATES = {"28P01", "28000"}
_CONFIG_STATES = {"42704", "22023", "42602"}  # unknown setting, bad value, bad name (from `options`)


async def test_postgresql(target: Target, egress: EgressPolicy) -> TestResult:
    """Connect to PostgreSQL through the egress policy, authenticate and run `SELECT 1`."""
    server = await resolve_server(target, egress, "postgresql")
    timeout = egress.settings.connect_timeout
    try:
        conn = await connect(server, tls_context(server) if server.ssl else None, timeout)
    except TestFailure:
        raise
    except Exception as exc:
        failure = _classify(exc, server, timeout)
        log.info("database_test_failed", driver="postgresql", category=failure.result.category)
        raise failure from None
    try:
        async with asyncio.timeout(timeout):
            value = await conn.fetchval("SELECT 1")
        version = str(conn.get_settings().server_version)
    except asyncpg.PostgresError as exc:
        raise TestFailure(
            TestCategory.UNEXPECTED_RESPONSE,
            TestStage.SAMPLE_OPERATION,
            f"connected, but SELECT 1 failed (SQLSTATE {exc.sqlstate})",
            server.details(sqlstate=str(exc.sqlstate)),
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
    if value != 1:
        raise TestFailure(
            TestCategory.UNEXPECTED_RESPONSE,
            TestStage.SAMPLE_OPERATION,
            "connected, but SELECT 1 did not return 1",
            server.details(),
        )
    verified, not_verified = success_notes(server, f"login as {server.username}")
    return passed(
        f"connected to PostgreSQL {version.split()[0]} as {server.username} and ran SELECT 1",
        details=server.details(server_version=version),
        verified=verified,
        not_verified=not_verified,
    )


async def _close(conn: Any) -> None:
    """Close politely; if the server does not answer, drop the socket."""
    try:
        await conn.close(timeout=2)
    except Exception:
        with contextlib.suppress(Exception):
            conn.terminate()


def _classify(exc: Exception, server: Server, timeout: float) -> TestFailure:
    """A connect-time error as a test failure, in our words (driver text only in details)."""
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, asyncpg.PostgresConnectionError):
        return _server_error(exc, server)
    if isinstance(exc, CleartextRefused):
        return cleartext_refused(server)
    # asyncpg reports a refused or failed SSLRequest as a bare ConnectionError.
    if server.ssl and type(exc) is ConnectionError:
        return _tls_not_offered(server)
    failure = transport_failure(exc, server, timeout)
    if failure is not None:
        return failure
    if isinstance(exc, asyncpg.InterfaceError):
        # Client-side configuration errors; their text may quote settings, so it goes to details,
        # which the runner scrubs of secrets.
        return TestFailure(
            TestCategory.INVALID_CONFIG,
            TestStage.CONNECT,
            "the PostgreSQL driver rejected the connection settings",
            server.details(error_type=type(exc).__name__, driver_error=str(exc)),
        )
    # Class 08 (mostly raised by asyncpg itself: the peer closed or broke the protocol).
    if isinstance(
        exc, asyncpg.PostgresConnectionError | asyncpg.exceptions.InternalClientError | ConnectionError
    ):
        return TestFailure(
            TestCategory.PROTOCOL_ERROR,
            TestStage.CONNECT,
            f"{server.host}:{server.port} did not speak the PostgreSQL protocol as expected",
            server.details(error_type=type(exc).__name__),
            verified=("address allowed by egress policy", "tcp connect"),
        )
    raise exc


def _server_error(exc: Any, server: Server) -> TestFailure:
    """An error the PostgreSQL server sent during startup, by SQLSTATE."""
    state = str(exc.sqlstate)
    details = server.details(sqlstate=state)
    reached = ("address allowed by egress policy", "tcp connect") + (("tls",) if server.ssl else ())
    if state in _AUTH_STATES:
        return TestFailure(
            TestCategory.AUTH_FAILED,
            TestStage.AUTHENTICATE,
            f"PostgreSQL rejected the login for user {server.username} (SQLSTATE {state})",
            details,
            verified=reached,
            not_verified=("credentials",),
        )
    if state == "3D000":
        return TestFailure(
            TestCategory.NOT_FOUND,
            TestStage.AUTHENTICATE,
            f"database {server.database} does not exist on {server.host}",
            details,
            verified=reached,
        )
    if state == "42501":
        return TestFailure(
            TestCategory.PERMISSION_DENIED,
            TestStage.AUTHENTICATE,
            f"user {server.username} may not connect to database {server.database} (SQLSTATE {state})",
            details,
            verified=reached,
        )
    if state in _CONFIG_STATES:
        return TestFailure(
            TestCategory.INVALID_CONFIG,
            TestStage.AUTHENTICATE,
            f"PostgreSQL rejected a connection option (SQLSTATE {state})",
            server.details(sqlstate=state, server_message=str(exc)),
            verified=reached,
        )
    return TestFailure(
        TestCategory.UNEXPECTED_RESPONSE,
        TestStage.AUTHENTICATE,
        f"PostgreSQL refused the session (SQLSTATE {state})",
        server.details(sqlstate=state, server_message=str(exc)),
        verified=reached,
    )
