"""Cutting a principal off at once (`RevokeAccess` with `every_connection`): its certificate or
machine is compromised, and the broker reads no revocation list.

On a broker whose store is a fresh PostgreSQL database, with leases made in the local PostgreSQL
(as in test_lease_replicas.py): every grant of the principal goes in one call, every Resolve of
theirs is refused as after a single ungrant (a cached answer included), their leases are revoked
and their users dropped, one audit event names each grant; another principal of the tenant and the
same-named principal of another tenant keep working. Input errors (on SQLite) change nothing.

The lease part is skipped without BROKER_TEST_POSTGRES_DSN (CI sets it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.config import LeaseSettings
from broker.egress import EgressSettings
from broker.model import GrantFilter
from broker.store.postgres import PostgresStore
from tests.conftest import Running
from tests.helpers import EXECUTOR, EXECUTOR2, EXECUTOR_B, db_request, field_violations, rpc_error, struct
from tests.integration.test_store import TENANT, create, make_event, make_grant
from tests.postgres_db import Roles, fresh_database, lease_roles

pytestmark = pytest.mark.integration

EVERYWHERE = pb.RevokeAccessRequest(principal=EXECUTOR, every_connection=True)


@pytest.fixture(scope="module")
def roles() -> Iterator[Roles]:
    with lease_roles("cut") as found:
        yield found


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with fresh_database() as dsn:
        yield dsn


@pytest.fixture
async def broker(database: str, roles: Roles, make_broker: Callable[..., Awaitable[Running]]) -> Running:
    return await make_broker(
        storage_path=None,
        storage_url=database,
        storage_pool_max=4,
        egress=EgressSettings(allow_loopback=True),
        leases=LeaseSettings(
            poll_seconds=0.05, min_retry_seconds=0.1, max_retry_seconds=0.5, reconcile_seconds=3600
        ),
    )


async def dynamic_connection(running: Running, roles: Roles, name: str) -> str:
    """A PostgreSQL connection whose Resolve is a lease, granted to EXECUTOR and EXECUTOR2."""
    config = {
        "driver": "postgresql", "host": "127.0.0.1", "port": 5432, "database": "postgres",
        "username": "postgres", "dynamic": True, "group_role": roles.group,
        "username_prefix": roles.prefix, "default_ttl": 600, "max_ttl": 1200,
    }  # fmt: skip
    created = await running.admin().CreateConnection(
        pb.CreateConnectionRequest(
            name=name,
            type="database",
            config=struct(config),
            secrets={"password": "unused-the-server-trusts-loopback"},
        )
    )
    for principal in (EXECUTOR, EXECUTOR2):
        await running.admin().GrantAccess(
            pb.GrantAccessRequest(connection_id=created.id, principal=principal)
        )
    return str(created.id)


async def refusal(running: Running, connection_id: str) -> tuple[grpc.StatusCode, str]:
    """How Resolve refuses EXECUTOR, the connection's id taken out of the message."""
    error = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id)))
    return error.code(), error.details().replace(connection_id, "ID")


async def lease(running: Running, lease_id: str) -> pb.Lease:
    page = await running.admin().ListLeases(pb.ListLeasesRequest(page_size=100))
    (found,) = [one for one in page.leases if one.id == lease_id]
    return found


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.05)


async def test_every_grant_of_a_principal_goes_at_once_with_its_leases_and_nobody_elses(
    broker: Running, roles: Roles
) -> None:
    admin = broker.admin()
    dynamic = [await dynamic_connection(broker, roles, f"ledger-{i}") for i in range(3)]
    static = (await admin.CreateConnection(db_request(name="static"))).id
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=static, principal=EXECUTOR))
    # What a single ungrant makes Resolve say, to compare with.
    single = (await admin.CreateConnection(db_request(name="single"))).id
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=single, principal=EXECUTOR))
    await admin.RevokeAccess(pb.RevokeAccessRequest(connection_id=single, principal=EXECUTOR))
    after_one_ungrant = await refusal(broker, single)
    # Tenant B's executor is named `demo` too; its grant must survive tenant default's call.
    theirs = (await broker.admin("admin_b").CreateConnection(db_request(name="static"))).id
    await broker.admin("admin_b").GrantAccess(
        pb.GrantAccessRequest(connection_id=theirs, principal=EXECUTOR_B)
    )

    mine = [(await broker.resolver().Resolve(pb.ResolveRequest(connection_id=cid))).lease for cid in dynamic]
    other = (await broker.resolver("executor2").Resolve(pb.ResolveRequest(connection_id=dynamic[0]))).lease
    await broker.resolver().Resolve(pb.ResolveRequest(connection_id=static))  # now in the Resolve cache
    assert {one.username for one in [*mine, other]} <= await roles.named()

    reply = await admin.RevokeAccess(EVERYWHERE)

    assert reply.grants_removed == 4
    for cid in [*dynamic, static]:  # refused at once, the cached answer included, as after one ungrant
        assert await refusal(broker, cid) == after_one_ungrant
    assert after_one_ungrant[0] == grpc.StatusCode.PERMISSION_DENIED
    left = await admin.ListGrants(pb.ListGrantsRequest(principal=EXECUTOR))
    assert list(left.grants) == []

    async def leases_revoked() -> bool:
        states = [(await lease(broker, one.id)).state for one in mine]
        return states == [pb.LEASE_STATE_REVOKED] * len(mine)

    await wait_for(leases_revoked, 10, "the principal's leases revoked")
    assert {(await lease(broker, one.id)).revoke_reason for one in mine} == {"grant_revoked"}
    users = await roles.named()
    assert not {one.username for one in mine} & users  # their database users are gone
    assert other.username in users and (await lease(broker, other.id)).state == pb.LEASE_STATE_ACTIVE

    # One audit event per grant removed, like a single ungrant's, marked as this kind of call.
    events = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="grant.revoke", page_size=100))
    bulk = [e for e in events.events if e.details.get("every_connection") == "true"]
    assert sorted(e.connection_id for e in bulk) == sorted([*dynamic, static])
    assert {(e.actor, e.outcome, e.details["principal"]) for e in bulk} == {
        ("spiffe://broker.local/tenant/default/admin/cli", "succeeded", EXECUTOR)
    }

    # Everybody else keeps working: another executor of the tenant, and tenant B's `demo`.
    again = await broker.resolver("executor2").Resolve(pb.ResolveRequest(connection_id=dynamic[1]))
    assert again.lease.state == pb.LEASE_STATE_ACTIVE
    b_answer = await broker.resolver("executor_b").Resolve(pb.ResolveRequest(connection_id=theirs))
    assert b_answer.secrets["password"] == "hunter2"

    # Repeated: nothing left to remove is success, and writes nothing.
    assert (await admin.RevokeAccess(EVERYWHERE)).grants_removed == 0
    events_after = await admin.ListAuditEvents(
        pb.ListAuditEventsRequest(action="grant.revoke", page_size=100)
    )
    assert len(events_after.events) == len(events.events)


async def test_bad_input_names_the_field_and_changes_nothing(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request())
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    before = await admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))

    def everywhere(principal: str) -> pb.RevokeAccessRequest:
        return pb.RevokeAccessRequest(principal=principal, every_connection=True)

    named = pb.RevokeAccessRequest(connection_id=created.id, principal=EXECUTOR, every_connection=True)
    cases = [
        (named, "connection_id"),  # one grant or all of them? Refused, not guessed
        # No flag, no connection: what it always was, so an empty field never means "all".
        (pb.RevokeAccessRequest(principal=EXECUTOR), "connection_id"),
        (everywhere(""), "principal"),
        (everywhere("not-a-spiffe-id"), "principal"),
        (everywhere(EXECUTOR + "\x00"), "principal"),
        (everywhere("x" * 100_000), "principal"),
        (everywhere("spiffe://broker.local/tenant/default/admin/cli"), "principal"),
        (everywhere("spiffe://evil.example/tenant/default/executor/demo"), "principal"),
        # Another tenant's principal: the tenant is the caller's, never one the request names.
        (everywhere(EXECUTOR_B), "principal"),
    ]
    for request, field in cases:
        error = await rpc_error(admin.RevokeAccess(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert list(field_violations(error)) == [field], request
        assert len(error.details()) < 1000

    grants = await admin.ListGrants(pb.ListGrantsRequest(principal=EXECUTOR))
    assert [g.connection_id for g in grants.grants] == [created.id]
    after = await admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))
    assert list(after.events) == list(before.events)
    resolved = await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
    assert resolved.secrets["password"] == "hunter2"
    # A single ungrant answers how many it removed too.
    single = await admin.RevokeAccess(pb.RevokeAccessRequest(connection_id=created.id, principal=EXECUTOR))
    assert single.grants_removed == 1


async def test_two_replicas_cutting_the_same_principal_off_at_once_both_succeed(database: str) -> None:
    """`brokerctl ungrant --all` sent twice at once, through two replicas whose plans read the
    grants in opposite orders (one by the principal's index, one in table order, laid out in
    reverse): neither call is aborted as a deadlock victim (UNAVAILABLE); each grant goes once."""
    by_index = PostgresStore(database + "?enable_seqscan=off&enable_bitmapscan=off", pool_max=2)
    by_table = PostgresStore(
        database + "?enable_indexscan=off&enable_indexonlyscan=off&enable_bitmapscan=off", pool_max=2
    )
    await by_index.open()
    await by_table.open()
    try:
        connections = sorted([(await create(by_index)).id for _ in range(150)], reverse=True)
        for attempt in range(6):
            principal = f"spiffe://example.org/tenant/{TENANT}/executor/cut{attempt}"
            for connection_id in connections:  # table order: the reverse of the index's
                await by_index.put_grant(make_grant(connection_id, principal), make_event(action="grant.put"))
            template = make_event(action="grant.revoke", connection_id="", details={"principal": principal})
            first, second = await asyncio.gather(
                by_index.delete_principal_grants(TENANT, principal, template),
                by_table.delete_principal_grants(TENANT, principal, template),
            )
            assert sorted(first + second) == sorted(connections), attempt
            assert await by_index.list_grants(TENANT, GrantFilter(principal=principal), 10, None) == []
    finally:
        await by_index.close()
        await by_table.close()


async def test_a_grant_revoked_while_its_lease_is_being_created_leaves_no_user_behind(
    broker: Running, roles: Roles
) -> None:
    """The grant goes while the lease's user is being created (a slow creation statement): the
    Resolve is refused, and the lease is revoked and its user dropped at once, not at the next
    reconciliation (an hour here)."""
    config = {
        "driver": "postgresql", "host": "127.0.0.1", "port": 5432, "database": "postgres",
        "username": "postgres", "dynamic": True, "group_role": roles.group,
        "username_prefix": roles.prefix, "default_ttl": 600, "max_ttl": 1200,
        "creation_statements": [
            "CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}}",
            "SELECT pg_sleep(1.5)",
        ],
    }  # fmt: skip
    admin = broker.admin()
    created = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="slow", type="database", config=struct(config), secrets={"password": "unused"}
        )
    )
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))

    async def resolve() -> pb.ResolveResponse:
        return await broker.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))

    resolving = asyncio.create_task(resolve())

    async def creating() -> bool:
        page = await admin.ListLeases(pb.ListLeasesRequest(connection_id=created.id))
        return [lease.state for lease in page.leases] == [pb.LEASE_STATE_CREATING]

    await wait_for(creating, 5, "the lease being created")
    await admin.RevokeAccess(pb.RevokeAccessRequest(connection_id=created.id, principal=EXECUTOR))

    error = await rpc_error(resolving)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()

    async def dropped() -> bool:
        page = await admin.ListLeases(pb.ListLeasesRequest(connection_id=created.id))
        return [(lease.state, lease.revoke_reason) for lease in page.leases] == [
            (pb.LEASE_STATE_REVOKED, "grant_revoked")
        ]

    await wait_for(dropped, 10, "the lease revoked")
    (lease,) = (await admin.ListLeases(pb.ListLeasesRequest(connection_id=created.id))).leases
    assert lease.username not in await roles.named()
    events = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="lease.create"))
    assert [(e.outcome, e.reason) for e in events.events if e.connection_id == created.id] == [
        ("failed", "grant_revoked")
    ]
