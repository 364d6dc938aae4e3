"""Leases on a real PostgreSQL that checks passwords, against `broker serve` in a subprocess: expired
credentials stop logging in within the reconciler's period, renew extends them but never past
max_ttl, revocations due during a database outage wait (visible in ListLeases and /metrics) and
all complete once it returns, and a `kill -9` in the middle of creating users leaves no orphan
after restart. The stored administrator's password (a canary) never reaches the broker's log.

The database is a throwaway cluster (scram for every login; tests/pg_cluster.py) with an
administrator that has CREATEROLE, not a superuser, and a group role with SELECT on one table.
Each test's connection has its own user name prefix, so `pg_roles` answers for that test alone.
The broker's own store is SQLite. Everything (cluster, processes, files) goes at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from tests.helpers import EXECUTOR, EXECUTOR2, rpc_error, struct
from tests.pg_cluster import Cluster, throwaway_cluster
from tests.processes import PROBE, Served, prepare, without_broker_variables

pytestmark = pytest.mark.e2e

ADMIN = "spiffe://broker.local/tenant/default/admin/cli"
RECONCILE_SECONDS = 1.0
LEASES = {
    "poll_seconds": 0.1,
    "min_retry_seconds": 0.1,
    "max_retry_seconds": 0.5,
    "creation_grace_seconds": 3,
    "reconcile_seconds": RECONCILE_SECONDS,
    "timeout_seconds": 2,
}
# However a session's end reaches asyncpg: AdminShutdown, a closed connection, or a refusal to use
# a connection the server's message left mid-state.
ENDED = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
# Slack on top of a deadline the broker promises: a poll, a login handshake, a loaded machine.
SLACK = 1.5


# ------------------------------------------------------------------ the database


@dataclass(frozen=True)
class Db:
    cluster: Cluster
    admin: str  # LOGIN CREATEROLE, not a superuser
    canary: str  # the admin's password: stored in the broker, never to be seen again
    group: str  # SELECT on `granted`, nothing on `other`

    async def login(self, user: str, password: str) -> Any:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=self.cluster.port,
            user=user,
            password=password,
            database="postgres",
            ssl=False,
            timeout=5,
        )

    async def superuser(self) -> Any:
        return await self.login("postgres", self.cluster.superuser_password)

    async def roles(self, prefix: str) -> dict[str, datetime | None]:
        """The roles named `prefix...`, with their VALID UNTIL."""
        conn = await self.superuser()
        try:
            rows = await conn.fetch(
                "SELECT rolname, rolvaliduntil FROM pg_roles WHERE left(rolname, char_length($1)) = $1",
                prefix,
            )
        finally:
            await conn.close()
        return {str(row["rolname"]): row["rolvaliduntil"] for row in rows}

    async def can_log_in(self, user: str, password: str) -> bool:
        try:
            conn = await self.login(user, password)
        except asyncpg.InvalidPasswordError:  # 28P01: wrong password, expired or no such role
            return False
        await conn.close()
        return True


async def _setup(db: Db) -> None:
    conn = await db.superuser()
    try:
        for template, *args in (
            ("CREATE ROLE %I LOGIN CREATEROLE PASSWORD %L", db.admin, db.canary),
            ("CREATE ROLE %I NOLOGIN", db.group),
            ("GRANT %I TO %I WITH ADMIN OPTION", db.group, db.admin),
            ("CREATE TABLE granted (x int)",),
            ("CREATE TABLE other (x int)",),
            ("INSERT INTO granted VALUES (1)",),
            ("GRANT SELECT ON granted TO %I", db.group),
        ):
            # The server's own format(): %I and %L quote the way it reads them.
            marks = "".join(f", ${i}::text" for i in range(2, len(args) + 2))
            await conn.execute(await conn.fetchval(f"SELECT format($1::text{marks})", template, *args))
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def db() -> Iterator[Db]:
    with throwaway_cluster() as cluster:
        tag = secrets.token_hex(3)
        found = Db(cluster, f"lease_admin_{tag}", "canary-" + secrets.token_hex(16), f"lease_group_{tag}")
        asyncio.run(_setup(found))
        yield found


def unique_prefix() -> str:
    return f"t{secrets.token_hex(3)}_"


# ------------------------------------------------------------------ the broker


def new_broker(root: Path) -> Served:
    """`broker serve` (not started) on SQLite in `root`, with fast lease settings and metrics."""
    prepare(
        root,
        {"probe": PROBE, "admin": ADMIN, "executor": EXECUTOR, "executor2": EXECUTOR2},
        "leases test CA",
    )
    settings = {
        "storage": {"path": "broker.db"},
        "leases": LEASES,
        "egress": {"allow_loopback": True},
        "limits": {"resolve_per_second": 1000000, "resolve_burst": 1000000},
        "monitor": {"spike_min_count": 1000000},
        "log": {"level": "debug"},  # as much in the log as it ever writes: the canary checks read it
    }
    return Served.create(root, "broker", settings, metrics=True, env=without_broker_variables())


@contextlib.contextmanager
def folder() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="broker-leases-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(db: Db) -> Iterator[Served]:
    """One broker for the tests that do not kill it."""
    with folder() as root:
        served = new_broker(root)
        try:
            served.start()
            yield served
        finally:
            served.kill()


class Api:
    """Admin and executor stubs on a served broker (channels of this test's loop)."""

    def __init__(self, served: Served) -> None:
        self._channels = {
            "admin": served.channel("admin", served.admin_addr),
            "executor": served.channel("executor", served.resolve_addr),
            "executor2": served.channel("executor2", served.resolve_addr),
        }
        self.admin = broker_pb2_grpc.AdminServiceStub(self._channels["admin"])
        self.executor = broker_pb2_grpc.ResolveServiceStub(self._channels["executor"])
        self.executor2 = broker_pb2_grpc.ResolveServiceStub(self._channels["executor2"])

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


@contextlib.asynccontextmanager
async def api_of(served: Served) -> AsyncIterator[Api]:
    api = Api(served)
    try:
        yield api
    finally:
        await api.close()


async def dynamic_connection(api: Api, db: Db, prefix: str, **config: Any) -> str:
    created = await api.admin.CreateConnection(
        pb.CreateConnectionRequest(
            name=f"pg-{prefix.rstrip('_')}",
            type="database",
            config=struct(
                {
                    "driver": "postgresql",
                    "host": "127.0.0.1",
                    "port": db.cluster.port,
                    "database": "postgres",
                    "username": db.admin,
                    "ssl": False,
                    "dynamic": True,
                    "group_role": db.group,
                    "username_prefix": prefix,
                }
                | config
            ),
            secrets={"password": db.canary},
        ),
        timeout=10,
    )
    for principal in (EXECUTOR, EXECUTOR2):
        await api.admin.GrantAccess(
            pb.GrantAccessRequest(connection_id=created.id, principal=principal), timeout=10
        )
    return str(created.id)


async def leases_of(api: Api, connection_id: str) -> list[pb.Lease]:
    found: list[pb.Lease] = []
    token = ""
    while True:
        page = await api.admin.ListLeases(
            pb.ListLeasesRequest(connection_id=connection_id, page_size=100, page_token=token), timeout=10
        )
        found.extend(page.leases)
        token = page.next_page_token
        if not token:
            return found


async def lease_state(api: Api, connection_id: str, lease_id: str) -> pb.Lease:
    (found,) = [lease for lease in await leases_of(api, connection_id) if lease.id == lease_id]
    return found


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"not within {within:.1f} s: {what}"
        await asyncio.sleep(0.1)


def utc(timestamp: Any) -> datetime:
    return timestamp.ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (any labels) in a /metrics text."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def metrics_text(served: Served) -> str:
    with urllib.request.urlopen(served.metrics_url, timeout=5) as reply:
        return str(reply.read().decode())


# ------------------------------------------------------------------ the tests


async def test_expired_credentials_stop_logging_in_within_the_reconcilers_period(
    broker: Served, db: Db
) -> None:
    prefix = unique_prefix()
    async with api_of(broker) as api:
        connection_id = await dynamic_connection(api, db, prefix, default_ttl=2, max_ttl=10)
        answer = await api.executor.Resolve(pb.ResolveRequest(connection_id=connection_id), timeout=10)
        user, password = answer.config["username"], answer.secrets["password"]
        assert user.startswith(prefix) and user != db.admin
        # A session opened before expiry, kept open: VALID UNTIL alone would let it run on.
        session = await db.login(user, password)
        try:
            assert await session.fetchval("SELECT x FROM granted") == 1  # what the group grants
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # and no more
                await session.fetch("SELECT x FROM other")
            assert not await db.can_log_in(user, password + "x")  # this server checks passwords

            expires_at = utc(answer.lease.expires_at)
            while await db.can_log_in(user, password):
                assert datetime.now(UTC) < expires_at + timedelta(seconds=RECONCILE_SECONDS + SLACK), (
                    f"still logs in {datetime.now(UTC) - expires_at} after expiry\n{broker.logs(tail=40)}"
                )
                await asyncio.sleep(0.1)
            # VALID UNTIL is whole seconds (rounded down): refused at most a second early, never sooner.
            assert datetime.now(UTC) >= expires_at - timedelta(seconds=1)

            async def dropped() -> bool:
                lease = await lease_state(api, connection_id, answer.lease.id)
                return lease.state == pb.LEASE_STATE_REVOKED and user not in await db.roles(prefix)

            await wait_for(
                dropped, RECONCILE_SECONDS + SLACK, "the expired lease revoked and its user dropped"
            )
            assert (await lease_state(api, connection_id, answer.lease.id)).revoke_reason == "expired"
            with pytest.raises(ENDED):  # the drop ended the open session too
                for _ in range(50):  # the backend gets SIGTERM; it may take a moment to go
                    await session.fetchval("SELECT x FROM granted")
                    await asyncio.sleep(0.05)
        finally:
            session.terminate()


async def test_renew_extends_validity_past_the_first_expiry_but_never_past_max_ttl(
    broker: Served, db: Db
) -> None:
    prefix = unique_prefix()
    async with api_of(broker) as api:
        connection_id = await dynamic_connection(api, db, prefix, default_ttl=2, max_ttl=6)
        answer = await api.executor.Resolve(pb.ResolveRequest(connection_id=connection_id), timeout=10)
        user, password, lease = answer.config["username"], answer.secrets["password"], answer.lease
        first_expiry, max_expiry = utc(lease.expires_at), utc(lease.max_expires_at)
        assert max_expiry - utc(lease.created_at) == timedelta(seconds=6)

        renewed = await api.executor.RenewLease(
            pb.RenewLeaseRequest(lease_id=lease.id, increment_seconds=4), timeout=10
        )
        assert utc(renewed.expires_at) >= first_expiry + timedelta(seconds=1.5)
        valid_until = (await db.roles(prefix))[user]
        assert valid_until is not None and valid_until > first_expiry  # moved in the database too
        # Another executor's renew or revoke is refused as if the lease did not exist.
        for call in (
            api.executor2.RenewLease(pb.RenewLeaseRequest(lease_id=lease.id), timeout=10),
            api.executor2.RevokeLease(pb.RevokeLeaseRequest(lease_id=lease.id), timeout=10),
        ):
            assert (await rpc_error(call)).code() == grpc.StatusCode.NOT_FOUND

        await asyncio.sleep(max(0.0, (first_expiry - datetime.now(UTC)).total_seconds()) + 0.5)
        assert await db.can_log_in(user, password), "renewed, yet refused after the first expiry"
        assert (await lease_state(api, connection_id, lease.id)).state == pb.LEASE_STATE_ACTIVE

        capped = await api.executor.RenewLease(
            pb.RenewLeaseRequest(lease_id=lease.id, increment_seconds=3600), timeout=10
        )
        assert utc(capped.expires_at) == max_expiry
        valid_until = (await db.roles(prefix))[user]
        assert valid_until is not None and valid_until <= max_expiry

        while await db.can_log_in(user, password):
            assert datetime.now(UTC) < max_expiry + timedelta(seconds=RECONCILE_SECONDS + SLACK), (
                "still logs in after max_ttl"
            )
            await asyncio.sleep(0.1)

        async def dropped() -> bool:
            return user not in await db.roles(prefix)

        await wait_for(dropped, RECONCILE_SECONDS + SLACK, "the user dropped at max_ttl")
        ended = await rpc_error(
            api.executor.RenewLease(pb.RenewLeaseRequest(lease_id=lease.id, increment_seconds=60), timeout=10)
        )
        assert ended.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_revocations_due_during_an_outage_wait_and_all_complete_when_the_database_returns(
    broker: Served, db: Db
) -> None:
    prefix = unique_prefix()
    async with api_of(broker) as api:
        connection_id = await dynamic_connection(api, db, prefix, default_ttl=2, max_ttl=60)
        answers = [
            await api.executor.Resolve(pb.ResolveRequest(connection_id=connection_id), timeout=10)
            for _ in range(4)
        ]
        ids = {answer.lease.id for answer in answers}
        assert set(await db.roles(prefix)) == {answer.config["username"] for answer in answers}
        failures_before = metric(metrics_text(broker), "broker_lease_revocation_failures_total")

        db.cluster.stop()
        try:
            # While it is away, a new lease or a renewal fails at once, and says why without detail.
            for call in (
                api.executor.Resolve(pb.ResolveRequest(connection_id=connection_id), timeout=10),
                api.executor.RenewLease(pb.RenewLeaseRequest(lease_id=answers[0].lease.id), timeout=10),
            ):
                error = await rpc_error(call)
                assert error.code() == grpc.StatusCode.UNAVAILABLE and "(connect_failed)" in error.details()
                assert db.canary not in error.details()
            (failed,) = [lease for lease in await leases_of(api, connection_id) if lease.id not in ids]
            assert failed.revoke_reason == "creation_failed"  # its user may exist in part: dropped too
            ids.add(failed.id)
            waiting: dict[str, pb.Lease] = {}

            async def all_waiting() -> bool:
                waiting.clear()
                for lease in await leases_of(api, connection_id):
                    if lease.state == pb.LEASE_STATE_REVOKING and lease.revocation_attempts >= 2:
                        waiting[lease.id] = lease
                return set(waiting) == ids

            await wait_for(all_waiting, 8, "every lease due in the outage revoking, retried")
            assert {lease.last_error for lease in waiting.values()} == {"connect_failed"}
            reasons = sorted(lease.revoke_reason for lease in waiting.values())
            assert reasons == ["creation_failed"] + ["expired"] * 4
            text = metrics_text(broker)
            assert metric(text, "broker_lease_revocations_pending") >= 5, text
            failures = metric(text, "broker_lease_revocation_failures_total")
            assert failures - failures_before >= 10, text
            assert 'broker_lease_revocation_failures_total{reason="connect_failed"}' in text

            async def retried_again() -> bool:  # never gives up while the database is away
                now = {lease.id: lease for lease in await leases_of(api, connection_id)}
                return all(
                    now[i].state == pb.LEASE_STATE_REVOKING
                    and now[i].revocation_attempts > waiting[i].revocation_attempts
                    for i in ids
                )

            await wait_for(retried_again, 3, "the attempts growing")
        finally:
            db.cluster.start()

        async def all_revoked() -> bool:
            states = {lease.state for lease in await leases_of(api, connection_id)}
            return states == {pb.LEASE_STATE_REVOKED} and not await db.roles(prefix)

        # max_retry_seconds (0.5) after the database returns, plus the drops themselves.
        await wait_for(all_revoked, 5, "every waiting revocation done and no user left")
        for answer in answers:
            assert not await db.can_log_in(answer.config["username"], answer.secrets["password"])

        async def nothing_pending() -> bool:
            return metric(metrics_text(broker), "broker_lease_revocations_pending") == 0

        await wait_for(nothing_pending, 3, "broker_lease_revocations_pending back to 0")


async def test_kill_9_while_creating_users_leaves_no_orphan_after_restart(db: Db) -> None:
    prefix = unique_prefix()
    with folder() as root:
        served = new_broker(root)
        try:
            served.start()
            async with api_of(served) as api:
                connection_id = await dynamic_connection(api, db, prefix, default_ttl=60, max_ttl=120)
                issued: list[pb.ResolveResponse] = []
                stop = asyncio.Event()

                async def resolve_until_killed() -> None:
                    while not stop.is_set():
                        try:
                            answer = await api.executor.Resolve(
                                pb.ResolveRequest(connection_id=connection_id), timeout=10
                            )
                        except grpc.aio.AioRpcError:
                            return  # the broker is gone (or refused: the state checks below still hold)
                        issued.append(answer)

                # 30 Resolves in flight at any time (the cluster allows 100 connections).
                burst = [asyncio.create_task(resolve_until_killed()) for _ in range(30)]
                try:

                    async def thirty_issued() -> bool:
                        return len(issued) >= 30

                    await wait_for(thirty_issued, 20, "30 leases issued")
                    served.kill()
                finally:
                    stop.set()
                    await asyncio.wait_for(asyncio.gather(*burst, return_exceptions=True), 15)
            await asyncio.sleep(0.5)  # sessions of the dead process: the server rolls them back

            # Before the restart: what the kill left in the store (read as a file, the broker is dead).
            with contextlib.closing(sqlite3.connect(root / "broker.db")) as store:
                rows = store.execute("SELECT username, state FROM leases").fetchall()
            states = {state: sum(1 for _, s in rows if s == state) for _, state in rows}
            assert states.get("creating", 0) >= 1, f"the kill fell between creations: {states}"
            # Users made but never activated: the orphans the restart has to find (often a few).
            orphans = set(await db.roles(prefix)) - {name for name, state in rows if state == "active"}

            served.start()
            async with api_of(served) as api:

                async def settled() -> bool:
                    leases = await leases_of(api, connection_id)
                    active = {lease.username for lease in leases if lease.state == pb.LEASE_STATE_ACTIVE}
                    ended = {lease.state for lease in leases} <= {
                        pb.LEASE_STATE_ACTIVE,
                        pb.LEASE_STATE_REVOKED,
                    }
                    return ended and set(await db.roles(prefix)) == active

                # creation_grace_seconds (3), then the drops, then one reconcile (1).
                await wait_for(
                    settled,
                    3 + 2 * RECONCILE_SECONDS + 2 * SLACK,
                    f"no orphan, no lease stuck (after the kill: {states}, {len(orphans)} orphans)",
                )
                leases = {lease.username: lease for lease in await leases_of(api, connection_id)}
                # What the executors were given before the kill is still theirs, and still works.
                for answer in issued:
                    assert leases[answer.config["username"]].state == pb.LEASE_STATE_ACTIVE
                assert await db.can_log_in(issued[0].config["username"], issued[0].secrets["password"])
                abandoned = [
                    lease for lease in leases.values() if lease.revoke_reason == "creation_abandoned"
                ]
                assert len(abandoned) == states["creating"], (
                    states,
                    [lease.state for lease in leases.values()],
                )
            assert db.canary not in served.logs()
        finally:
            served.kill()


async def test_the_reconciler_drops_prefixed_login_roles_without_a_lease_and_nothing_else(
    broker: Served, db: Db
) -> None:
    prefix = unique_prefix()
    async with api_of(broker) as api:
        connection_id = await dynamic_connection(api, db, prefix, default_ttl=60, max_ttl=60)
        live = await api.executor.Resolve(pb.ResolveRequest(connection_id=connection_id), timeout=10)
        # An orphan (a name the broker would make, no lease), and two it must leave alone: a name
        # it never makes, and a role that cannot log in.
        orphan, odd, group = (
            f"{prefix}{secrets.token_hex(8)}",
            f"{prefix}admin",
            f"{prefix}{secrets.token_hex(8)}",
        )
        conn = await db.superuser()
        try:
            for name, login in ((orphan, "LOGIN"), (odd, "LOGIN"), (group, "NOLOGIN")):
                await conn.execute(
                    await conn.fetchval(f"SELECT format('CREATE ROLE %I {login}', $1::text)", name)
                )

            async def orphan_gone() -> bool:
                return orphan not in await db.roles(prefix)

            await wait_for(orphan_gone, RECONCILE_SECONDS + SLACK, "the orphan dropped by the reconciler")
            assert set(await db.roles(prefix)) == {live.config["username"], odd, group}
            assert await db.can_log_in(live.config["username"], live.secrets["password"])
        finally:
            for name in (odd, group, orphan):
                await conn.execute(
                    await conn.fetchval("SELECT format('DROP ROLE IF EXISTS %I', $1::text)", name)
                )
            await conn.close()
        await api.executor.RevokeLease(pb.RevokeLeaseRequest(lease_id=live.lease.id), timeout=10)
        assert not await db.roles(prefix)


async def test_revoke_ends_a_session_the_leases_user_still_has_open(broker: Served, db: Db) -> None:
    """The administrator is not a superuser: it must still end the user's session, not fail to."""
    prefix = unique_prefix()
    async with api_of(broker) as api:
        connection_id = await dynamic_connection(api, db, prefix, default_ttl=60, max_ttl=60)
        answer = await api.executor.Resolve(pb.ResolveRequest(connection_id=connection_id), timeout=10)
        session = await db.login(answer.config["username"], answer.secrets["password"])
        try:
            assert await session.fetchval("SELECT x FROM granted") == 1
            revoked = await api.executor.RevokeLease(
                pb.RevokeLeaseRequest(lease_id=answer.lease.id), timeout=10
            )
            assert revoked.state == pb.LEASE_STATE_REVOKED, revoked
            with pytest.raises(ENDED):
                for _ in range(50):  # the backend gets SIGTERM; it may take a moment to go
                    await session.fetchval("SELECT x FROM granted")
                    await asyncio.sleep(0.05)
        finally:
            session.terminate()
        assert not await db.roles(prefix)


async def test_the_administrators_password_never_reaches_the_log(broker: Served, db: Db) -> None:
    """Last on the module's broker, whose log then holds all the tests' lease work (issue, renew,
    expiry, outage, retries, orphans); this one adds a drop that fails on a wrong stored password
    and succeeds once it is right again."""
    prefix = unique_prefix()
    async with api_of(broker) as api:
        connection_id = await dynamic_connection(api, db, prefix, default_ttl=60, max_ttl=60)
        answer = await api.executor.Resolve(pb.ResolveRequest(connection_id=connection_id), timeout=10)
        await api.admin.TestConnection(pb.TestConnectionRequest(id=connection_id), timeout=10)
        await api.admin.UpdateConnection(
            pb.UpdateConnectionRequest(id=connection_id, secrets={"password": "wrong"}), timeout=10
        )
        revoking = await api.executor.RevokeLease(pb.RevokeLeaseRequest(lease_id=answer.lease.id), timeout=10)
        assert revoking.state == pb.LEASE_STATE_REVOKING and revoking.last_error == "auth_failed"
        await api.admin.UpdateConnection(
            pb.UpdateConnectionRequest(id=connection_id, secrets={"password": db.canary}), timeout=10
        )

        async def dropped() -> bool:
            return not await db.roles(prefix)

        await wait_for(dropped, 3, "the drop done once the stored password is right again")
    logs = broker.logs()
    assert "lease_revocation_failed" in logs and answer.lease.id in logs  # the log does tell of leases
    assert db.canary not in logs
    assert answer.secrets["password"] not in logs
