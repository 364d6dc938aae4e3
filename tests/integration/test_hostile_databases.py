"""Hostile database servers (`tests/hostile_db_servers.py`) against the connection tester and the
lease service's administrative session: over a connection without TLS, neither ever hands the
stored password to a server that asks for it in a form the server can read (in clear, or under
an RSA key of its own), and what the admin sees is our words and a reason token, bounded.
"""

from __future__ import annotations

import asyncio
import glob
import os
import tempfile
from typing import Any

import asyncpg
import pytest

from broker import catalog
from broker.dbconnect import Server
from broker.dbconnect.postgres import connect as pg_connect
from broker.dbusers import LeaseDbError, UserAdmin
from broker.egress import EgressPolicy, EgressSettings
from broker.model import TestCategory
from broker.sensitive import SecretFields
from broker.testers import Target, run_tester
from broker.testers import database as db
from tests.hostile_db_servers import FakeMysql, FakePostgres

pytestmark = pytest.mark.integration

PASSWORD = "stored-Admin-pw-4f2a9c"


def egress(timeout: float = 3.0) -> EgressPolicy:
    return EgressPolicy(
        EgressSettings(allow_loopback=True, connect_timeout=timeout, total_timeout=timeout + 2)
    )


def config(driver: str, port: int, **more: Any) -> dict[str, Any]:
    return {
        "driver": driver, "host": "127.0.0.1", "port": port, "database": "app",
        "username": "admin", "ssl": False, **more,
    }  # fmt: skip


def target_for_tester(driver: str, port: int) -> Target:
    valid = catalog.validate("database", "", config(driver, port), {"password": PASSWORD})
    return Target(valid.type, valid.provider, valid.config, SecretFields(valid.secrets))


def lease_target(driver: str, port: int) -> Target:
    return Target("database", "", config(driver, port, dynamic=True), SecretFields({"password": PASSWORD}))


@pytest.mark.parametrize(
    "plugin",
    ["caching_sha2_password", "sha256_password", "mysql_clear_password", "dialog", "mysql_old_password"],
)
async def test_mysql_a_server_asking_for_a_readable_password_without_tls_never_gets_it(plugin: str) -> None:
    fake = FakeMysql(plugin)
    async with fake.running():
        result = await run_tester(db.test_database, target_for_tester("mysql", fake.port), egress())
        with pytest.raises(LeaseDbError) as raised:
            await UserAdmin.open(lease_target("mysql", fake.port), egress(), timeout=3)
    assert fake.recovered == b""
    assert PASSWORD.encode() not in fake.received
    assert result.category is TestCategory.AUTH_FAILED, result
    assert PASSWORD not in str(result)
    assert raised.value.reason in ("tls", "connect_failed"), raised.value


async def test_postgresql_a_server_asking_for_the_password_in_clear_without_tls_never_gets_it() -> None:
    fake = FakePostgres("cleartext")
    async with fake.running():
        result = await run_tester(db.test_database, target_for_tester("postgresql", fake.port), egress())
        with pytest.raises(LeaseDbError) as raised:
            await UserAdmin.open(lease_target("postgresql", fake.port), egress(), timeout=3)
    assert PASSWORD.encode() not in fake.received
    assert result.category is TestCategory.AUTH_FAILED, result
    assert "clear text" in result.message and PASSWORD not in str(result)
    assert raised.value.reason == "tls", raised.value


async def test_postgresql_md5_without_tls_is_answered_with_the_salted_digest_only() -> None:
    """A decision: MD5 is what many servers still ask for, and it sends a digest salted by the
    server (as mysql_native_password does), never the password; it is not refused."""
    fake = FakePostgres("md5")
    async with fake.running():
        result = await run_tester(db.test_database, target_for_tester("postgresql", fake.port), egress())
    assert PASSWORD.encode() not in fake.received and b"md5" in fake.received
    assert result.category is TestCategory.AUTH_FAILED, result


@pytest.mark.parametrize("behaviour", ["silent", "huge_error"])
async def test_postgresql_a_server_that_never_finishes_answering_is_a_bounded_timeout(behaviour: str) -> None:
    fake = FakePostgres(behaviour, huge=1 << 30)
    async with fake.running():
        started = asyncio.get_running_loop().time()
        result = await run_tester(db.test_database, target_for_tester("postgresql", fake.port), egress(1.0))
        with pytest.raises(LeaseDbError) as raised:
            await UserAdmin.open(lease_target("postgresql", fake.port), egress(1.0), timeout=1)
        took = asyncio.get_running_loop().time() - started
    assert took < 8
    assert result.category is TestCategory.TIMEOUT, result
    assert "xxxx" not in str(result) and len(str(result)) < 4000
    assert raised.value.reason == "timeout", raised.value


async def test_postgresql_without_tls_a_cut_off_statement_is_still_cancelled_on_the_server() -> None:
    """The guard relays asyncpg's cancel request (a connection of its own) too, for as long as the
    connection lives, and leaves nothing in the temporary directory once it is closed."""
    dsn = os.environ.get("BROKER_TEST_POSTGRES_DSN", "")
    if not dsn:
        pytest.skip("BROKER_TEST_POSTGRES_DSN is not set; CI sets it")
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "broker-pg-*")))
    server = Server(
        "postgresql", "127.0.0.1", 5432, "postgres", "postgres", "", False, None, address="127.0.0.1"
    )
    conn = await pg_connect(server, None, 3, statement_cache_size=0)
    marker = f"SELECT pg_sleep(30) -- {os.getpid()}"
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await conn.fetch(marker)
        await asyncio.sleep(0.3)
        watcher = await asyncpg.connect(dsn)
        try:
            states = await watcher.fetch("SELECT state FROM pg_stat_activity WHERE query = $1", marker)
        finally:
            await watcher.close()
        assert [row["state"] for row in states] == ["idle"]  # the session's last query, cancelled
        assert await conn.fetchval("SELECT 41 + 1") == 42
    finally:
        await conn.close()
    await asyncio.sleep(0.1)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "broker-pg-*"))) <= before


async def test_postgresql_an_error_code_that_is_no_sqlstate_never_reaches_the_caller() -> None:
    """A lease's error carries the server's SQLSTATE (it goes into the executor's UNAVAILABLE): a
    server's 5000 characters in its place are not a code, and are not repeated."""
    fake = FakePostgres("odd_error")
    async with fake.running():
        with pytest.raises(LeaseDbError) as raised:
            await UserAdmin.open(lease_target("postgresql", fake.port), egress(), timeout=3)
    assert raised.value.reason == "connect_failed"
    assert raised.value.code == "unrecognised"
    assert len(str(raised.value)) < 40
