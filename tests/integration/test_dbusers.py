"""broker.dbusers against real servers: a throwaway PostgreSQL cluster that checks passwords
(scram; tests/pg_cluster.py, one per module), the shared MariaDB (root as the admin), and a
throwaway MariaDB (tests/mariadb_server.py) for what the shared one must not be given: a binary
log, a password validation plugin.

Everything created on the shared MariaDB carries a name unique to this run and is dropped at the
end, also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import traceback
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomysql  # type: ignore[import-untyped]
import asyncpg  # type: ignore[import-untyped]
import pymysql
import pytest

from broker.dbusers import LeaseDbError, UserAdmin, new_password, new_username, statements_for
from broker.dbusers._mysql import native_password_hash
from broker.egress import EgressPolicy, EgressSettings
from broker.sensitive import SecretFields
from broker.testers import Target
from tests.helpers import free_port
from tests.mariadb_server import throwaway_mariadb
from tests.pg_cluster import Cluster, throwaway_cluster

MY_DSN = os.environ.get("BROKER_TEST_MYSQL_DSN", "")
TIMEOUT = 5.0
HOSTILE = 'x"; DROP TABLE granted; --'
# Quotes of every kind, a backslash before a quote, a semicolon and a placeholder-looking text.
HOSTILE_PASSWORD = "it's \\' \"q\" `b`; DROP TABLE granted; -- {{name}}"


# Names the test resolver maps to loopback; the cluster's certificate is for TLS_HOST only.
TLS_HOST, OTHER_HOST = "db.broker.test", "other.broker.test"


async def _resolver(host: str, port: int) -> Sequence[str]:
    if host in (TLS_HOST, OTHER_HOST):
        return ["127.0.0.1"]
    if host.endswith(".invalid"):
        raise OSError("no such host")
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(i[4][0]) for i in infos]


def loopback(allow: bool = True) -> EgressPolicy:
    settings = EgressSettings(allow_loopback=allow, connect_timeout=3.0, total_timeout=10.0)
    return EgressPolicy(settings, resolver=_resolver)


def admin_target(password: str, **config: Any) -> Target:
    """A dynamic database connection as the lease service hands it over: the admin credential."""
    return Target("database", "", {"ssl": False, **config}, SecretFields({"password": password}))


def hour() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


def unique_prefix() -> str:
    """A prefix no other run uses, whose LIKE pattern (`_` a wildcard) also matches `<p>X...`."""
    return "t" + secrets.token_hex(3) + "_"


# --- PostgreSQL: a throwaway cluster that checks passwords ---------------------------------------


@dataclass(frozen=True)
class Pg:
    cluster: Cluster
    group: str = "brk_readers"

    def config(self, **overrides: Any) -> dict[str, Any]:
        return {
            "driver": "postgresql",
            "host": "127.0.0.1",
            "port": self.cluster.port,
            "database": "postgres",
            "username": "postgres",
            "group_role": self.group,
            **overrides,
        }

    def target(self, **overrides: Any) -> Target:
        return admin_target(self.cluster.superuser_password, **self.config(**overrides))

    async def superuser(self) -> Any:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=self.cluster.port,
            user="postgres",
            password=self.cluster.superuser_password,
            database="postgres",
            ssl=False,
        )

    async def login(self, user: str, password: str) -> Any:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=self.cluster.port,
            user=user,
            password=password,
            database="postgres",
            ssl=False,
        )


async def _pg_setup(pg: Pg) -> None:
    conn = await pg.superuser()
    try:
        await conn.execute(f"CREATE ROLE {pg.group} NOLOGIN")
        await conn.execute("CREATE TABLE granted (x int)")
        await conn.execute("CREATE TABLE other (x int)")
        await conn.execute("INSERT INTO granted VALUES (1)")
        await conn.execute(f"GRANT SELECT ON granted TO {pg.group}")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def pg() -> Iterator[Pg]:
    with throwaway_cluster([TLS_HOST]) as cluster:
        pg = Pg(cluster)
        asyncio.run(_pg_setup(pg))
        yield pg


@contextlib.asynccontextmanager
async def pg_admin(pg: Pg, **overrides: Any) -> AsyncIterator[UserAdmin]:
    async with await UserAdmin.open(pg.target(**overrides), loopback(), timeout=TIMEOUT) as admin:
        yield admin


async def pg_roles(pg: Pg, prefix: str = "") -> dict[str, datetime | None]:
    conn = await pg.superuser()
    try:
        rows = await conn.fetch("SELECT rolname, rolvaliduntil FROM pg_roles")
    finally:
        await conn.close()
    return {r["rolname"]: r["rolvaliduntil"] for r in rows if r["rolname"].startswith(prefix)}


async def test_postgresql_user_logs_in_and_can_do_what_the_group_grants_and_no_more(pg: Pg) -> None:
    name, password = new_username("brk_"), new_password()
    async with pg_admin(pg) as admin:
        await admin.create(name, password, hour())
        try:
            user = await pg.login(name, password)
            try:
                assert await user.fetchval("SELECT x FROM granted") == 1
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await user.execute("INSERT INTO granted VALUES (2)")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await user.fetch("SELECT * FROM other")
            finally:
                await user.close()
            with pytest.raises(asyncpg.InvalidPasswordError):  # the server does check it
                await pg.login(name, password[:-1] + ("a" if password[-1] != "a" else "b"))
        finally:
            await admin.drop(name)


async def test_postgresql_expiry_refuses_login_and_renew_extends_it(pg: Pg) -> None:
    name, password = new_username("brk_"), new_password()
    async with pg_admin(pg) as admin:
        await admin.create(name, password, hour())
        try:
            await admin.renew(name, datetime.now(UTC) - timedelta(seconds=1))
            with pytest.raises(asyncpg.InvalidPasswordError):
                await pg.login(name, password)
            later = (datetime.now(UTC) + timedelta(hours=5)).replace(microsecond=0)
            await admin.renew(name, later)
            assert (await pg_roles(pg, name))[name] == later
            await (await pg.login(name, password)).close()
        finally:
            await admin.drop(name)


async def test_postgresql_drop_ends_the_session_removes_the_user_and_can_be_repeated(pg: Pg) -> None:
    name, password = new_username("brk_"), new_password()
    async with pg_admin(pg) as admin:
        assert not admin.own_revocation  # the driver's defaults: nothing to fall back to
        await admin.create(name, password, hour())
        user = await pg.login(name, password)
        try:
            assert await user.fetchval("SELECT 1") == 1
            await admin.drop(name)
            # However the end reaches the client: AdminShutdown, a closed connection, or asyncpg
            # refusing to use a connection the server's message left mid-state.
            ended = (
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
                ConnectionError,
            )
            with pytest.raises(ended):
                for _ in range(50):  # the backend gets SIGTERM; it may take a moment to go
                    await user.fetchval("SELECT 1")
                    await asyncio.sleep(0.05)
        finally:
            user.terminate()
        assert name not in await pg_roles(pg)
        await admin.drop(name)  # already gone: success
        with pytest.raises(asyncpg.InvalidPasswordError):
            await pg.login(name, password)


async def _owns_a_table(pg: Pg, name: str, password: str, grantor: tuple[str, str] | None = None) -> str:
    """Let user `name` create a table in schema public (a grant of its own, which a DROP ROLE must
    also see gone; made by `grantor`, a user and its password, else the superuser), and have it
    create one with a row; the table's name."""
    granting = await (pg.superuser() if grantor is None else pg.login(*grantor))
    try:
        await granting.execute(
            await granting.fetchval("SELECT format('GRANT CREATE ON SCHEMA public TO %I', $1::text)", name)
        )
    finally:
        await granting.close()
    table = f"made_by_{name}"
    user = await pg.login(name, password)
    try:
        await user.execute(f"CREATE TABLE {table} (note text)")
        await user.execute(f"INSERT INTO {table} VALUES ('a workflow wrote this')")
    finally:
        await user.close()
    return table


async def _kept_for(pg: Pg, table: str) -> tuple[str, list[str]]:
    """The owner and the rows of `table`, which is dropped."""
    root = await pg.superuser()
    try:
        owner = await root.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = $1", table)
        rows = [r["note"] for r in await root.fetch(f"SELECT note FROM {table}")]
        await root.execute(f"DROP TABLE {table}")
    finally:
        await root.close()
    return str(owner), rows


async def test_postgresql_drop_of_a_user_that_owns_a_table_hands_it_to_the_administrator(pg: Pg) -> None:
    """DROP ROLE refuses a role that owns objects or holds grants (2BP01): before, such a lease
    stayed revoking for ever. Its objects are kept (they may hold a workflow's data)."""
    name, password = new_username("brk_"), new_password()
    async with pg_admin(pg) as admin:
        await admin.create(name, password, hour())
        table = await _owns_a_table(pg, name, password)
        await admin.drop(name)
        assert name not in await pg_roles(pg)
        await admin.drop(name)  # already gone: success
    assert await _kept_for(pg, table) == ("postgres", ["a workflow wrote this"])


# The connection's own revocation, rejected by the server every time (an admin's typo): the lease
# stays revoking and is retried until someone puts the statements right.
FAILING_PG_REVOCATION = ["SELECT * FROM no_such_table", "DROP ROLE IF EXISTS {{name}}"]
FAILING_MY_REVOCATION = ["SELECT * FROM no_such_table", "DROP USER IF EXISTS {{name}}@'%'"]


async def test_postgresql_a_revocation_the_server_rejects_still_leaves_a_user_nobody_can_log_in_as(
    pg: Pg,
) -> None:
    name, password = new_username("brk_"), new_password()
    async with pg_admin(pg, revocation_statements=FAILING_PG_REVOCATION) as admin:
        assert admin.own_revocation
        await admin.create(name, password, hour())
        with pytest.raises(LeaseDbError) as failed:
            await admin.drop(name)
        assert failed.value.reason == "statement_failed"
        assert name in await pg_roles(pg)  # not dropped: that is retried
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):  # not permitted to log in
            await pg.login(name, password)
        await admin.drop(name, driver_default=True)  # what the lease service falls back to
    assert name not in await pg_roles(pg)


async def test_postgresql_drop_by_a_createrole_admin_ends_the_users_session_too(pg: Pg) -> None:
    """The least-privilege administrator (CREATEROLE; not a superuser, not in pg_signal_backend)
    may end only sessions of roles whose privileges it has: the drop still ends the user's session
    instead of failing for as long as the user stays connected."""
    admin_name, admin_password = f"adm_{secrets.token_hex(4)}", new_password()
    name, password = new_username("brk_"), new_password()
    root = await pg.superuser()
    try:
        for template in ("CREATE ROLE %I LOGIN CREATEROLE PASSWORD %L", "GRANT %I TO %I WITH ADMIN OPTION"):
            args = (admin_name, admin_password) if "PASSWORD" in template else (pg.group, admin_name)
            await root.execute(
                await root.fetchval("SELECT format($1::text, $2::text, $3::text)", template, *args)
            )
        # What an administrator's creation statements could pass on to a user (a superuser's grant
        # to the user would be one this administrator cannot take back).
        grant = "SELECT format('GRANT CREATE ON SCHEMA public TO %I WITH GRANT OPTION', $1::text)"
        await root.execute(await root.fetchval(grant, admin_name))
        target = admin_target(admin_password, **pg.config(username=admin_name))
        async with await UserAdmin.open(target, loopback(), timeout=TIMEOUT) as admin:
            await admin.create(name, password, hour())
            # So the drop needs the user's objects and grants taken too.
            table = await _owns_a_table(pg, name, password, grantor=(admin_name, admin_password))
            user = await pg.login(name, password)
            try:
                assert await user.fetchval("SELECT x FROM granted") == 1
                await admin.drop(name)
                ended = (
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                    asyncpg.InternalClientError,
                    ConnectionError,
                )
                with pytest.raises(ended):
                    for _ in range(50):  # the backend gets SIGTERM; it may take a moment to go
                        await user.fetchval("SELECT 1")
                        await asyncio.sleep(0.05)
            finally:
                user.terminate()
        assert name not in await pg_roles(pg)
        assert await _kept_for(pg, table) == (admin_name, ["a workflow wrote this"])
    finally:
        revoke = "SELECT format('REVOKE ALL ON SCHEMA public FROM %I CASCADE', $1::text)"
        await root.execute(await root.fetchval(revoke, admin_name))
        for role in (name, admin_name):
            await root.execute(await root.fetchval("SELECT format('DROP ROLE IF EXISTS %I', $1::text)", role))
        await root.close()


async def test_postgresql_prefixed_users_lists_exactly_the_prefixed_users(pg: Pg) -> None:
    prefix = unique_prefix()
    names = sorted(new_username(prefix) for _ in range(2))
    decoy = prefix[:-1] + "X" + "decoy"  # matches the LIKE pattern `<prefix>%`, not the prefix
    group = prefix + "group"  # a group role (no login) with the prefix: not the broker's to drop
    conn = await pg.superuser()
    await conn.execute(f'CREATE ROLE "{decoy}" LOGIN')
    await conn.execute(f"CREATE ROLE {group} NOLOGIN")
    try:
        async with pg_admin(pg) as admin:
            for name in names:
                await admin.create(name, new_password(), hour())
            try:
                assert await admin.prefixed_users(prefix) == names
            finally:
                for name in names:
                    await admin.drop(name)
            assert await admin.prefixed_users(prefix) == []
            with pytest.raises(ValueError):
                await admin.prefixed_users("")
            with pytest.raises(ValueError):
                await admin.prefixed_users("t%")
    finally:
        await conn.execute(f'DROP ROLE "{decoy}"')
        await conn.execute(f"DROP ROLE {group}")
        await conn.close()


async def test_postgresql_hostile_group_role_is_quoted_not_executed(pg: Pg) -> None:
    name = new_username("brk_")
    async with pg_admin(pg, group_role=HOSTILE) as admin:
        with pytest.raises(LeaseDbError) as failed:
            await admin.create(name, new_password(), hour())
    assert (failed.value.reason, failed.value.code) == ("statement_failed", "42704")  # no such role
    conn = await pg.superuser()
    try:
        assert await conn.fetchval("SELECT count(*) FROM granted") == 1  # the table is still there
    finally:
        await conn.close()
    assert name not in await pg_roles(pg)  # the CREATE ROLE before the GRANT was rolled back


async def test_postgresql_custom_templates_quote_hostile_values(pg: Pg) -> None:
    """A custom template, a password full of quotes and a placeholder-looking text: the user is
    created with exactly that password, and nothing else ran."""
    templates = {
        "creation_statements": [
            "CREATE ROLE {{name}} LOGIN PASSWORD {{password}} VALID UNTIL {{ expiration }}"
        ],
        "revocation_statements": ["DROP ROLE IF EXISTS {{name}}"],
        "group_role": None,
    }
    name = new_username("brk_")
    async with pg_admin(pg, **templates) as admin:
        await admin.create(name, HOSTILE_PASSWORD, hour())
        try:
            await (await pg.login(name, HOSTILE_PASSWORD)).close()
        finally:
            await admin.drop(name)
    conn = await pg.superuser()
    try:
        assert await conn.fetchval("SELECT count(*) FROM granted") == 1
    finally:
        await conn.close()


async def test_postgresql_a_server_that_logs_ddl_never_sees_the_password(pg: Pg) -> None:
    """log_statement = ddl logs every CREATE ROLE: what it shows is the SCRAM verifier, which is
    also what the server stores, and the user logs in with the password it stands for."""
    conn = await pg.superuser()
    try:
        await conn.execute("ALTER SYSTEM SET log_statement = 'ddl'")
        await conn.execute("SELECT pg_reload_conf()")
        name, password = new_username("brk_"), new_password()
        try:
            async with pg_admin(pg) as admin:
                await admin.create(name, password, hour())
                try:
                    await (await pg.login(name, password)).close()
                    with pytest.raises(asyncpg.InvalidPasswordError):
                        await pg.login(name, password[:-1])
                    stored = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", name)
                finally:
                    await admin.drop(name)
        finally:
            await conn.execute("ALTER SYSTEM RESET log_statement")
            await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    assert stored.startswith("SCRAM-SHA-256$4096:")
    server_log = (Path(pg.cluster.base) / "log").read_text(errors="replace")
    assert f"CREATE ROLE {name}" in server_log and stored in server_log  # DDL was logged, as the verifier
    assert password not in server_log


@pytest.mark.parametrize("conforming", ["on", "off"])
async def test_postgresql_quoting_follows_the_sessions_string_settings(pg: Pg, conforming: str) -> None:
    """With standard_conforming_strings off a backslash escapes in '...': quoting that ignored the
    session's settings would let the password's \\' end the literal."""
    name = new_username("brk_")
    async with pg_admin(pg, options={"standard_conforming_strings": conforming}) as admin:
        await admin.create(name, HOSTILE_PASSWORD, hour())
        try:
            await (await pg.login(name, HOSTILE_PASSWORD)).close()
        finally:
            await admin.drop(name)


async def test_postgresql_statements_run_one_at_a_time(pg: Pg) -> None:
    """A template holding two statements is refused by the server, not run in part."""
    two = {"creation_statements": ["CREATE ROLE {{name}} LOGIN; DROP TABLE granted"], "group_role": None}
    name = new_username("brk_")
    async with pg_admin(pg, **two) as admin:
        with pytest.raises(LeaseDbError) as failed:
            await admin.create(name, new_password(), hour())
    assert failed.value.reason == "statement_failed"
    assert name not in await pg_roles(pg)
    conn = await pg.superuser()
    try:
        assert await conn.fetchval("SELECT count(*) FROM granted") == 1
    finally:
        await conn.close()


async def test_postgresql_wrong_admin_password_is_auth_failed_and_never_shown(pg: Pg) -> None:
    wrong = "admin-Canary-" + secrets.token_hex(8)
    with pytest.raises(LeaseDbError) as failed:
        await UserAdmin.open(admin_target(wrong, **pg.config()), loopback(), timeout=TIMEOUT)
    assert (failed.value.reason, failed.value.code) == ("auth_failed", "28P01")
    assert_not_shown(failed.value, wrong)
    # A statement the server refuses, on a session opened with the right password.
    async with pg_admin(pg, group_role="brk_no_such_group") as admin:
        with pytest.raises(LeaseDbError) as refused:
            await admin.create(new_username("brk_"), new_password(), hour())
    assert_not_shown(refused.value, pg.cluster.superuser_password)


async def test_postgresql_admin_session_verifies_tls_for_the_host_name(pg: Pg) -> None:
    tls = {"host": TLS_HOST, "ssl": True, "ssl_ca": pg.cluster.ca_pem}
    async with pg_admin(pg, **tls) as admin:
        assert await admin.prefixed_users("brk_") == []
    for wrong in ({**tls, "host": OTHER_HOST}, {**tls, "ssl_ca": None}):
        with pytest.raises(LeaseDbError) as failed:
            await UserAdmin.open(pg.target(**wrong), loopback(), timeout=TIMEOUT)
        assert failed.value.reason == "tls"


async def test_postgresql_admin_session_ended_by_the_server_is_connect_failed(pg: Pg) -> None:
    admin = await UserAdmin.open(pg.target(), loopback(), timeout=TIMEOUT)
    conn = await pg.superuser()
    try:
        ended = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        assert ended == 1
    finally:
        await conn.close()
    for _ in range(2):  # the first call may meet the server's goodbye, the second a closed socket
        with pytest.raises(LeaseDbError) as failed:
            await admin.prefixed_users("brk_")
        assert failed.value.reason == "connect_failed"
    await admin.close()  # never raises


def assert_not_shown(error: LeaseDbError, secret: str) -> None:
    for text in (str(error), repr(error), repr(error.args), "".join(traceback.format_exception(error))):
        assert secret not in text


# --- MariaDB: the shared server, root as the admin -----------------------------------------------


@dataclass(frozen=True)
class My:
    host: str
    port: int
    database: str
    group: str

    def target(self, **overrides: Any) -> Target:
        config = {
            "driver": "mysql",
            "host": self.host,
            "port": self.port,
            "database": "test",
            "username": "root",
            "group_role": self.group,
            **overrides,
        }
        return admin_target("", **config)

    async def root(self) -> Any:
        return await aiomysql.connect(
            host=self.host, port=self.port, user="root", password="", autocommit=True, charset="utf8mb4"
        )

    async def login(self, user: str, password: str, *, use_database: bool = True) -> Any:
        """Log in as `user`, into the test database (which takes the group's privileges) or none."""
        return await aiomysql.connect(
            host=self.host,
            port=self.port,
            user=user,
            password=password,
            db=self.database if use_database else None,
            autocommit=True,
        )


async def _root_sql(my: My, *statements: str) -> list[Any]:
    conn = await my.root()
    try:
        rows: list[Any] = []
        async with conn.cursor() as cur:
            for statement in statements:
                await cur.execute(statement)
                rows = list(await cur.fetchall())
        return rows
    finally:
        conn.close()


@pytest.fixture(scope="module")
def my() -> Iterator[My]:
    """A unique database with tables `granted` and `other`, and a unique role that may SELECT
    `granted`; dropped at the end with every user this module's prefixes created."""
    if not MY_DSN:
        pytest.skip("BROKER_TEST_MYSQL_DSN unset (e.g. mysql://root@127.0.0.1:3306/test)")
    suffix = secrets.token_hex(4)
    my = My("127.0.0.1", 3306, f"brk_test_{suffix}", f"brk_role_{suffix}")
    setup = (
        f"CREATE DATABASE `{my.database}`",
        f"CREATE TABLE `{my.database}`.granted (x int)",
        f"CREATE TABLE `{my.database}`.other (x int)",
        f"INSERT INTO `{my.database}`.granted VALUES (1)",
        f"CREATE ROLE `{my.group}`",
        f"GRANT SELECT ON `{my.database}`.granted TO `{my.group}`",
    )
    try:
        asyncio.run(_root_sql(my, *setup))
        yield my
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", aiomysql.Warning)
            asyncio.run(
                _root_sql(my, f"DROP DATABASE IF EXISTS `{my.database}`", f"DROP ROLE IF EXISTS `{my.group}`")
            )


@contextlib.asynccontextmanager
async def my_admin(my: My, **overrides: Any) -> AsyncIterator[UserAdmin]:
    async with await UserAdmin.open(my.target(**overrides), loopback(), timeout=TIMEOUT) as admin:
        yield admin


async def my_users(my: My, name: str) -> list[Any]:
    conn = await my.root()
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT Host FROM mysql.user WHERE User = %s", (name,))
            return list(await cur.fetchall())
    finally:
        conn.close()


async def granted_rows(my: My) -> int:
    rows = await _root_sql(my, f"SELECT count(*) FROM `{my.database}`.granted")
    return int(rows[0][0])


async def test_mysql_user_logs_in_and_can_do_what_the_group_grants_and_no_more(my: My) -> None:
    name, password = new_username("brk_"), new_password()
    async with my_admin(my) as admin:
        await admin.create(name, password, hour())
        try:
            user = await my.login(name, password)
            try:
                async with user.cursor() as cur:
                    await cur.execute("SELECT x FROM granted")
                    assert await cur.fetchall() == ((1,),)
                    with pytest.raises(pymysql.err.OperationalError) as insert:
                        await cur.execute("INSERT INTO granted VALUES (2)")
                    assert insert.value.args[0] == 1142  # command denied
                    with pytest.raises(pymysql.err.OperationalError) as other:
                        await cur.execute("SELECT * FROM other")
                    assert other.value.args[0] == 1142
            finally:
                user.close()
            with pytest.raises(pymysql.err.OperationalError) as wrong:
                await my.login(name, "not-" + password)
            assert wrong.value.args[0] == 1045
            await admin.renew(name, hour())  # MySQL has no login expiry: nothing to do, no error
        finally:
            await admin.drop(name)


async def test_mysql_drop_ends_the_session_removes_the_user_and_can_be_repeated(my: My) -> None:
    name, password = new_username("brk_"), new_password()
    async with my_admin(my) as admin:
        assert not admin.own_revocation  # the driver's defaults: nothing to fall back to
        await admin.create(name, password, hour())
        user = await my.login(name, password)
        try:
            await admin.drop(name)
            with pytest.raises(pymysql.err.OperationalError):  # 2013: lost connection (KILLed)
                async with user.cursor() as cur:
                    await cur.execute("SELECT 1")
        finally:
            user.close()
        assert await my_users(my, name) == []
        await admin.drop(name)  # already gone: success
    with pytest.raises(pymysql.err.OperationalError) as refused:
        await my.login(name, password)
    assert refused.value.args[0] in (1045, 1698)  # MariaDB: 1698 for a user that does not exist


async def test_mysql_a_revocation_the_server_rejects_still_leaves_a_user_nobody_can_log_in_as(
    my: My,
) -> None:
    """MySQL has no login expiry: without the account locked first, a user whose revocation fails
    would keep logging in for as long as the statements stay wrong."""
    name, password = new_username("brk_"), new_password()
    async with my_admin(my, revocation_statements=FAILING_MY_REVOCATION) as admin:
        assert admin.own_revocation
        await admin.create(name, password, hour())
        session = await my.login(name, password)
        try:
            with pytest.raises(LeaseDbError) as failed:
                await admin.drop(name)
            assert failed.value.reason == "statement_failed"
            with pytest.raises(pymysql.err.OperationalError):  # 2013: lost connection (KILLed)
                async with session.cursor() as cur:
                    await cur.execute("SELECT 1")
        finally:
            session.close()
        assert await my_users(my, name) != []  # not dropped: that is retried
        with pytest.raises(pymysql.err.OperationalError) as refused:
            await my.login(name, password)
        assert refused.value.args[0] in (3118, 4151)  # MySQL, MariaDB: the account is locked
        await admin.drop(name, driver_default=True)  # what the lease service falls back to
    assert await my_users(my, name) == []


async def test_mysql_prefixed_users_lists_exactly_the_prefixed_users(my: My) -> None:
    prefix = unique_prefix()
    names = sorted(new_username(prefix) for _ in range(2))
    decoy = prefix[:-1] + "Xdecoy"  # matches LIKE '<prefix>%' (`_` is a wildcard), not the prefix
    group = prefix + "group"  # a role with the prefix: not the broker's to drop
    await _root_sql(my, f"CREATE USER '{decoy}'@'%' IDENTIFIED BY 'decoy-pw'", f"CREATE ROLE `{group}`")
    try:
        async with my_admin(my) as admin:
            for name in names:
                await admin.create(name, new_password(), hour())
            try:
                assert await admin.prefixed_users(prefix) == names
            finally:
                for name in names:
                    await admin.drop(name)
            assert await admin.prefixed_users(prefix) == []
        assert len(await my_users(my, decoy)) == 1  # never touched
    finally:
        await _root_sql(my, f"DROP USER '{decoy}'@'%'", f"DROP ROLE `{group}`")


async def test_mysql_hostile_group_role_is_quoted_not_executed(my: My) -> None:
    name = new_username("brk_")
    async with my_admin(my, group_role=HOSTILE) as admin:
        with pytest.raises(LeaseDbError) as failed:
            await admin.create(name, new_password(), hour())
    assert failed.value.reason == "statement_failed"
    assert failed.value.code.isdigit()
    assert await granted_rows(my) == 1
    assert await my_users(my, name) == []  # the user made before the GRANT failed was dropped


async def test_mysql_hostile_password_is_quoted_and_one_statement_runs_at_a_time(my: My) -> None:
    name = new_username("brk_")
    async with my_admin(my) as admin:
        await admin.create(name, HOSTILE_PASSWORD, hour())
        try:
            (await my.login(name, HOSTILE_PASSWORD)).close()
        finally:
            await admin.drop(name)
    two = {"creation_statements": ["CREATE USER {{name}}@'%'; DROP TABLE granted"], "group_role": None}
    async with my_admin(my, **two) as admin:
        with pytest.raises(LeaseDbError) as failed:
            await admin.create(name, new_password(), hour())
    assert (failed.value.reason, failed.value.code) == ("statement_failed", "1064")  # syntax error
    assert await granted_rows(my) == 1
    assert await my_users(my, name) == []


async def test_mysql_create_of_a_name_that_exists_fails_and_leaves_that_user_alone(my: My) -> None:
    """Only what the failed create made is undone: the user that was there keeps working."""
    name, password = new_username("brk_"), new_password()
    async with my_admin(my) as admin:
        await admin.create(name, password, hour())
        try:
            with pytest.raises(LeaseDbError) as failed:
                await admin.create(name, new_password(), hour())
            assert (failed.value.reason, failed.value.code) == ("statement_failed", "1396")
            (await my.login(name, password)).close()
        finally:
            await admin.drop(name)


async def stored_password(my: My, name: str) -> str:
    """What the server keeps for user `name`@'%' (its mysql_native_password hash)."""
    rows = await _root_sql(
        my, f"SELECT authentication_string FROM mysql.user WHERE User = '{name}' AND Host = '%'"
    )
    return str(rows[0][0])


CLEAR = {"creation_statements": ["CREATE USER {{name}}@'%' IDENTIFIED BY {{password}}"], "group_role": None}
HASHED_VIA = {
    "creation_statements": [
        "CREATE USER {{name}}@'%' IDENTIFIED VIA mysql_native_password USING {{password_hash}}"
    ],
    "group_role": None,
}


async def test_mariadb_password_hash_is_what_the_servers_password_function_gives(my: My) -> None:
    """The hash the broker computes is MariaDB's own, for quotes and non-ASCII text too."""
    conn = await my.root()
    try:
        async with conn.cursor() as cur:
            for password in (new_password(), HOSTILE_PASSWORD, "pässwörd ✓"):
                await cur.execute("SELECT PASSWORD(%s)", (password,))
                assert (await cur.fetchone())[0] == native_password_hash(password)
    finally:
        conn.close()


async def test_mysql_administrators_templates_keep_the_password_and_may_use_the_hash(my: My) -> None:
    """{{password}} is still the password itself (quoted, whatever it holds), and {{password_hash}}
    works in a template of the administrator's own."""
    clear, via = new_username("brk_"), new_username("brk_")
    async with my_admin(my, **CLEAR) as admin:
        await admin.create(clear, HOSTILE_PASSWORD, hour())
        try:
            (await my.login(clear, HOSTILE_PASSWORD, use_database=False)).close()
        finally:
            await admin.drop(clear)
    password = new_password()
    async with my_admin(my, **HASHED_VIA) as admin:
        await admin.create(via, password, hour())
        try:
            (await my.login(via, password, use_database=False)).close()
            assert await stored_password(my, via) == native_password_hash(password)
        finally:
            await admin.drop(via)


async def test_a_password_placeholder_with_no_value_is_invalid_config_naming_it(my: My) -> None:
    """At renewal there is no password (the broker keeps none): a template that asks for one fails
    before any statement runs, naming the placeholder."""
    templates = {"renewal_statements": ["ALTER USER {{name}}@'%' IDENTIFIED BY {{password}}"]}
    name, password = new_username("brk_"), new_password()
    async with my_admin(my, **templates) as admin:
        await admin.create(name, password, hour())
        try:
            with pytest.raises(LeaseDbError) as failed:
                await admin.renew(name, hour())
            assert (failed.value.reason, failed.value.code) == ("invalid_config", "{{password}}")
            (await my.login(name, password)).close()  # nothing ran
        finally:
            await admin.drop(name)


@contextlib.asynccontextmanager
async def general_log(my: My) -> AsyncIterator[Any]:
    """The shared server's general log, into mysql.general_log too, for the block (a cursor of root's
    to read it with); the server's settings as they were afterwards. A named lock keeps two runs
    of this from overlapping."""
    conn = await my.root()
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT GET_LOCK('broker_test_general_log', 60)")
            assert (await cur.fetchone())[0] == 1
            await cur.execute("SELECT @@global.general_log, @@global.log_output")
            was_on, output = await cur.fetchone()
            await cur.execute("SELECT COUNT(*) FROM mysql.general_log")
            (rows_before,) = await cur.fetchone()
            outputs = {o for o in str(output).split(",") if o not in ("", "NONE")} | {"TABLE"}
            try:
                await cur.execute("SET GLOBAL log_output = %s", (",".join(sorted(outputs)),))
                await cur.execute("SET GLOBAL general_log = 1")
                yield cur
            finally:
                await cur.execute("SET GLOBAL general_log = %s", (int(was_on),))
                await cur.execute("SET GLOBAL log_output = %s", (output,))
                if rows_before == 0:  # the table was empty: leave it so
                    await cur.execute("TRUNCATE TABLE mysql.general_log")
                await cur.execute("SELECT RELEASE_LOCK('broker_test_general_log')")
    finally:
        conn.close()


async def log_lines(cur: Any, query: str, name: str) -> list[str]:
    """The lines of a log table (`query` selects one text column) that mention `name`."""
    await cur.execute(query)
    lines = [
        row[0].decode(errors="replace") if isinstance(row[0], bytes) else str(row[0])
        for row in await cur.fetchall()
    ]
    return [line for line in lines if name in line]


GENERAL_LOG = "SELECT argument FROM mysql.general_log"


async def test_mariadb_general_log_shows_the_password_hash_never_the_password(my: My) -> None:
    """The default creation statement gives MariaDB the password as its mysql_native_password hash,
    which is what the server stores: the user logs in with the password, and the general log
    (MariaDB writes statements there as they came) shows the hash. A template of the
    administrator's that asks for {{password}} shows it there: the log is where it would be."""
    name, password = new_username("brk_"), new_password()
    clear, clear_password = new_username("brk_"), new_password()
    async with general_log(my) as cur:
        async with my_admin(my) as admin:
            await admin.create(name, password, hour())
            try:
                (await my.login(name, password)).close()
                with pytest.raises(pymysql.err.OperationalError) as wrong:
                    await my.login(name, password[:-1])
                assert wrong.value.args[0] == 1045
                stored = await stored_password(my, name)
            finally:
                await admin.drop(name)
        async with my_admin(my, **CLEAR) as admin:
            await admin.create(clear, clear_password, hour())
            await admin.drop(clear)
        logged = await log_lines(cur, GENERAL_LOG, name)
        logged_clear = await log_lines(cur, GENERAL_LOG, clear)
    assert stored == native_password_hash(password)
    assert f"CREATE USER '{name}'@'%' IDENTIFIED BY PASSWORD '{stored}'" in logged
    assert not any(password in line for line in logged)
    assert any(clear_password in line for line in logged_clear)


async def test_mysql_wrong_admin_password_is_auth_failed_and_never_shown(my: My) -> None:
    wrong = "admin-Canary-" + secrets.token_hex(8)
    with pytest.raises(LeaseDbError) as failed:
        await UserAdmin.open(admin_target(wrong, **{**my.target().config}), loopback(), timeout=TIMEOUT)
    assert (failed.value.reason, failed.value.code) == ("auth_failed", "1045")
    assert_not_shown(failed.value, wrong)


# --- a MariaDB of our own: its binary log, a password validation plugin ---------------------------

# Every statement goes to all three logs: the binary log (only at start-up), and the general and
# slow logs into their tables.
LOGS_ON = (
    "--log-bin=binlog",
    "--server-id=1",
    "--log-output=TABLE",
    "--general-log=1",
    "--slow-query-log=1",
    "--long-query-time=0",
)


@pytest.fixture(scope="module")
def own_my() -> Iterator[My]:
    """A throwaway MariaDB with every log on: a database, tables and a role like `my`'s."""
    with throwaway_mariadb(*LOGS_ON) as port:
        own = My("127.0.0.1", port, "brk_own", "brk_own_role")
        setup = (
            # Every statement counts as slow, whatever the kind of query (the default filter keeps
            # only some kinds); sessions take it from the global value when they open.
            "SET GLOBAL log_slow_filter = ''",
            "CREATE DATABASE test",  # where the admin connects (My.target)
            f"CREATE DATABASE `{own.database}`",
            f"CREATE TABLE `{own.database}`.granted (x int)",
            f"CREATE ROLE `{own.group}`",
            f"GRANT SELECT ON `{own.database}`.granted TO `{own.group}`",
        )
        asyncio.run(_root_sql(own, *setup))
        yield own


async def binary_log_lines(cur: Any, name: str) -> list[str]:
    """The binary log's events (their text) that mention `name`."""
    await cur.execute("SHOW BINARY LOGS")
    lines: list[str] = []
    for log, *_ in list(await cur.fetchall()):
        await cur.execute(f"SHOW BINLOG EVENTS IN '{log}'")  # the server's own file names
        lines += [str(row[5]) for row in await cur.fetchall()]
    return [line for line in lines if name in line]


async def test_mariadb_binary_slow_and_general_logs_show_the_hash_never_the_password(own_my: My) -> None:
    """The binary log (kept for days, shipped to every replica), the slow log and the general log
    all get the statement as it came: with the default template, the password's hash; with a
    template that asks for {{password}}, the password (so each log is looked at where it would be)."""
    name, password = new_username("brk_"), new_password()
    clear, clear_password = new_username("brk_"), new_password()
    async with my_admin(own_my) as admin:
        await admin.create(name, password, hour())
        (await own_my.login(name, password)).close()
    async with my_admin(own_my, **CLEAR) as admin:
        await admin.create(clear, clear_password, hour())
        (await own_my.login(clear, clear_password, use_database=False)).close()
    stored = await stored_password(own_my, name)
    assert stored == native_password_hash(password)
    conn = await own_my.root()
    try:
        async with conn.cursor() as cur:
            logs = {
                "binary": (await binary_log_lines(cur, name), await binary_log_lines(cur, clear)),
                "slow": (
                    await log_lines(cur, "SELECT sql_text FROM mysql.slow_log", name),
                    await log_lines(cur, "SELECT sql_text FROM mysql.slow_log", clear),
                ),
                "general": (
                    await log_lines(cur, GENERAL_LOG, name),
                    await log_lines(cur, GENERAL_LOG, clear),
                ),
            }
    finally:
        conn.close()
    for log, (lines, clear_lines) in logs.items():
        assert any(f"IDENTIFIED BY PASSWORD '{stored}'" in line for line in lines), log
        assert not any(password in line for line in lines), log
        assert any(clear_password in line for line in clear_lines), log
    async with my_admin(own_my) as admin:
        await admin.drop(name)
        await admin.drop(clear)


@contextlib.asynccontextmanager
async def password_validation(my: My) -> AsyncIterator[None]:
    """simple_password_check active for the block: with strict_password_validation (on by default)
    the server then refuses any password given as a hash."""
    await _root_sql(my, "INSTALL SONAME 'simple_password_check'")
    try:
        yield
    finally:
        await _root_sql(my, "UNINSTALL SONAME 'simple_password_check'")


async def test_a_mariadb_that_refuses_hashes_gets_the_password_and_has_no_password_hash(own_my: My) -> None:
    """The default template falls back to the password itself (the server could not check a hash);
    a template that asks for {{password_hash}} fails naming it before anything runs, and the
    revocation statements still run."""
    password = "Aa1-" + new_password()  # what simple_password_check asks for, whatever the rest is
    name, other = new_username("brk_"), new_username("brk_")
    async with password_validation(own_my):
        async with my_admin(own_my) as admin:
            await admin.create(name, password, hour())
            try:
                (await own_my.login(name, password)).close()
            finally:
                await admin.drop(name)
        hashed = {
            "creation_statements": ["CREATE USER {{name}}@'%' IDENTIFIED BY PASSWORD {{password_hash}}"]
        }
        async with my_admin(own_my, **hashed, group_role=None) as admin:
            with pytest.raises(LeaseDbError) as refused:
                await admin.create(other, password, hour())
            assert (refused.value.reason, refused.value.code) == ("invalid_config", "{{password_hash}}")
            await admin.drop(other)  # nothing to drop: success
    assert await my_users(own_my, name) == [] and await my_users(own_my, other) == []


# --- connecting: the egress policy, unreachable servers, templates -------------------------------


@pytest.mark.parametrize("driver", ["postgresql", "mysql"])
async def test_closed_port_is_connect_failed(driver: str) -> None:
    target = admin_target("pw", driver=driver, host="127.0.0.1", port=free_port(), database="d", username="u")
    with pytest.raises(LeaseDbError) as failed:
        await UserAdmin.open(target, loopback(), timeout=TIMEOUT)
    assert failed.value.reason == "connect_failed"


@pytest.mark.parametrize("driver", ["postgresql", "mysql"])
async def test_egress_policy_blocking_loopback_is_blocked_and_nothing_connects(driver: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        target = admin_target("pw", driver=driver, host="127.0.0.1", port=port, database="d", username="u")
        with pytest.raises(LeaseDbError) as failed:
            await UserAdmin.open(target, loopback(allow=False), timeout=TIMEOUT)
        assert failed.value.reason == "blocked"
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected


async def test_mysql_tls_required_never_falls_back(my: My) -> None:
    """The shared MariaDB offers no TLS (or a certificate no system CA signed): refused either way."""
    with pytest.raises(LeaseDbError) as failed:
        await UserAdmin.open(my.target(ssl=True), loopback(), timeout=TIMEOUT)
    assert failed.value.reason == "tls"


@pytest.mark.parametrize("driver", ["postgresql", "mysql"])
async def test_host_that_does_not_resolve_is_dns(driver: str) -> None:
    target = admin_target("pw", driver=driver, host="db.invalid", port=5432, database="d", username="u")
    with pytest.raises(LeaseDbError) as failed:
        await UserAdmin.open(target, loopback(), timeout=TIMEOUT)
    assert failed.value.reason == "dns"


@pytest.mark.parametrize("driver", ["postgresql", "mysql"])
async def test_silent_server_is_timeout(driver: str) -> None:
    """A listener that never answers: the handshake is bounded by the timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        target = admin_target("pw", driver=driver, host="127.0.0.1", port=port, database="d", username="u")
        with pytest.raises(LeaseDbError) as failed:
            await UserAdmin.open(target, loopback(), timeout=0.5)
    assert failed.value.reason == "timeout"


def test_bad_templates_are_refused_again_before_they_run() -> None:
    """A row saved before a rule existed is checked with the catalog's grammar at lease time."""
    with pytest.raises(ValueError, match="nope"):
        statements_for("postgresql", {"creation_statements": ["CREATE ROLE {{nope}}"]})
    with pytest.raises(ValueError, match="group_role"):
        statements_for("mysql", {"creation_statements": ["GRANT {{group}} TO {{name}}@'%'"]})
    for prefix in ("", "Brk_", "1brk", "brk%", "b" * 13):
        with pytest.raises(ValueError):
            new_username(prefix)


def test_defaults_per_driver() -> None:
    pg = statements_for("postgresql", {"group_role": "readers"})
    assert pg.creation == (
        "CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}}",
        "GRANT {{group}} TO {{name}}",
    )
    assert pg.renewal == ("ALTER ROLE {{name}} VALID UNTIL {{expiration}}",)
    assert statements_for("postgresql", {}).creation == pg.creation[:1]
    mysql = statements_for("mysql", {"group_role": "readers"}, mariadb=False)
    assert mysql.creation == (
        "CREATE USER {{name}}@'%' IDENTIFIED BY {{password}}",  # MySQL rewrites it out of its logs
        "GRANT {{group}} TO {{name}}@'%'",
        "SET DEFAULT ROLE {{group}} TO {{name}}@'%'",
    )
    assert mysql.renewal == ()
    mariadb = statements_for("mysql", {"group_role": "readers"})
    assert mariadb.creation == (
        "CREATE USER {{name}}@'%' IDENTIFIED BY PASSWORD {{password_hash}}",
        "GRANT {{group}} TO {{name}}@'%'",
        "SET DEFAULT ROLE {{group}} FOR {{name}}@'%'",
    )
    refusing = statements_for("mysql", {}, password_hashes=False)  # a MariaDB that takes no hash
    assert refusing.creation == ("CREATE USER {{name}}@'%' IDENTIFIED BY {{password}}",)
    custom = statements_for("mysql", {"renewal_statements": ["ALTER USER {{name}}@'%' ACCOUNT UNLOCK"]})
    assert custom.renewal == ("ALTER USER {{name}}@'%' ACCOUNT UNLOCK",)
    name = new_username("brk_")
    assert re.fullmatch(r"brk_[a-z0-9]{16}", name), name
    assert len(new_password()) >= 32 and new_password() != new_password()


@pytest.mark.parametrize(
    ("code", "for_now"),
    [
        ("40001", True),  # PostgreSQL: serialization failure
        ("40P01", True),  # deadlock
        ("55P03", True),  # lock not available (lock_timeout)
        ("1205", True),  # MySQL: lock wait timeout
        ("1213", True),  # deadlock
        ("42P01", False),  # undefined table: the statements are wrong
        ("1146", False),
        ("2BP01", False),
    ],
)
def test_a_refusal_for_a_lock_or_a_conflict_is_only_for_now(code: str, for_now: bool) -> None:
    assert LeaseDbError("statement_failed", code).refused_for_now is for_now
    assert not LeaseDbError("timeout", code).refused_for_now
