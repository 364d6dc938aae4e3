"""The `database` connection tester: PostgreSQL, MySQL/MariaDB, SQLite; SQL Server is unsupported.

Network engines connect to the address the egress policy checked, never to a host name the
driver would resolve itself, and TLS verifies the certificate for the host name the user typed.
Each engine lives in its own module (`_db_postgres`, `_db_mysql`, `_db_sqlite`); this one picks.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.egress import EgressPolicy
from broker.model import TestCategory, TestResult, TestStage
from broker.testers._db_mysql import test_mysql
from broker.testers._db_postgres import test_postgresql
from broker.testers._db_sqlite import test_sqlite
from broker.testers.base import Target, Tester, TestFailure

__all__ = ["make_database_tester", "test_database"]


def make_database_tester(sqlite_roots: Sequence[str] | None = None) -> Tester:
    """A database tester; with `sqlite_roots`, sqlite files outside those directories are refused."""
    roots = tuple(sqlite_roots) if sqlite_roots is not None else None

    async def tester(target: Target, egress: EgressPolicy) -> TestResult:
        driver = str(target.config.get("driver", "")).lower()
        if driver == "postgresql":
            return await test_postgresql(target, egress)
        if driver in ("mysql", "mariadb"):
            return await test_mysql(target, egress)
        if driver == "sqlite":
            return await test_sqlite(target, roots, egress.settings.connect_timeout)
        if driver == "mssql":
            raise TestFailure(
                TestCategory.UNSUPPORTED,
                TestStage.CONNECT,
                "unsupported: no SQL Server driver is installed",
                {"driver": "mssql"},
                not_verified=("reachability", "credentials"),
            )
        raise TestFailure(
            TestCategory.INVALID_CONFIG, TestStage.CONNECT, f"unknown database driver {driver!r}"
        )

    tester.__doc__ = "Test a database connection: connect, authenticate and run SELECT 1."
    return tester


async def test_database(target: Target, egress: EgressPolicy) -> TestResult:
    """Test a database connection (sqlite files anywhere on the broker host, read-only)."""
    return await _DEFAULT(target, egress)


_DEFAULT = make_database_tester()
