"""The database tester against real servers on loopback: the shared PostgreSQL and MariaDB
(found through BROKER_TEST_POSTGRES_DSN / BROKER_TEST_MYSQL_DSN), a throwaway PostgreSQL
cluster with password authentication and TLS, and SQLite files.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import sqlite3
import urllib.parse
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomysql  # type: ignore[import-untyped]
import asyncpg  # type: ignore[import-untyped]
import pytest

from broker import catalog
from broker import log as broker_log
from broker.egress import EgressPolicy, EgressSettings
from broker.model import TestCategory, TestResult, TestStage
from broker.sensitive import SecretFields
from broker.testers import Target, run_tester
from broker.testers import database as db
from tests.helpers import free_port
from tests.pg_cluster import Cluster, throwaway_cluster

PG_DSN = os.environ.get("BROKER_TEST_POSTGRES_DSN", "")
MY_DSN = os.environ.get("BROKER_TEST_MYSQL_DSN", "")
needs_pg = pytest.mark.skipif(
    not PG_DSN, reason="BROKER_TEST_POSTGRES_DSN unset (e.g. postgresql://postgres@127.0.0.1:5432/test)"
)
needs_my = pytest.mark.skipif(
    not MY_DSN, reason="BROKER_TEST_MYSQL_DSN unset (e.g. mysql://root@127.0.0.1:3306/test)"
)

# Host names the test resolver maps to loopback; the throwaway cluster's certificate names TLS_HOST.
TLS_HOST = "db.broker.test"
OTHER_HOST = "other.broker.test"
APP_PASSWORD = "app-Pw/with:odd@chars!"
MY_USER, MY_NOPRIVS, MY_PRIVATE_DB = "broker_dbtest", "broker_dbtest_noprivs", "broker_dbtest_private"


async def _resolver(host: str, port: int) -> Sequence[str]:
    if host in (TLS_HOST, OTHER_HOST):
        return ["127.0.0.1"]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(i[4][0]) for i in infos]


def policy(
    allow_loopback: bool = True, connect_timeout: float = 3.0, total_timeout: float = 10.0
) -> EgressPolicy:
    settings = EgressSettings(
        allow_loopback=allow_loopback, connect_timeout=connect_timeout, total_timeout=total_timeout
    )
    return EgressPolicy(settings, resolver=_resolver)


def target(password: str | None = None, **config: Any) -> Target:
    """A draft database connection as the catalog cleans it (defaults applied)."""
    secrets = {"password": password} if password is not None else {}
    valid = catalog.validate("database", "", config, secrets)
    return Target(valid.type, valid.provider, valid.config, SecretFields(valid.secrets))


async def run(t: Target, egress: EgressPolicy | None = None) -> TestResult:
    return await run_tester(db.test_database, t, egress or policy())


@dataclass(frozen=True)
class Dsn:
    host: str
    port: int
    user: str
    password: str
    database: str


def parse_dsn(dsn: str, default_port: int) -> Dsn:
    parts = urllib.parse.urlsplit(dsn)
    return Dsn(
        parts.hostname or "127.0.0.1",
        parts.port or default_port,
        urllib.parse.unquote(parts.username or ""),
        urllib.parse.unquote(parts.password or ""),
        parts.path.lstrip("/") or "test",
    )


def pg_config(dsn: Dsn, **overrides: Any) -> dict[str, Any]:
    return {
        "driver": "postgresql",
        "host": dsn.host,
        "port": dsn.port,
        "database": dsn.database,
        "username": dsn.user,
        "ssl": False,
        **overrides,
    }


def my_config(dsn: Dsn, **overrides: Any) -> dict[str, Any]:
    return {**pg_config(dsn), "driver": "mysql", **overrides}


def assert_failed(result: TestResult, category: TestCategory, stage: TestStage) -> None:
    assert not result.success, result
    assert (result.category, result.stage) == (category, stage), result


# --- throwaway PostgreSQL cluster: password auth (scram) and TLS ---------------------------------


async def _pg_setup(port: int, superuser_password: str) -> None:
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=superuser_password,
        database="postgres",
        ssl=False,
    )
    try:
        for role in ("broker_app", "broker_tls"):
            await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{APP_PASSWORD}'")
        await conn.execute("CREATE DATABASE app_private")
        await conn.execute("REVOKE CONNECT ON DATABASE app_private FROM PUBLIC")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster of our own (tests/pg_cluster.py): scram-sha-256 for every login, TLS
    with a certificate for TLS_HOST, and role broker_tls allowed only over TLS."""
    tls_only = "hostssl all broker_tls 127.0.0.1/32 scram-sha-256\nhost all broker_tls 0.0.0.0/0 reject\n"
    with throwaway_cluster([TLS_HOST], hba_first=tls_only) as cluster:
        asyncio.run(_pg_setup(cluster.port, cluster.superuser_password))
        yield cluster


def cluster_config(cluster: Cluster, **overrides: Any) -> dict[str, Any]:
    return {
        "driver": "postgresql",
        "host": "127.0.0.1",
        "port": cluster.port,
        "database": "postgres",
        "username": "broker_app",
        "ssl": False,
        **overrides,
    }


# --- MariaDB users -----------------------------------------------------------------------------


async def _my_setup(dsn: Dsn) -> str:
    conn = await aiomysql.connect(
        host=dsn.host, port=dsn.port, user=dsn.user, password=dsn.password, db=dsn.database
    )
    try:
        async with conn.cursor() as cur:
            # Idempotent and never dropped: parallel runs on the shared server must not race.
            for user in (MY_USER, MY_NOPRIVS):
                await cur.execute(
                    f"CREATE USER IF NOT EXISTS '{user}'@'%%' IDENTIFIED BY %s", (APP_PASSWORD,)
                )
                await cur.execute(f"ALTER USER '{user}'@'%%' IDENTIFIED BY %s", (APP_PASSWORD,))
            await cur.execute(f"GRANT ALL PRIVILEGES ON `{dsn.database}`.* TO '{MY_USER}'@'%'")
            await cur.execute(f"CREATE DATABASE IF NOT EXISTS `{MY_PRIVATE_DB}`")
            await cur.execute("SELECT @@have_ssl")
            row = await cur.fetchone()
        return str(row[0])
    finally:
        conn.close()


@pytest.fixture(scope="session")
def mysql_users() -> str:
    """Users broker_dbtest (all on the DSN's database) and broker_dbtest_noprivs (nothing) on the
    shared MariaDB; returns the server's @@have_ssl."""
    if not MY_DSN:
        pytest.skip("BROKER_TEST_MYSQL_DSN unset")
    with warnings.catch_warnings():
        # "IF NOT EXISTS" on a second run makes the server send a note, which aiomysql turns
        # into a Python warning (an error under filterwarnings=error).
        warnings.simplefilter("ignore", aiomysql.Warning)
        return asyncio.run(_my_setup(parse_dsn(MY_DSN, 3306)))


# --- PostgreSQL --------------------------------------------------------------------------------


@needs_pg
async def test_postgresql_success_reports_server_version() -> None:
    dsn = parse_dsn(PG_DSN, 5432)
    result = await run(target(dsn.password or None, **pg_config(dsn)))
    assert result.success, result
    assert result.stage is TestStage.SAMPLE_OPERATION
    assert result.details["server_version"][0].isdigit()
    assert result.details["address"] == "127.0.0.1"
    assert "SELECT 1" in result.verified
    # The shared server trusts local logins: we must not claim the password was checked.
    assert any("checked the password" in item for item in result.not_verified)


@needs_pg
async def test_postgresql_unknown_database_is_not_found() -> None:
    dsn = parse_dsn(PG_DSN, 5432)
    result = await run(target(dsn.password or None, **pg_config(dsn, database="broker_no_such_db")))
    assert_failed(result, TestCategory.NOT_FOUND, TestStage.AUTHENTICATE)
    assert result.details["sqlstate"] == "3D000"


async def test_postgresql_closed_port_is_connection_refused() -> None:
    result = await run(
        target("x" * 8, **pg_config(parse_dsn("postgresql://u@127.0.0.1/d", 5432), port=free_port()))
    )
    assert_failed(result, TestCategory.CONNECTION_REFUSED, TestStage.CONNECT)


@needs_pg
async def test_postgresql_ssl_against_shared_server() -> None:
    """The shared server has ssl off (or, if on, a certificate no public CA signed): either way TLS
    cannot be established and verified, and the tester must say so rather than fall back."""
    dsn = parse_dsn(PG_DSN, 5432)
    conn = await asyncpg.connect(
        host=dsn.host, port=dsn.port, user=dsn.user, password=dsn.password, database=dsn.database, ssl=False
    )
    try:
        ssl_on = await conn.fetchval("SHOW ssl")
    finally:
        await conn.close()
    result = await run(target(dsn.password or None, **pg_config(dsn, ssl=True)))
    assert_failed(result, TestCategory.TLS_ERROR, TestStage.TLS)
    if ssl_on == "off":
        assert "does not offer TLS" in result.message


async def test_postgresql_wrong_password_is_auth_failed(pg_cluster: Cluster) -> None:
    result = await run(target("not-the-password", **cluster_config(pg_cluster)))
    assert_failed(result, TestCategory.AUTH_FAILED, TestStage.AUTHENTICATE)
    assert result.details["sqlstate"] == "28P01"
    assert "credentials" in result.not_verified


async def test_postgresql_missing_password_never_uses_the_broker_environment(
    pg_cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No password must not make the driver fall back to the broker host's PGPASSWORD or pgpass:
    both hold the right password here, so a fallback would make the test pass."""
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:*:{APP_PASSWORD}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSWORD", APP_PASSWORD)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    result = await run(target(None, **cluster_config(pg_cluster)))
    assert not result.success and result.category is TestCategory.AUTH_FAILED, result


async def test_postgresql_right_password_passes(pg_cluster: Cluster) -> None:
    result = await run(target(APP_PASSWORD, **cluster_config(pg_cluster)))
    assert result.success, result
    assert result.details["server_version"][0].isdigit()


async def test_postgresql_without_connect_privilege_is_permission_denied(pg_cluster: Cluster) -> None:
    result = await run(target(APP_PASSWORD, **cluster_config(pg_cluster, database="app_private")))
    assert_failed(result, TestCategory.PERMISSION_DENIED, TestStage.AUTHENTICATE)
    assert result.details["sqlstate"] == "42501"


@pytest.mark.parametrize("ca", ["pem", "path"])
async def test_postgresql_tls_verifies_the_typed_host_name(pg_cluster: Cluster, ca: str) -> None:
    """The socket goes to 127.0.0.1, the certificate is checked for TLS_HOST; broker_tls may log
    in only over TLS (pg_hba), so success proves TLS was really used."""
    ssl_ca = pg_cluster.ca_pem if ca == "pem" else pg_cluster.ca_path
    config = cluster_config(pg_cluster, host=TLS_HOST, username="broker_tls", ssl=True, ssl_ca=ssl_ca)
    result = await run(target(APP_PASSWORD, **config))
    assert result.success, result
    assert f"tls, certificate valid for {TLS_HOST}" in result.verified
    plain = await run(target(APP_PASSWORD, **{**config, "ssl": False}))
    assert_failed(plain, TestCategory.AUTH_FAILED, TestStage.AUTHENTICATE)  # pg_hba rejects it


async def test_postgresql_certificate_for_another_name_is_tls_error(pg_cluster: Cluster) -> None:
    config = cluster_config(pg_cluster, host=OTHER_HOST, ssl=True, ssl_ca=pg_cluster.ca_pem)
    result = await run(target(APP_PASSWORD, **config))
    assert_failed(result, TestCategory.TLS_ERROR, TestStage.TLS)
    assert "not valid for other.broker.test" in result.message


async def test_postgresql_unknown_ca_is_tls_error(pg_cluster: Cluster) -> None:
    result = await run(target(APP_PASSWORD, **cluster_config(pg_cluster, host=TLS_HOST, ssl=True)))
    assert_failed(result, TestCategory.TLS_ERROR, TestStage.TLS)


# --- MySQL / MariaDB ---------------------------------------------------------------------------


@needs_my
async def test_mysql_success_reports_server_version(mysql_users: str) -> None:
    dsn = parse_dsn(MY_DSN, 3306)
    result = await run(target(APP_PASSWORD, **my_config(dsn, username=MY_USER)))
    assert result.success, result
    assert result.details["server_version"][0].isdigit()
    assert not result.details["server_version"].startswith("5.5.5-")
    assert "SELECT 1" in result.verified


@needs_my
async def test_mysql_wrong_password_is_auth_failed(mysql_users: str) -> None:
    dsn = parse_dsn(MY_DSN, 3306)
    result = await run(target("not-the-password", **my_config(dsn, username=MY_USER)))
    assert_failed(result, TestCategory.AUTH_FAILED, TestStage.AUTHENTICATE)
    assert result.details["mysql_error"] == "1045"


@needs_my
async def test_mysql_unknown_database_is_not_found(mysql_users: str) -> None:
    dsn = parse_dsn(MY_DSN, 3306)
    result = await run(target(APP_PASSWORD, **my_config(dsn, username=MY_USER, database="broker_no_such_db")))
    # MariaDB does not tell a user without rights on that name whether it exists: 1044, not 1049.
    assert_failed(result, TestCategory.PERMISSION_DENIED, TestStage.AUTHENTICATE)
    assert result.details["mysql_error"] == "1044"
    root = await run(target(dsn.password or None, **my_config(dsn, database="broker_no_such_db")))
    assert_failed(root, TestCategory.NOT_FOUND, TestStage.AUTHENTICATE)
    assert root.details["mysql_error"] == "1049"


@needs_my
async def test_mysql_user_without_privileges_is_permission_denied(mysql_users: str) -> None:
    dsn = parse_dsn(MY_DSN, 3306)
    result = await run(target(APP_PASSWORD, **my_config(dsn, username=MY_NOPRIVS, database=MY_PRIVATE_DB)))
    assert_failed(result, TestCategory.PERMISSION_DENIED, TestStage.AUTHENTICATE)
    assert result.details["mysql_error"] == "1044"


async def test_mysql_closed_port_is_connection_refused() -> None:
    config = my_config(parse_dsn("mysql://u@127.0.0.1/d", 3306), port=free_port())
    result = await run(target("x" * 8, **config))
    assert_failed(result, TestCategory.CONNECTION_REFUSED, TestStage.CONNECT)


@needs_my
async def test_mysql_ssl_against_shared_server_never_falls_back(mysql_users: str) -> None:
    """aiomysql alone would continue in clear text when the server lacks TLS; the tester refuses.
    With TLS enabled the server's certificate is not trusted by the system store: tls_error too."""
    dsn = parse_dsn(MY_DSN, 3306)
    result = await run(target(APP_PASSWORD, **my_config(dsn, username=MY_USER, ssl=True)))
    assert_failed(result, TestCategory.TLS_ERROR, TestStage.TLS)
    if mysql_users.upper() in ("DISABLED", "NO"):
        assert "does not offer TLS" in result.message


# --- timeouts and the egress policy ------------------------------------------------------------


@pytest.mark.parametrize("driver", ["postgresql", "mysql"])
async def test_silent_server_is_timeout(driver: str) -> None:
    """A listener that never accepts: the TCP handshake completes in the backlog, nothing answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        config = {**pg_config(parse_dsn("x://u@127.0.0.1/d", 1)), "driver": driver}
        config["port"] = listener.getsockname()[1]
        result = await run(target("x" * 8, **config), policy(connect_timeout=0.5, total_timeout=5))
    assert_failed(result, TestCategory.TIMEOUT, TestStage.CONNECT)


@pytest.mark.parametrize("driver", ["postgresql", "mysql"])
@pytest.mark.parametrize("host", ["127.0.0.1", TLS_HOST, "169.254.169.254"])
async def test_blocked_host_is_refused_without_connecting(driver: str, host: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        config = {**pg_config(parse_dsn("x://u@h/d", 1)), "driver": driver, "host": host}
        config["port"] = listener.getsockname()[1]
        result = await run(target("x" * 8, **config), policy(allow_loopback=False))
        assert_failed(result, TestCategory.BLOCKED_BY_POLICY, TestStage.RESOLVE_ADDRESS)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected


# --- sqlite and mssql --------------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_sqlite_success_and_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    conn.close()
    before, mtime = _digest(path), path.stat().st_mtime_ns
    result = await run(target(None, driver="sqlite", database=str(path)))
    assert result.success, result
    assert result.details["schema_version"] == "1"
    assert "that executors can reach this file on their own hosts" in result.not_verified
    assert (_digest(path), path.stat().st_mtime_ns) == (before, mtime)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


async def test_sqlite_missing_file_is_not_found_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    result = await run(target(None, driver="sqlite", database=str(path)))
    assert_failed(result, TestCategory.NOT_FOUND, TestStage.CONNECT)
    assert list(tmp_path.iterdir()) == []


async def test_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database, just text that is long enough to have a header " * 4)
    result = await run(target(None, driver="sqlite", database=str(path)))
    assert_failed(result, TestCategory.UNEXPECTED_RESPONSE, TestStage.SAMPLE_OPERATION)
    assert result.details["sqlite_error"] == "SQLITE_NOTADB"


async def test_sqlite_relative_path_and_directory_are_invalid_config(tmp_path: Path) -> None:
    relative = await run(target(None, driver="sqlite", database="app.db"))
    assert_failed(relative, TestCategory.INVALID_CONFIG, TestStage.CONNECT)
    directory = await run(target(None, driver="sqlite", database=str(tmp_path)))
    assert_failed(directory, TestCategory.INVALID_CONFIG, TestStage.CONNECT)


async def test_sqlite_roots_confine_paths_even_through_symlinks(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    sqlite3.connect(outside / "x.db").close()
    (allowed / "link.db").symlink_to(outside / "x.db")
    sqlite3.connect(allowed / "ok.db").close()
    tester = db.make_database_tester(sqlite_roots=[str(allowed)])
    ok = await run_tester(tester, target(None, driver="sqlite", database=str(allowed / "ok.db")), policy())
    assert ok.success, ok
    for path in (outside / "x.db", allowed / "link.db"):
        result = await run_tester(tester, target(None, driver="sqlite", database=str(path)), policy())
        assert_failed(result, TestCategory.BLOCKED_BY_POLICY, TestStage.CONNECT)


async def test_mssql_is_unsupported() -> None:
    config = {"driver": "mssql", "host": "127.0.0.1", "database": "d", "username": "u"}
    result = await run(target("x" * 8, **config))
    assert not result.success
    assert result.category is TestCategory.UNSUPPORTED
    assert "no SQL Server driver is installed" in result.message


# --- secrets never leave in messages, details or logs ------------------------------------------


@needs_pg
async def test_password_typed_as_user_name_is_scrubbed_from_a_real_server_error() -> None:
    """A real echo: PostgreSQL names the unknown role, and the user pasted the password there."""
    dsn = parse_dsn(PG_DSN, 5432)
    secret = "pasted-Secret/42"
    result = await run(target(secret, **pg_config(dsn, username=secret)))
    assert_failed(result, TestCategory.AUTH_FAILED, TestStage.AUTHENTICATE)
    assert "[redacted]" in result.message
    assert secret not in result.message + repr(result.details)


@pytest.mark.parametrize(
    "make_error",
    [
        lambda msg: asyncpg.exceptions.ClientConfigurationError(msg),  # classified: text in details
        lambda msg: asyncpg.exceptions.InternalServerError(msg),  # server error: text in details
        lambda msg: RuntimeError(msg),  # unclassified: the runner formats it
    ],
)
async def test_driver_error_echoing_the_password_is_scrubbed(
    monkeypatch: pytest.MonkeyPatch, make_error: Any
) -> None:
    password = "s3cret pass/word@db:x"
    encoded = urllib.parse.quote(password, safe="")
    dsn_text = f"postgresql://app:{encoded}@db.example:5432/app password={password}"

    async def failing_connect(**kwargs: Any) -> None:
        assert kwargs["password"] == password
        raise make_error(f"cannot use dsn {dsn_text}")

    monkeypatch.setattr(asyncpg, "connect", failing_connect)
    logs = io.StringIO()
    broker_log.configure("debug", logs)
    result = await run(target(password, **pg_config(parse_dsn("x://app@127.0.0.1/app", 5432))))
    assert not result.success
    shown = result.message + "\n" + "\n".join(result.details.values())
    assert "[redacted]" in shown  # the echoed text did reach the caller, masked
    for form in (password, encoded, urllib.parse.quote_plus(password)):
        assert form not in shown
        assert form not in logs.getvalue()
    assert "database_test_failed" in logs.getvalue() or "tester_error" in logs.getvalue()


# --- configuration and protocol errors ---------------------------------------------------------


@needs_pg
async def test_postgresql_options_become_server_settings() -> None:
    dsn = parse_dsn(PG_DSN, 5432)
    good = await run(
        target(dsn.password or None, **pg_config(dsn, options={"application_name": "broker-test"}))
    )
    assert good.success, good
    bad = await run(target(dsn.password or None, **pg_config(dsn, options={"broker_no_such_setting": "1"})))
    assert_failed(bad, TestCategory.INVALID_CONFIG, TestStage.AUTHENTICATE)
    assert bad.details["sqlstate"] == "42704"


async def test_unreadable_ssl_ca_is_invalid_config(pg_cluster: Cluster, tmp_path: Path) -> None:
    garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    for ssl_ca, words in ((garbage, "not a readable PEM"), (str(tmp_path / "no.pem"), "does not exist")):
        config = cluster_config(pg_cluster, host=TLS_HOST, ssl=True, ssl_ca=ssl_ca)
        result = await run(target(APP_PASSWORD, **config))
        assert_failed(result, TestCategory.INVALID_CONFIG, TestStage.TLS)
        assert words in result.message


@pytest.mark.parametrize("driver", ["postgresql", "mysql"])
async def test_server_speaking_another_protocol_is_protocol_error(driver: str) -> None:
    async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http_server, "127.0.0.1", 0)
    async with server:
        config = {**pg_config(parse_dsn("x://u@127.0.0.1/d", 1)), "driver": driver}
        config["port"] = server.sockets[0].getsockname()[1]
        result = await run(target("x" * 8, **config), policy(connect_timeout=2, total_timeout=5))
    assert_failed(result, TestCategory.PROTOCOL_ERROR, TestStage.CONNECT)
