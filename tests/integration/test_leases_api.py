"""Leases through the broker's API on the real MariaDB (which checks passwords): Resolve on a
dynamic connection makes a user that logs in with the group's privileges; renew, revoke, expiry,
a revoked grant and the reconciler end it; another executor cannot touch it; and the stored
administrator's password (a canary) never comes back through any answer, record or log.

The admin is a user made for this module with a password, so the canary is real. Every user the
broker makes carries a prefix unique to this module; everything is dropped at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import secrets
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiomysql
import grpc
import pymysql
import pytest

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.config import LeaseSettings
from broker.egress import EgressSettings
from broker.service.leases import OWN_REVOCATION_TRIES
from tests.conftest import Running
from tests.helpers import EXECUTOR, EXECUTOR2, field_violations, rpc_error, set_stored_config_sealed, struct
from tests.mariadb_server import throwaway_mariadb

DSN = os.environ.get("BROKER_TEST_MYSQL_DSN", "")


@dataclass(frozen=True)
class Server:
    database: str
    group: str
    admin: str
    canary: str  # the admin's password
    prefix: str

    async def login(self, user: str, password: str) -> aiomysql.Connection:
        return await aiomysql.connect(
            host="127.0.0.1", port=3306, user=user, password=password, db=self.database, autocommit=True
        )

    async def can_log_in(self, user: str, password: str) -> bool:
        try:
            conn = await self.login(user, password)
        except pymysql.err.OperationalError as exc:
            # Access denied (MariaDB: 1698 for a user that does not exist); the account locked
            # (MySQL 3118, MariaDB 4151). Nothing else.
            assert exc.args[0] in (1045, 1698, 3118, 4151), exc
            return False
        conn.close()
        return True


async def _as_root(*statements: str) -> list[Any]:
    conn = await aiomysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True)
    try:
        rows: list[Any] = []
        async with conn.cursor() as cur:
            for statement in statements:
                with warnings.catch_warnings():  # "IF EXISTS" of what is gone already
                    warnings.simplefilter("ignore", aiomysql.Warning)
                    await cur.execute(statement)
                rows = list(await cur.fetchall())
        return rows
    finally:
        conn.close()


async def users_named(prefix: str) -> set[str]:
    rows = await _as_root(f"SELECT User FROM mysql.user WHERE LEFT(User, {len(prefix)}) = '{prefix}'")
    return {str(row[0]) for row in rows}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    if not DSN:
        pytest.skip("BROKER_TEST_MYSQL_DSN is not set (e.g. mysql://root@127.0.0.1:3306/test); CI sets it")
    tag = secrets.token_hex(3)
    found = Server(
        f"lease_db_{tag}",
        f"lease_role_{tag}",
        f"lease_admin_{tag}",
        "canary-" + secrets.token_hex(16),
        f"t{tag}_",
    )
    asyncio.run(
        _as_root(
            f"CREATE DATABASE `{found.database}`",
            f"CREATE TABLE `{found.database}`.granted (x int)",
            f"CREATE TABLE `{found.database}`.other (x int)",
            f"INSERT INTO `{found.database}`.granted VALUES (1)",
            f"CREATE ROLE `{found.group}`",
            f"GRANT SELECT ON `{found.database}`.granted TO `{found.group}`",
            f"CREATE USER `{found.admin}`@'%' IDENTIFIED BY '{found.canary}'",
            f"GRANT ALL PRIVILEGES ON *.* TO `{found.admin}`@'%' WITH GRANT OPTION",
            f"GRANT `{found.group}` TO `{found.admin}`@'%' WITH ADMIN OPTION",
        )
    )
    try:
        yield found
    finally:
        leftovers = asyncio.run(users_named(found.prefix))
        asyncio.run(
            _as_root(
                *(f"DROP USER IF EXISTS `{user}`@'%'" for user in leftovers),
                f"DROP USER IF EXISTS `{found.admin}`@'%'",
                f"DROP ROLE IF EXISTS `{found.group}`",
                f"DROP DATABASE IF EXISTS `{found.database}`",
            )
        )


FAST = LeaseSettings(
    poll_seconds=0.1,
    min_retry_seconds=0.1,
    max_retry_seconds=0.5,
    creation_grace_seconds=3,
    reconcile_seconds=0.5,
    timeout_seconds=2,
)


@pytest.fixture
async def broker(make_broker: Callable[..., Awaitable[Running]]) -> AsyncIterator[Running]:
    yield await make_broker(egress=EgressSettings(allow_loopback=True), leases=FAST)


async def dynamic_connection(running: Running, server: Server, name: str = "ledger", **config: Any) -> str:
    created = await running.admin().CreateConnection(
        pb.CreateConnectionRequest(
            name=name,
            type="database",
            config=struct(
                {
                    "driver": "mysql",
                    "host": "127.0.0.1",
                    "port": 3306,
                    "database": server.database,
                    "username": server.admin,
                    "ssl": False,
                    "dynamic": True,
                    "group_role": server.group,
                    "username_prefix": server.prefix,
                    "default_ttl": 60,
                    "max_ttl": 120,
                }
                | config
            ),
            secrets={"password": server.canary},
        )
    )
    for principal in (EXECUTOR, EXECUTOR2):
        await running.admin().GrantAccess(
            pb.GrantAccessRequest(connection_id=created.id, principal=principal)
        )
    return str(created.id)


async def lease_state(running: Running, lease_id: str) -> pb.Lease:
    page = await running.admin().ListLeases(pb.ListLeasesRequest())
    (found,) = [lease for lease in page.leases if lease.id == lease_id]
    return found


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.05)


async def test_a_lease_is_a_fresh_user_with_the_groups_privileges_and_no_more(
    broker: Running, server: Server
) -> None:
    connection_id = await dynamic_connection(broker, server)
    answer = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id, run_id="run-1"))
    user, password = answer.config["username"], answer.secrets["password"]
    assert user.startswith(server.prefix) and len(user) == len(server.prefix) + 16
    assert set(answer.secrets) == {"password"} and len(password) >= 32
    assert answer.lease.username == user and answer.lease.state == pb.LEASE_STATE_ACTIVE
    assert answer.lease.run_id == "run-1" and answer.lease.principal == EXECUTOR
    lifetime = answer.lease.expires_at.ToDatetime() - answer.lease.created_at.ToDatetime()
    assert lifetime == dt.timedelta(seconds=60) and answer.expires_at == answer.lease.expires_at
    conn = await server.login(user, password)
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT x FROM granted")
            assert await cur.fetchall() == ((1,),)
            with pytest.raises(pymysql.err.OperationalError) as denied:
                await cur.execute("SELECT x FROM other")
            assert denied.value.args[0] == 1142
    finally:
        conn.close()
    assert not await server.can_log_in(user, password + "x")  # the server checks passwords
    # A second Resolve is a second user.
    again = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    assert again.config["username"] != user and again.lease.id != answer.lease.id
    events = await broker.admin().ListAuditEvents(pb.ListAuditEventsRequest(connection_id=connection_id))
    actions = [(e.action, e.outcome) for e in events.events]
    assert actions.count(("lease.create", "succeeded")) == 2
    assert actions.count(("connection.resolve", "allowed")) == 2


async def test_renew_extends_up_to_max_ttl_and_only_the_holder_may_renew_or_revoke(
    broker: Running, server: Server
) -> None:
    connection_id = await dynamic_connection(broker, server)
    answer = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    lease = answer.lease
    renewed = await broker.resolver().RenewLease(
        pb.RenewLeaseRequest(lease_id=lease.id, increment_seconds=90)
    )
    assert renewed.expires_at.ToDatetime() > lease.expires_at.ToDatetime()
    capped = await broker.resolver().RenewLease(
        pb.RenewLeaseRequest(lease_id=lease.id, increment_seconds=3600)
    )
    assert capped.expires_at == lease.max_expires_at  # never past max_ttl
    for call in (
        broker.resolver("executor2").RenewLease(pb.RenewLeaseRequest(lease_id=lease.id)),
        broker.resolver("executor2").RevokeLease(pb.RevokeLeaseRequest(lease_id=lease.id)),
        broker.resolver("executor_b").RevokeLease(pb.RevokeLeaseRequest(lease_id=lease.id)),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND  # exactly what an unknown id gets
    unknown = await rpc_error(broker.resolver().RevokeLease(pb.RevokeLeaseRequest(lease_id="lease_nope")))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and unknown.details().replace("lease_nope", "X") == (
        error.details().replace(lease.id, "X")
    )
    assert await server.can_log_in(answer.config["username"], answer.secrets["password"])


async def test_revoke_drops_the_user_at_once(broker: Running, server: Server) -> None:
    connection_id = await dynamic_connection(broker, server)
    answer = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    revoked = await broker.resolver().RevokeLease(pb.RevokeLeaseRequest(lease_id=answer.lease.id))
    assert revoked.state == pb.LEASE_STATE_REVOKED and revoked.revoke_reason == "revoked"
    assert not await server.can_log_in(answer.config["username"], answer.secrets["password"])
    assert answer.config["username"] not in await users_named(server.prefix)
    error = await rpc_error(broker.resolver().RenewLease(pb.RenewLeaseRequest(lease_id=answer.lease.id)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_revoked_lease_is_forgotten_after_keep_revoked_days_but_not_its_audit(
    make_broker: Callable[..., Awaitable[Running]], server: Server
) -> None:
    now = [dt.datetime.now(dt.UTC)]
    running = await make_broker(egress=EgressSettings(allow_loopback=True), leases=FAST, clock=lambda: now[0])
    connection_id = await dynamic_connection(running, server)
    answer = await running.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    await running.resolver().RevokeLease(pb.RevokeLeaseRequest(lease_id=answer.lease.id))
    await asyncio.sleep(FAST.reconcile_seconds * 2)  # the reconciler's pass prunes, and kept it
    assert (await lease_state(running, answer.lease.id)).state == pb.LEASE_STATE_REVOKED
    now[0] += dt.timedelta(days=FAST.keep_revoked_days, seconds=1)

    async def forgotten() -> bool:
        return not (await running.admin().ListLeases(pb.ListLeasesRequest())).leases

    await wait_for(forgotten, FAST.reconcile_seconds * 2 + 2, "the revoked lease pruned")
    audit = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(connection_id=connection_id))
    assert {"lease.create", "lease.revoke", "lease.revoked"} <= {event.action for event in audit.events}


async def test_an_expired_lease_is_dropped_by_the_worker(broker: Running, server: Server) -> None:
    connection_id = await dynamic_connection(broker, server, default_ttl=1)
    answer = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    user, password = answer.config["username"], answer.secrets["password"]
    assert await server.can_log_in(user, password)

    async def gone() -> bool:
        return not await server.can_log_in(user, password)

    await wait_for(gone, 5, "the expired lease's user dropped")

    async def recorded() -> bool:  # the drop comes first, then its record
        return (await lease_state(broker, answer.lease.id)).state == pb.LEASE_STATE_REVOKED

    await wait_for(recorded, 5, "the lease recorded revoked")
    assert (await lease_state(broker, answer.lease.id)).revoke_reason == "expired"


async def test_revoking_the_grant_or_the_connection_ends_their_leases(
    broker: Running, server: Server
) -> None:
    connection_id = await dynamic_connection(broker, server)
    mine = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    theirs = await broker.resolver("executor2").Resolve(pb.ResolveRequest(connection_id=connection_id))
    await broker.admin().RevokeAccess(pb.RevokeAccessRequest(connection_id=connection_id, principal=EXECUTOR))

    async def mine_gone() -> bool:
        return (await lease_state(broker, mine.lease.id)).state == pb.LEASE_STATE_REVOKED

    await wait_for(mine_gone, 5, "the lease of the revoked grant revoked")
    assert (await lease_state(broker, mine.lease.id)).revoke_reason == "grant_revoked"
    assert await server.can_log_in(theirs.config["username"], theirs.secrets["password"])
    await broker.admin().RevokeConnection(pb.RevokeConnectionRequest(id=connection_id, reason="leak"))

    async def theirs_gone() -> bool:
        return not await server.can_log_in(theirs.config["username"], theirs.secrets["password"])

    await wait_for(theirs_gone, 5, "the revoked connection's leases revoked")


async def test_revoke_leases_by_run_and_purge_waits_for_them(broker: Running, server: Server) -> None:
    connection_id = await dynamic_connection(broker, server)
    run = [
        await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id, run_id="r7"))
        for _ in range(3)
    ]
    other = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id, run_id="r8"))
    error = await rpc_error(broker.admin().RevokeLeases(pb.RevokeLeasesRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    queued = await broker.admin().RevokeLeases(pb.RevokeLeasesRequest(run_id="r7"))
    assert queued.revoked == 3

    async def run_gone() -> bool:
        return not (await users_named(server.prefix)) & {a.config["username"] for a in run}

    await wait_for(run_gone, 5, "the run's users dropped")
    assert await server.can_log_in(other.config["username"], other.secrets["password"])
    await broker.admin().DeleteConnection(pb.DeleteConnectionRequest(id=connection_id))

    async def other_gone() -> bool:
        return not await server.can_log_in(other.config["username"], other.secrets["password"])

    await wait_for(other_gone, 5, "a deleted connection's leases revoked")
    await broker.admin().PurgeConnection(pb.PurgeConnectionRequest(id=connection_id))


async def test_a_drop_that_fails_is_retried_and_purge_waits_for_it(broker: Running, server: Server) -> None:
    connection_id = await dynamic_connection(broker, server)
    answer = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    # The stored administrator's password goes wrong: every drop fails until it is put right.
    await broker.admin().UpdateConnection(
        pb.UpdateConnectionRequest(id=connection_id, secrets={"password": "wrong"})
    )
    revoking = await broker.resolver().RevokeLease(pb.RevokeLeaseRequest(lease_id=answer.lease.id))
    assert revoking.state == pb.LEASE_STATE_REVOKING and revoking.last_error == "auth_failed"
    assert await server.can_log_in(answer.config["username"], answer.secrets["password"])

    async def retried() -> bool:
        return (await lease_state(broker, answer.lease.id)).revocation_attempts >= 3

    await wait_for(retried, 5, "the failed drop retried")
    await broker.admin().DeleteConnection(pb.DeleteConnectionRequest(id=connection_id))
    error = await rpc_error(broker.admin().PurgeConnection(pb.PurgeConnectionRequest(id=connection_id)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "being dropped" in error.details()
    assert "--abandon" in error.details()
    await broker.admin().RestoreConnection(pb.RestoreConnectionRequest(id=connection_id))
    await broker.admin().UpdateConnection(
        pb.UpdateConnectionRequest(id=connection_id, secrets={"password": server.canary})
    )

    async def dropped() -> bool:
        return (await lease_state(broker, answer.lease.id)).state == pb.LEASE_STATE_REVOKED

    await wait_for(dropped, 5, "the drop done once the password is right")
    assert not await server.can_log_in(answer.config["username"], answer.secrets["password"])


async def test_the_reconciler_drops_prefixed_users_without_a_lease_and_nothing_else(
    broker: Running, server: Server
) -> None:
    connection_id = await dynamic_connection(broker, server)
    await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))  # a live lease
    orphan = f"{server.prefix}{secrets.token_hex(8)}"
    odd = f"{server.prefix}admin"  # the prefix, but not a name the broker makes
    await _as_root(
        f"CREATE USER `{orphan}`@'%' IDENTIFIED BY 'x'", f"CREATE USER `{odd}`@'%' IDENTIFIED BY 'x'"
    )
    try:

        async def orphan_gone() -> bool:
            return orphan not in await users_named(server.prefix)

        await wait_for(orphan_gone, 5, "the orphan dropped by the reconciler")
        names = await users_named(server.prefix)
        assert odd in names
        live = await broker.admin().ListLeases(pb.ListLeasesRequest(connection_id=connection_id))
        assert {lease.username for lease in live.leases} <= names
    finally:
        await _as_root(f"DROP USER IF EXISTS `{odd}`@'%'", f"DROP USER IF EXISTS `{orphan}`@'%'")


async def test_the_administrators_password_never_comes_back(broker: Running, server: Server) -> None:
    """Invariant: a dynamic connection's stored credential is never released, by any path."""
    connection_id = await dynamic_connection(broker, server)
    seen: list[str] = []
    answer = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    seen.append(str(answer))
    seen.append(str(await broker.resolver().RenewLease(pb.RenewLeaseRequest(lease_id=answer.lease.id))))
    seen.append(str(await broker.admin().GetConnection(pb.GetConnectionRequest(id=connection_id))))
    seen.append(str(await broker.admin().TestConnection(pb.TestConnectionRequest(id=connection_id))))
    seen.append(str(await broker.admin().ListLeases(pb.ListLeasesRequest())))
    seen.append(str(await broker.admin().ListAuditEvents(pb.ListAuditEventsRequest())))
    proxy_stub = broker_pb2_grpc.ProxyServiceStub(
        broker.channel(broker.identities["executor"], broker.broker.resolve_port)
    )
    proxy = await rpc_error(
        proxy_stub.ProxyHttp(pb.ProxyHttpRequest(connection_id=connection_id, method="GET", path="/"))
    )
    seen.append(proxy.details() or "")
    seen.append(broker.logs.getvalue())
    for text in seen:
        assert server.canary not in text
    assert server.admin not in str(answer.config)  # the lease's user replaced the administrator's


async def test_a_lease_never_outlives_its_grant(broker: Running, server: Server) -> None:
    connection_id = await dynamic_connection(broker, server)
    ends = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=30)
    grant = pb.GrantAccessRequest(connection_id=connection_id, principal=EXECUTOR)
    grant.expires_at.FromDatetime(ends)
    await broker.admin().GrantAccess(grant)
    answer = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    assert (
        answer.lease.expires_at.ToDatetime(dt.UTC) == ends == answer.lease.max_expires_at.ToDatetime(dt.UTC)
    )
    renewed = await broker.resolver().RenewLease(pb.RenewLeaseRequest(lease_id=answer.lease.id))
    assert renewed.expires_at.ToDatetime(dt.UTC) == ends


async def test_bad_lease_input_is_invalid_argument_naming_the_field(broker: Running) -> None:
    """On both engines a NUL would reach the store as a parameter; it is refused before."""
    cases = [
        (broker.admin().ListLeases(pb.ListLeasesRequest(principal="spiffe://x\x00")), "principal"),
        (broker.admin().ListLeases(pb.ListLeasesRequest(state=99)), "state"),
        (broker.admin().RevokeLeases(pb.RevokeLeasesRequest(username_prefix="p" * 600)), "username_prefix"),
        (broker.admin().RevokeLeases(pb.RevokeLeasesRequest(run_id="r\n1")), "run_id"),
        (broker.resolver().RenewLease(pb.RenewLeaseRequest(lease_id="lease\x00")), "lease_id"),
        (
            broker.resolver().RenewLease(pb.RenewLeaseRequest(lease_id="x", increment_seconds=-1)),
            "increment_seconds",
        ),
        (broker.resolver().RevokeLease(pb.RevokeLeaseRequest()), "lease_id"),
        (broker.resolver().Resolve(pb.ResolveRequest(name="db", run_id="r\x00")), "run_id"),
        (broker.resolver().Resolve(pb.ResolveRequest(name="db", run_id="r" * 129)), "run_id"),
    ]
    for call, field in cases:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.details())
        assert field in field_violations(error), (field, error.details())


STRICT_ADMIN_PASSWORD = "Adm1n-" + secrets.token_hex(8)  # what simple_password_check asks for


@pytest.fixture(scope="module")
def strict_mariadb() -> Iterator[int]:
    """A throwaway MariaDB with a password validation plugin: it refuses any password given as a
    hash (strict_password_validation), so it has no {{password_hash}}. Its port; an admin `adm`."""
    with throwaway_mariadb("--plugin-load-add=simple_password_check") as port:
        admin = pymysql.connect(host="127.0.0.1", port=port, user="root", password="", autocommit=True)
        try:
            with admin.cursor() as cur:
                cur.execute("CREATE DATABASE app")
                cur.execute("CREATE USER adm@'%%' IDENTIFIED BY %s", (STRICT_ADMIN_PASSWORD,))
                cur.execute("GRANT ALL PRIVILEGES ON *.* TO adm@'%' WITH GRANT OPTION")
        finally:
            admin.close()
        yield port


async def test_a_placeholder_the_server_cannot_fill_fails_the_lease_naming_it(
    broker: Running, strict_mariadb: int
) -> None:
    """The catalog cannot know the server: {{password_hash}} is accepted when the connection is
    saved, and the lease fails, UNAVAILABLE naming the placeholder, before any statement runs;
    its revocation (the default statements) still runs to the end."""
    prefix = "s" + secrets.token_hex(3) + "_"
    created = await broker.admin().CreateConnection(
        pb.CreateConnectionRequest(
            name="strict",
            type="database",
            config=struct(
                {
                    "driver": "mysql",
                    "host": "127.0.0.1",
                    "port": strict_mariadb,
                    "database": "app",
                    "username": "adm",
                    "ssl": False,
                    "dynamic": True,
                    "username_prefix": prefix,
                    "creation_statements": [
                        "CREATE USER {{name}}@'%' IDENTIFIED BY PASSWORD {{password_hash}}"
                    ],
                }
            ),
            secrets={"password": STRICT_ADMIN_PASSWORD},
        )
    )
    await broker.admin().GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    error = await rpc_error(broker.resolver().Resolve(pb.ResolveRequest(connection_id=created.id)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "invalid_config ({{password_hash}})" in (error.details() or ""), error.details()

    async def revoked() -> bool:
        page = await broker.admin().ListLeases(pb.ListLeasesRequest(connection_id=created.id))
        return [(lease.state, lease.revoke_reason) for lease in page.leases] == [
            (pb.LEASE_STATE_REVOKED, "creation_failed")
        ]

    await wait_for(revoked, 10, "the failed lease's revocation")
    conn = await aiomysql.connect(
        host="127.0.0.1", port=strict_mariadb, user="root", password="", autocommit=True
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                "SELECT COUNT(*) FROM mysql.user WHERE LEFT(User, %s) = %s", (len(prefix), prefix)
            )
            assert await cur.fetchone() == (0,)
    finally:
        conn.close()


async def test_another_tenants_leases_are_invisible(broker: Running, server: Server) -> None:
    connection_id = await dynamic_connection(broker, server)
    answer = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    theirs = await broker.admin("admin_b").ListLeases(pb.ListLeasesRequest())
    assert list(theirs.leases) == []
    queued = await broker.admin("admin_b").RevokeLeases(pb.RevokeLeasesRequest(lease_id=answer.lease.id))
    assert queued.revoked == 0
    assert await server.can_log_in(answer.config["username"], answer.secrets["password"])


async def test_leases_of_a_database_gone_for_good_can_be_abandoned_and_the_connection_purged(
    broker: Running, server: Server
) -> None:
    connection_id = await dynamic_connection(broker, server)
    answer = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    await broker.admin().UpdateConnection(
        pb.UpdateConnectionRequest(id=connection_id, secrets={"password": "wrong"})
    )  # every drop fails from now on, as if the database were gone
    await broker.admin().DeleteConnection(pb.DeleteConnectionRequest(id=connection_id))
    error = await rpc_error(broker.admin().PurgeConnection(pb.PurgeConnectionRequest(id=connection_id)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    abandon = pb.RevokeLeasesRequest(connection_id=connection_id, abandon=True)
    assert (await broker.admin().RevokeLeases(abandon)).revoked == 1
    state = await lease_state(broker, answer.lease.id)
    assert state.state == pb.LEASE_STATE_REVOKED and state.revoke_reason == "abandoned"
    await broker.admin().PurgeConnection(pb.PurgeConnectionRequest(id=connection_id))
    events = await broker.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="lease.abandon"))
    assert [e.connection_id for e in events.events] == [connection_id]
    # Abandoned means left as it is: the user is still there, for someone to remove by hand.
    assert await server.can_log_in(answer.config["username"], answer.secrets["password"])


async def test_a_legacy_revocation_statement_asking_for_the_password_still_drops_the_user(
    make_broker: Callable[..., Awaitable[Running]], server: Server
) -> None:
    """A row saved before the catalog refused {{password}} outside creation_statements: the broker
    keeps no password, so those statements can never run. The user is dropped with the driver's
    default revocation instead (never retried forever, never left behind), and the lease's
    audit event says so, naming the placeholder."""
    # No kept sessions: the drop must read the row as it is now.
    running = await make_broker(
        egress=EgressSettings(allow_loopback=True), leases=dataclasses.replace(FAST, admin_idle_seconds=0)
    )
    connection_id = await dynamic_connection(running, server)
    answer = await running.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    assert await server.can_log_in(answer.config["username"], answer.secrets["password"])
    legacy = ["SET PASSWORD FOR {{name}}@'%' = PASSWORD({{password}})", "DROP USER {{name}}@'%'"]
    # As an older broker stored them (and the start-up re-seal bound them): not tampering.
    keyring = running.broker.settings.load_keyring()
    path = running.broker.settings.storage_path
    # Off the event loop: the broker runs on it, and may be inside a write this waits for.
    await asyncio.to_thread(
        set_stored_config_sealed, path, connection_id, "revocation_statements", legacy, keyring
    )

    revoked = await running.resolver().RevokeLease(pb.RevokeLeaseRequest(lease_id=answer.lease.id))

    assert (revoked.state, revoked.revoke_reason) == (pb.LEASE_STATE_REVOKED, "revoked"), revoked
    assert not await server.can_log_in(answer.config["username"], answer.secrets["password"])
    assert answer.config["username"] not in await users_named(server.prefix)
    events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="lease.revoked"))
    (event,) = [e for e in events.events if e.details.get("lease_id") == answer.lease.id]
    assert dict(event.details) == {
        "lease_id": answer.lease.id,
        "username": answer.config["username"],
        "revocation_statements": "default",
        "unusable_placeholder": "{{password}}",
    }
    assert "lease_revocation_statements_unusable" in running.logs.getvalue()


async def test_revocation_statements_the_server_keeps_rejecting_give_way_to_the_default_drop(
    broker: Running, server: Server
) -> None:
    """The connection's own revocation fails at the server every time (here: a table that does not
    exist). The user cannot log in meanwhile (its account is locked first), and on the third try
    the driver's default drop runs instead: the user does not outlive its lease
    (DESIGN.md invariant 11), and the lease's audit event says what ran and why."""
    rejected = ["SELECT * FROM no_such_table", "DROP USER IF EXISTS {{name}}@'%'"]
    connection_id = await dynamic_connection(broker, server, revocation_statements=rejected)
    answer = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    username, password = answer.config["username"], answer.secrets["password"]
    assert await server.can_log_in(username, password)

    revoking = await broker.resolver().RevokeLease(pb.RevokeLeaseRequest(lease_id=answer.lease.id))

    assert (revoking.state, revoking.last_error) == (pb.LEASE_STATE_REVOKING, "statement_failed")
    assert username in await users_named(server.prefix)  # kept for now, but locked
    assert not await server.can_log_in(username, password)

    async def revoked() -> bool:
        return (await lease_state(broker, answer.lease.id)).state == pb.LEASE_STATE_REVOKED

    await wait_for(revoked, 10, "the default drop on the third try")
    assert username not in await users_named(server.prefix)
    assert (await lease_state(broker, answer.lease.id)).revocation_attempts == 2
    events = await broker.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="lease.revoked"))
    (event,) = [e for e in events.events if e.details.get("lease_id") == answer.lease.id]
    assert dict(event.details) == {
        "lease_id": answer.lease.id,
        "username": username,
        "revocation_statements": "default",
        "own_statements_failed": "1146",  # ER_NO_SUCH_TABLE
    }
    assert "lease_revocation_statements_rejected" in broker.logs.getvalue()


async def test_revocation_statements_refused_for_a_lock_are_retried_not_replaced(
    broker: Running, server: Server
) -> None:
    """A lock wait that times out (1205) says nothing about the statements: they are retried as
    they are, however many tries it takes, and never give way to the default drop."""
    statements = [
        "SET SESSION innodb_lock_wait_timeout = 1",
        f"SELECT x FROM `{server.database}`.granted FOR UPDATE",
        "DROP USER IF EXISTS {{name}}@'%'",
    ]
    connection_id = await dynamic_connection(broker, server, revocation_statements=statements)
    answer = await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    username = answer.config["username"]
    holder = await aiomysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=False)
    try:
        async with holder.cursor() as cur:
            await cur.execute(f"SELECT x FROM `{server.database}`.granted FOR UPDATE")
        await broker.resolver().RevokeLease(pb.RevokeLeaseRequest(lease_id=answer.lease.id))

        async def tried_often() -> bool:
            return (
                await lease_state(broker, answer.lease.id)
            ).revocation_attempts >= OWN_REVOCATION_TRIES + 1

        await wait_for(tried_often, 20, "tries past the point where a refusal gives way")
        lease = await lease_state(broker, answer.lease.id)
        assert (lease.state, lease.last_error) == (pb.LEASE_STATE_REVOKING, "statement_failed")
        assert username in await users_named(server.prefix)
    finally:
        await holder.rollback()
        holder.close()

    async def revoked() -> bool:
        return (await lease_state(broker, answer.lease.id)).state == pb.LEASE_STATE_REVOKED

    await wait_for(revoked, 10, "the connection's own statements, once the lock is gone")
    assert username not in await users_named(server.prefix)
    events = await broker.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="lease.revoked"))
    (event,) = [e for e in events.events if e.details.get("lease_id") == answer.lease.id]
    assert dict(event.details) == {"lease_id": answer.lease.id, "username": username}


async def test_the_reconciler_drops_an_orphan_even_when_the_revocation_statements_are_refused(
    broker: Running, server: Server
) -> None:
    """An orphan (no lease accounts for it) has no lease to retry through: when the connection's own
    revocation statements are refused, the reconciler drops it with the driver's default."""
    rejected = ["SELECT * FROM no_such_table", "DROP USER IF EXISTS {{name}}@'%'"]
    connection_id = await dynamic_connection(broker, server, revocation_statements=rejected)
    # The reconciler visits the databases of connections that have leases.
    await broker.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    orphan = f"{server.prefix}{secrets.token_hex(8)}"
    await _as_root(f"CREATE USER `{orphan}`@'%' IDENTIFIED BY 'x'")
    try:

        async def orphan_gone() -> bool:
            return orphan not in await users_named(server.prefix)

        await wait_for(orphan_gone, 5, "the orphan dropped by the reconciler")
        assert "lease_revocation_statements_rejected" in broker.logs.getvalue()
    finally:
        await _as_root(f"DROP USER IF EXISTS `{orphan}`@'%'")
