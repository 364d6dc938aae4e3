"""Contract tests for the `Store` protocol, run against every backend in `BACKENDS`.

The first part holds for any backend (SQLite, and PostgreSQL when
BROKER_TEST_POSTGRES_DSN is set: one database per session, emptied before each
test; the PostgreSQL specifics each get a fresh database); then come PostgreSQL specifics (several
stores on one database, as several replicas would be, migrations, purge), and last
the SQLite specifics (file mode, bytes on disk, migrations, transactions broken on
purpose).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from broker.crypto.envelope import Sealed
from broker.errors import Aborted, AlreadyExists, NotFound, Unavailable
from broker.model import (
    AuditChainReport,
    AuditEvent,
    AuditFilter,
    ConnectionFilter,
    ConnectionRecord,
    ConnectionStatus,
    Grant,
    GrantFilter,
    GrantMode,
    GrantScope,
    Lease,
    LeaseFilter,
    LeaseState,
    McpTool,
    Outcome,
    PendingAuthorization,
    SecurityEvent,
    SecurityEventFilter,
    SeenFact,
    TestCategory,
    TestResult,
    TestStage,
    TestStatus,
)
from broker.store import Store
from broker.store import _chain as chain
from broker.store._migrate import load_migrations
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore
from tests.helpers import Recorder, no_seals, seal_for_pruning, trusted_seals
from tests.postgres_db import fresh_database, reset, shared_postgres, with_database  # noqa: F401 (fixture)

T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
TENANT = "acme"
OTHER = "globex"

# ------------------------------------------------------------------ fixtures


@contextlib.asynccontextmanager
async def _sqlite(request: pytest.FixtureRequest, tmp: Path) -> AsyncIterator[Store]:
    yield SqliteStore(tmp / "broker.db")


@contextlib.asynccontextmanager
async def _postgres(request: pytest.FixtureRequest, tmp: Path) -> AsyncIterator[Store]:
    # The session's database, emptied first (skipped without BROKER_TEST_POSTGRES_DSN).
    dsn = request.getfixturevalue("shared_postgres")
    await reset(dsn)
    yield PostgresStore(dsn, pool_min=1, pool_max=4)


BACKENDS: dict[
    str, Callable[[pytest.FixtureRequest, Path], contextlib.AbstractAsyncContextManager[Store]]
] = {
    "sqlite": _sqlite,
    "postgres": _postgres,
}


@pytest.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with BACKENDS[request.param](request, tmp_path) as backend:
        await backend.open()
        try:
            yield backend
        finally:
            await backend.close()


# ----------------------------------------------------------------- factories

_counter = iter(range(1, 1_000_000))


def sealed(tag: bytes = b"") -> Sealed:
    return Sealed(
        ciphertext=b"\x01CIPHERTEXT" + tag + os.urandom(32),
        wrapped_dek=b"\x01WRAPPED-DEK" + tag + os.urandom(40),
        kek_id="kek-1",
    )


def make_connection(tenant: str = TENANT, name: str | None = None, **changes: Any) -> ConnectionRecord:
    n = next(_counter)
    record = ConnectionRecord(
        id=f"conn_{n:08d}",
        tenant=tenant,
        name=name if name is not None else f"conn-{n}",
        type="postgres",
        provider="generic",
        config={"host": "db.internal", "port": 5432, "options": {"sslmode": "require"}},
        secret_fields=("password",),
        labels={"env": "prod"},
        status=ConnectionStatus.ACTIVE,
        version=1,
        secret_version=1,
        sealed=sealed(),
        created_at=T0,
        updated_at=T0,
        created_by="spiffe://example.org/tenant/acme/admin/alice",
    )
    return dataclasses.replace(record, **changes)


def make_event(tenant: str = TENANT, action: str = "connection.create", **changes: Any) -> AuditEvent:
    event = AuditEvent(
        time=T0,
        tenant=tenant,
        actor="spiffe://example.org/tenant/acme/admin/alice",
        action=action,
        outcome=Outcome.SUCCEEDED,
        request_id="req-1",
        peer="ipv4:127.0.0.1:5555",
        details={"b": "2", "a": "1"},
    )
    return dataclasses.replace(event, **changes)


def make_grant(connection_id: str, principal: str, tenant: str = TENANT, **changes: Any) -> Grant:
    grant = Grant(
        tenant=tenant,
        connection_id=connection_id,
        principal=principal,
        created_at=T0,
        created_by="spiffe://example.org/tenant/acme/admin/alice",
    )
    return dataclasses.replace(grant, **changes)


def next_version(record: ConnectionRecord, **changes: Any) -> ConnectionRecord:
    return dataclasses.replace(
        record, version=record.version + 1, updated_at=T0 + timedelta(seconds=1), **changes
    )


def soft_deleted(record: ConnectionRecord) -> ConnectionRecord:
    # As the service does it: deleted_at marks the deletion, the status is kept for a restore.
    return next_version(record, deleted_at=T0 + timedelta(seconds=1))


async def create(
    store: Store, tenant: str = TENANT, name: str | None = None, **changes: Any
) -> ConnectionRecord:
    record = make_connection(tenant, name, **changes)
    await store.create_connection(record, make_event(tenant, connection_id=record.id))
    return record


async def audit_count(store: Store, tenant: str = TENANT) -> int:
    return len(await store.list_audit(tenant, AuditFilter(), 10_000, None))


async def list_ids(store: Store, filter: ConnectionFilter, tenant: str = TENANT) -> list[str]:
    return [r.id for r in await store.list_connections(tenant, filter, 1000, None)]


# --------------------------------------------------------------- connections


async def test_create_then_get_and_find_by_name(store: Store) -> None:
    record = make_connection(
        labels={"env": "prod", "team": "data"}, last_tested_at=T0, test_status=TestStatus.SUCCESS
    )
    await store.create_connection(record, make_event(connection_id=record.id))

    got = await store.get_connection(TENANT, record.id)
    assert got == record
    assert (
        got is not None and got.created_at.tzinfo is not None and got.created_at.utcoffset() == timedelta(0)
    )
    assert await store.find_connection_by_name(TENANT, record.name) == record
    assert await store.get_connection(TENANT, "conn_missing") is None
    assert await store.find_connection_by_name(TENANT, "missing") is None

    [event] = await store.list_audit(TENANT, AuditFilter(), 10, None)
    assert event.id > 0 and len(event.hash) == 64 and len(event.prev_hash) == 64
    assert dataclasses.replace(event, id=0, hash="", prev_hash="") == make_event(connection_id=record.id)


async def test_duplicate_live_name_is_already_exists_and_writes_nothing(store: Store) -> None:
    first = await create(store, name="warehouse")
    duplicate = make_connection(name="warehouse")

    with pytest.raises(AlreadyExists, match="a connection named 'warehouse' already exists"):
        await store.create_connection(duplicate, make_event(connection_id=duplicate.id))

    assert await store.get_connection(TENANT, duplicate.id) is None
    assert await list_ids(store, ConnectionFilter()) == [first.id]
    assert await audit_count(store) == 1


async def test_same_name_in_another_tenant_is_fine(store: Store) -> None:
    await create(store, TENANT, name="warehouse")
    other = await create(store, OTHER, name="warehouse")
    assert await store.find_connection_by_name(OTHER, "warehouse") == other


async def test_name_is_free_again_after_soft_delete(store: Store) -> None:
    old = await create(store, name="warehouse")
    await store.replace_connection(soft_deleted(old), old.version, make_event(action="connection.delete"))

    new = await create(store, name="warehouse")

    assert await store.find_connection_by_name(TENANT, "warehouse") == new
    deleted = await store.get_connection(TENANT, old.id)
    assert deleted is not None and deleted.deleted_at is not None and not deleted.live
    assert await list_ids(store, ConnectionFilter(status=ConnectionStatus.DELETED)) == [old.id]


async def test_restore_into_a_taken_name_is_already_exists_and_changes_nothing(store: Store) -> None:
    old = await create(store, name="warehouse")
    deleted = soft_deleted(old)
    await store.replace_connection(deleted, old.version, make_event(action="connection.delete"))
    await create(store, name="warehouse")
    events_before = await audit_count(store)

    restored = next_version(deleted, deleted_at=None)
    with pytest.raises(AlreadyExists, match="'warehouse'"):
        await store.replace_connection(restored, deleted.version, make_event(action="connection.restore"))

    assert await store.get_connection(TENANT, old.id) == deleted
    assert await audit_count(store) == events_before


async def test_rename_onto_a_live_name_is_already_exists(store: Store) -> None:
    await create(store, name="taken")
    record = await create(store, name="mine")
    with pytest.raises(AlreadyExists):
        await store.replace_connection(next_version(record, name="taken"), record.version, make_event())
    assert await store.get_connection(TENANT, record.id) == record


async def test_replace_overwrites_row_labels_and_writes_event(store: Store) -> None:
    record = await create(store, labels={"env": "prod"})
    updated = next_version(
        record, labels={"env": "staging", "team": "x"}, config={"host": "h2"}, sealed=sealed()
    )

    await store.replace_connection(updated, record.version, make_event(action="connection.update"))

    assert await store.get_connection(TENANT, record.id) == updated
    assert await list_ids(store, ConnectionFilter(labels={"env": "prod"})) == []
    assert await list_ids(store, ConnectionFilter(labels={"env": "staging", "team": "x"})) == [record.id]
    assert [e.action for e in await store.list_audit(TENANT, AuditFilter(), 10, None)] == [
        "connection.update",
        "connection.create",
    ]


async def test_replace_with_stale_version_is_aborted_and_changes_nothing(store: Store) -> None:
    record = await create(store)
    current = next_version(record, name="renamed")
    await store.replace_connection(current, record.version, make_event(action="connection.update"))

    stale = next_version(record, name="stale-write")
    with pytest.raises(Aborted, match="another write came first"):
        await store.replace_connection(stale, record.version, make_event(action="connection.update"))

    assert await store.get_connection(TENANT, record.id) == current
    assert await audit_count(store) == 2


async def test_replace_missing_is_not_found(store: Store) -> None:
    ghost = make_connection()
    with pytest.raises(NotFound, match=f"connection {ghost.id} not found"):
        await store.replace_connection(next_version(ghost), ghost.version, make_event())
    assert await audit_count(store) == 0


async def test_record_last_used_only_moves_forward_and_keeps_version(store: Store) -> None:
    a = await create(store)
    b = await create(store)
    later, earlier = T0 + timedelta(minutes=5), T0 + timedelta(minutes=1)

    await store.record_last_used([(TENANT, a.id, later), (TENANT, b.id, earlier), (OTHER, a.id, later)])
    await store.record_last_used([(TENANT, a.id, earlier), (TENANT, b.id, later)])

    got_a = await store.get_connection(TENANT, a.id)
    got_b = await store.get_connection(TENANT, b.id)
    assert got_a is not None and got_a.last_used_at == later and got_a.version == a.version
    assert got_b is not None and got_b.last_used_at == later
    await store.record_last_used([])

    # A replace built from a read taken before the flush does not undo it.
    await store.replace_connection(next_version(a, name="renamed"), a.version, make_event())
    got_a = await store.get_connection(TENANT, a.id)
    assert got_a is not None and got_a.last_used_at == later and got_a.name == "renamed"


# ------------------------------------------------------------------- tenants


async def test_tenants_are_isolated(store: Store) -> None:
    mine = await create(store, TENANT, name="warehouse")
    await store.put_grant(make_grant(mine.id, "spiffe://x/executor/a"), make_event(action="grant.put"))

    assert await store.get_connection(OTHER, mine.id) is None
    assert await store.find_connection_by_name(OTHER, "warehouse") is None
    assert await store.list_connections(OTHER, ConnectionFilter(), 100, None) == []
    with pytest.raises(NotFound):
        hijack = dataclasses.replace(next_version(mine), tenant=OTHER)
        await store.replace_connection(hijack, mine.version, make_event(OTHER))
    with pytest.raises(NotFound):
        await store.put_grant(make_grant(mine.id, "spiffe://y/executor/b", tenant=OTHER), make_event(OTHER))
    assert await store.get_grant(OTHER, mine.id, "spiffe://x/executor/a") is None
    assert await store.list_grants(OTHER, GrantFilter(), 100, None) == []
    assert not await store.delete_grant(OTHER, mine.id, "spiffe://x/executor/a", make_event(OTHER))
    assert await store.list_audit(OTHER, AuditFilter(), 100, None) == []

    assert await store.get_connection(TENANT, mine.id) == mine
    assert await store.get_grant(TENANT, mine.id, "spiffe://x/executor/a") is not None
    assert await audit_count(store) == 2


# ------------------------------------------------------------------- listing


async def test_list_filters(store: Store) -> None:
    pg = await create(store, name="pg-main", labels={"env": "prod", "team": "data"})
    pg_staging = await create(store, name="pg-staging", labels={"env": "staging", "team": "data"})
    http = await create(store, name="http_api", type="http", provider="github", labels={"env": "prod"})
    revoked = await create(store, name="pgx", status=ConnectionStatus.REVOKED, labels={})
    wild = await create(store, name="100%_done\\x", labels={"env": "prod"})
    deleted = await create(store, name="pg-old")
    await store.replace_connection(soft_deleted(deleted), deleted.version, make_event())
    revoked_deleted = await create(store, name="pg-revoked-old", status=ConnectionStatus.REVOKED)
    await store.replace_connection(soft_deleted(revoked_deleted), revoked_deleted.version, make_event())
    purged = await create(store, name="pg-gone")
    purged_row = next_version(soft_deleted(purged), sealed=None, purged_at=T0 + timedelta(seconds=2))
    await store.replace_connection(purged_row, purged.version, make_event(), drop_grants=True)
    await create(store, OTHER, name="pg-main")

    live = sorted([pg.id, pg_staging.id, http.id, revoked.id, wild.id])
    assert await list_ids(store, ConnectionFilter()) == live
    assert await list_ids(store, ConnectionFilter(status=ConnectionStatus.ACTIVE)) == sorted(
        [pg.id, pg_staging.id, http.id, wild.id]
    )
    assert await list_ids(store, ConnectionFilter(status=ConnectionStatus.REVOKED)) == [revoked.id]
    assert await list_ids(store, ConnectionFilter(status=ConnectionStatus.DELETED)) == sorted(
        [deleted.id, revoked_deleted.id]
    )
    assert await list_ids(store, ConnectionFilter(type="http")) == [http.id]
    assert await list_ids(store, ConnectionFilter(provider="github")) == [http.id]
    assert await list_ids(store, ConnectionFilter(type="postgres", provider="github")) == []
    assert await list_ids(store, ConnectionFilter(labels={"env": "prod"})) == sorted(
        [pg.id, http.id, wild.id]
    )
    assert await list_ids(store, ConnectionFilter(labels={"env": "prod", "team": "data"})) == [pg.id]
    assert await list_ids(store, ConnectionFilter(labels={"team": "data"})) == sorted([pg.id, pg_staging.id])
    assert await list_ids(store, ConnectionFilter(labels={"env": "dev"})) == []
    assert await list_ids(store, ConnectionFilter(name_prefix="pg")) == sorted(
        [pg.id, pg_staging.id, revoked.id]
    )
    assert await list_ids(store, ConnectionFilter(name_prefix="pg-")) == sorted([pg.id, pg_staging.id])
    assert await list_ids(store, ConnectionFilter(name_prefix="PG")) == []  # case-sensitive
    # LIKE wildcards and the escape character are literal.
    assert await list_ids(store, ConnectionFilter(name_prefix="%")) == []
    assert await list_ids(store, ConnectionFilter(name_prefix="_")) == []
    assert await list_ids(store, ConnectionFilter(name_prefix="http_")) == [http.id]
    assert await list_ids(store, ConnectionFilter(name_prefix="100%_done\\")) == [wild.id]
    assert await list_ids(store, ConnectionFilter(name_prefix="100%_done\\x")) == [wild.id]
    assert await list_ids(store, ConnectionFilter(name_prefix="pg", labels={"team": "data"})) == sorted(
        [pg.id, pg_staging.id]
    )


async def test_presented_status_is_what_listing_and_counting_see(store: Store) -> None:
    # Rows in every presented status, and the overlaps `presented_status` orders (deleted over
    # revoked over suspended over expired), as the status filters and the metrics gauge see them.
    later = T0 + timedelta(seconds=1)
    rows = [
        make_connection(),
        make_connection(type="http"),
        make_connection(status=ConnectionStatus.REVOKED),
        make_connection(status=ConnectionStatus.REVOKED, suspended_at=later),
        make_connection(suspended_at=later),
        make_connection(suspended_at=later, reauth_required_at=later),
        make_connection(reauth_required_at=later),
        make_connection(deleted_at=later),
        make_connection(deleted_at=later, status=ConnectionStatus.REVOKED, suspended_at=later),
    ]
    for record in rows:
        await store.create_connection(record, make_event())
    await store.create_connection(
        make_connection(deleted_at=later, purged_at=later, sealed=None), make_event()
    )

    for status in ConnectionStatus:
        expected = sorted(r.id for r in rows if r.presented_status is status)
        assert await list_ids(store, ConnectionFilter(status=status)) == expected, status
    counted: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r.type, r.presented_status.value)
        counted[key] = counted.get(key, 0) + 1
    assert await store.count_connections() == counted  # purged rows are not counted


async def test_list_pages_through_every_row_exactly_once(store: Store) -> None:
    created = set()
    for i in range(250):
        labels = {"env": "prod"} if i % 2 else {"env": "dev"}
        created.add((await create(store, labels=labels)).id)

    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        page = await store.list_connections(TENANT, ConnectionFilter(), 100, after)
        pages += 1
        if not page:
            break
        seen += [r.id for r in page]
        after = page[-1].id
    assert pages == 4
    assert len(seen) == 250 and set(seen) == created and seen == sorted(seen)

    # Paging with a label filter stays exact too.
    prod: list[str] = []
    after = None
    while page := await store.list_connections(TENANT, ConnectionFilter(labels={"env": "prod"}), 30, after):
        prod += [r.id for r in page]
        after = page[-1].id
    assert len(prod) == 125 and len(set(prod)) == 125


async def test_limit_must_be_positive(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.list_connections(TENANT, ConnectionFilter(), 0, None)


# -------------------------------------------------------------------- grants


async def test_grants_put_get_list_and_delete(store: Store) -> None:
    a = await create(store)
    b = await create(store)
    principals = [f"spiffe://example.org/tenant/acme/executor/w{i:02d}" for i in range(5)]
    for conn in (a, b):
        for p in principals:
            await store.put_grant(make_grant(conn.id, p), make_event(action="grant.put"))

    first = await store.get_grant(TENANT, a.id, principals[0])
    assert first == make_grant(a.id, principals[0])

    # put replaces the existing grant.
    expiring = make_grant(a.id, principals[0], expires_at=T0 + timedelta(days=1), created_by="bob")
    await store.put_grant(expiring, make_event(action="grant.put"))
    assert await store.get_grant(TENANT, a.id, principals[0]) == expiring

    everything: list[tuple[str, str]] = []
    after: tuple[str, str] | None = None
    while page := await store.list_grants(TENANT, GrantFilter(), 3, after):
        everything += [(g.connection_id, g.principal) for g in page]
        after = everything[-1]
    assert everything == sorted((c.id, p) for c in (a, b) for p in principals)

    only_b = await store.list_grants(TENANT, GrantFilter(connection_id=b.id), 100, None)
    assert [g.principal for g in only_b] == principals
    by_principal = await store.list_grants(TENANT, GrantFilter(principal=principals[2]), 100, None)
    assert [g.connection_id for g in by_principal] == sorted([a.id, b.id])

    events = await audit_count(store)
    assert await store.delete_grant(TENANT, a.id, principals[1], make_event(action="grant.delete"))
    assert await store.get_grant(TENANT, a.id, principals[1]) is None
    assert await audit_count(store) == events + 1

    assert not await store.delete_grant(TENANT, a.id, principals[1], make_event(action="grant.delete"))
    assert not await store.delete_grant(
        TENANT, "conn_missing", principals[1], make_event(action="grant.delete")
    )
    assert await audit_count(store) == events + 1


async def test_every_grant_of_a_principal_goes_in_one_write_with_an_event_and_a_change_each(
    store: Store,
) -> None:
    conns = [await create(store) for _ in range(3)]
    theirs = await create(store, OTHER)
    cut, kept = (
        "spiffe://example.org/tenant/acme/executor/cut",
        "spiffe://example.org/tenant/acme/executor/kept",
    )
    for conn in conns:
        for principal in (cut, kept):
            await store.put_grant(make_grant(conn.id, principal), make_event(action="grant.put"))
    # The same principal text in another tenant's grant: never touched from this tenant.
    await store.put_grant(make_grant(theirs.id, cut, tenant=OTHER), make_event(OTHER, action="grant.put"))
    sink = Recorder()
    await store.watch(sink)
    events = await audit_count(store)

    template = make_event(action="grant.revoke", connection_id="", details={"principal": cut})
    removed = await store.delete_principal_grants(TENANT, cut, template)

    assert removed == sorted(c.id for c in conns)
    assert await store.list_grants(TENANT, GrantFilter(principal=cut), 100, None) == []
    assert len(await store.list_grants(TENANT, GrantFilter(principal=kept), 100, None)) == 3
    assert await store.get_grant(OTHER, theirs.id, cut) is not None
    audit = await store.list_audit(TENANT, AuditFilter(action="grant.revoke"), 100, None)
    assert sorted(e.connection_id for e in audit) == removed
    assert all(e.details == {"principal": cut} for e in audit)
    assert await audit_count(store) == events + 3
    # Delivered before the call returned, one per grant, as `delete_grant` announces one
    # (PostgreSQL's listener may repeat them later: harmless).
    assert {("grant", TENANT, c, cut) for c in removed} <= set(sink.calls)

    # None left: nothing removed, nothing written.
    assert await store.delete_principal_grants(TENANT, cut, template) == []
    assert await audit_count(store) == events + 3


async def test_a_grant_keeps_its_mode_and_scope_and_a_put_replaces_them(store: Store) -> None:
    conn = await create(store)
    principal = "spiffe://example.org/tenant/acme/executor/agent"
    await store.put_grant(make_grant(conn.id, principal), make_event(action="grant.put"))
    assert await store.get_grant(TENANT, conn.id, principal) == make_grant(conn.id, principal)
    assert make_grant(conn.id, principal).mode is GrantMode.RESOLVE

    proxy = make_grant(
        conn.id, principal, mode=GrantMode.PROXY, scope=GrantScope(("GET",), ("/v1/", "/user"), ())
    )
    await store.put_grant(proxy, make_event(action="grant.put"))
    assert await store.get_grant(TENANT, conn.id, principal) == proxy
    assert await store.list_grants(TENANT, GrantFilter(connection_id=conn.id), 10, None) == [proxy]

    back = make_grant(conn.id, principal)
    await store.put_grant(back, make_event(action="grant.put"))
    assert await store.get_grant(TENANT, conn.id, principal) == back


async def test_a_connection_is_read_with_one_principals_grant_on_it(store: Store) -> None:
    conn = await create(store)
    other = await create(store, OTHER)
    agent, someone = (
        "spiffe://example.org/tenant/acme/executor/agent",
        "spiffe://example.org/tenant/acme/executor/b",
    )
    scoped = make_grant(conn.id, agent, mode=GrantMode.PROXY, scope=GrantScope(("GET",), ("/v1/",), ()))
    await store.put_grant(scoped, make_event(action="grant.put"))
    await store.put_grant(make_grant(conn.id, someone), make_event(action="grant.put"))
    await store.put_grant(make_grant(other.id, agent, tenant=OTHER), make_event(OTHER, action="grant.put"))

    assert await store.get_connection_with_grant(TENANT, conn.id, agent) == (conn, scoped)
    # Another principal's grant, a principal without one, another tenant's row: never mixed up.
    assert await store.get_connection_with_grant(TENANT, conn.id, someone) == (
        conn,
        make_grant(conn.id, someone),
    )
    assert await store.get_connection_with_grant(TENANT, conn.id, "spiffe://x/none") == (conn, None)
    assert await store.get_connection_with_grant(TENANT, other.id, agent) == (None, None)
    assert await store.get_connection_with_grant(TENANT, "conn_missing", agent) == (None, None)
    assert await store.get_connection_with_grant(OTHER, other.id, agent) == (
        other,
        make_grant(other.id, agent, tenant=OTHER),
    )


async def test_grant_for_unknown_connection_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="connection conn_missing not found"):
        await store.put_grant(make_grant("conn_missing", "spiffe://x"), make_event())
    assert await audit_count(store) == 0


async def test_purge_drops_grants_and_kek_ids(store: Store) -> None:
    keep = await create(store, sealed=dataclasses.replace(sealed(), kek_id="kek-old"))
    gone = await create(store, sealed=dataclasses.replace(sealed(), kek_id="kek-new"))
    await create(store, OTHER, sealed=dataclasses.replace(sealed(), kek_id="kek-other"))
    for conn in (keep, gone):
        await store.put_grant(make_grant(conn.id, "spiffe://x"), make_event())
    assert set(await store.deks_by_kek()) == {"kek-old", "kek-new", "kek-other"}

    purged = next_version(soft_deleted(gone), sealed=None, purged_at=T0 + timedelta(seconds=2))
    await store.replace_connection(
        purged, gone.version, make_event(action="connection.purge"), drop_grants=True
    )

    assert await store.get_connection(TENANT, gone.id) == purged
    assert await store.get_grant(TENANT, gone.id, "spiffe://x") is None
    assert await store.get_grant(TENANT, keep.id, "spiffe://x") is not None
    assert set(await store.deks_by_kek()) == {"kek-old", "kek-other"}


# --------------------------------------------------------------------- audit


async def test_audit_append_and_list(store: Store) -> None:
    minute = timedelta(minutes=1)
    batch = [
        make_event(
            time=T0 + i * minute,
            action="resolve" if i % 2 else "connection.update",
            actor=f"actor-{i % 3}",
            connection_id=f"conn_{i % 4}",
            outcome=Outcome.ALLOWED,
            details={"i": str(i)},
        )
        for i in range(20)
    ]
    await store.append_audit(batch)
    await store.append_audit([])
    await store.append_audit([make_event(OTHER, time=T0)])

    events = await store.list_audit(TENANT, AuditFilter(), 100, None)
    assert [e.details["i"] for e in events] == [str(i) for i in reversed(range(20))]
    assert [e.id for e in events] == sorted((e.id for e in events), reverse=True)
    assert dataclasses.replace(events[-1], id=0, hash="", prev_hash="") == batch[0]
    # Listed events carry their link in the (global) hash chain, newest first.
    assert all(newer.prev_hash == older.hash for newer, older in itertools.pairwise(events))

    def details(filter: AuditFilter) -> list[int]:
        return [int(e.details["i"]) for e in filtered[filter]]

    filters = [
        AuditFilter(action="resolve"),
        AuditFilter(actor="actor-1"),
        AuditFilter(connection_id="conn_2"),
        AuditFilter(start_time=T0 + 5 * minute, end_time=T0 + 8 * minute),
        AuditFilter(action="resolve", connection_id="conn_1", start_time=T0 + 5 * minute),
    ]
    filtered = {f: await store.list_audit(TENANT, f, 100, None) for f in filters}
    assert details(filters[0]) == [i for i in reversed(range(20)) if i % 2]
    assert details(filters[1]) == [i for i in reversed(range(20)) if i % 3 == 1]
    assert details(filters[2]) == [i for i in reversed(range(20)) if i % 4 == 2]
    assert details(filters[3]) == [7, 6, 5]  # start inclusive, end exclusive
    assert details(filters[4]) == [17, 13, 9, 5]

    paged: list[int] = []
    before: int | None = None
    while page := await store.list_audit(TENANT, AuditFilter(), 7, before):
        paged += [e.id for e in page]
        before = page[-1].id
    assert paged == [e.id for e in events]


# ---------------------------------------------------------------------- meta


async def test_test_results_keep_the_version_and_survive_a_replace(store: Store) -> None:
    record = make_connection()
    await store.create_connection(record, make_event())
    result = TestResult(
        success=False,
        category=TestCategory.AUTH_FAILED,
        stage=TestStage.AUTHENTICATE,
        message="password authentication failed",
        details={"server_version": "16.2"},
        verified=("tcp reachable",),
        not_verified=("credentials",),
        latency_ms=12,
        tested_at=T0 + timedelta(seconds=5),
    )
    await store.record_test_result(TENANT, record.id, result, make_event(action="connection.test"))
    stored = await store.get_connection(TENANT, record.id)
    assert stored is not None
    assert (stored.version, stored.test_status, stored.last_tested_at) == (
        1,
        TestStatus.FAILED,
        result.tested_at,
    )
    assert stored.last_test == result
    # A replace built from the read before the test does not erase the result.
    await store.replace_connection(dataclasses.replace(record, version=2, name="renamed"), 1, make_event())
    after = await store.get_connection(TENANT, record.id)
    assert after is not None and after.last_test == result and after.name == "renamed"
    with pytest.raises(NotFound):
        await store.record_test_result(OTHER, record.id, result, make_event(tenant=OTHER))
    assert await audit_count(store, OTHER) == 0


async def test_mcp_tools_replace_and_list(store: Store) -> None:
    record = make_connection()
    await store.create_connection(record, make_event())
    assert await store.list_mcp_tools(TENANT, record.id) == ([], None)
    tools = [
        McpTool(
            "search", "Search the web", {"type": "object", "properties": {"q": {"type": "string"}}}, "h1"
        ),
        McpTool(
            "fetch",
            "Fetch a URL",
            {"type": "object"},
            "h2",
            title="Fetch — a page",
            annotations={"readOnlyHint": True, "openWorldHint": False, "title": "Fetcher"},
            output_schema={"type": "object", "properties": {"body": {"type": "string"}}},
            execution={"taskSupport": "optional"},
        ),
    ]
    await store.replace_mcp_tools(TENANT, record.id, tools, T0, make_event(action="mcp.refresh"))
    listed, when = await store.list_mcp_tools(TENANT, record.id)
    assert [t.name for t in listed] == ["fetch", "search"] and when == T0
    assert listed == [tools[1], tools[0]]  # the metadata as written, and none where there was none
    assert listed[1].title == "" and listed[1].annotations is None and listed[1].execution is None
    await store.replace_mcp_tools(TENANT, record.id, tools[:1], T0 + timedelta(days=1), None)
    listed, when = await store.list_mcp_tools(TENANT, record.id)
    assert [t.name for t in listed] == ["search"] and when == T0 + timedelta(days=1)
    assert await store.list_mcp_tools(OTHER, record.id) == ([], None)
    with pytest.raises(NotFound):
        await store.replace_mcp_tools(OTHER, record.id, tools, T0, None)


async def test_meta_put_get_replace(store: Store) -> None:
    assert await store.get_meta("key-check") is None
    await store.put_meta("key-check", b"\x00\x01sealed")
    assert await store.get_meta("key-check") == b"\x00\x01sealed"
    await store.put_meta("key-check", b"v2")
    assert await store.get_meta("key-check") == b"v2"


async def test_ping(store: Store) -> None:
    await store.ping()


async def test_naive_datetimes_are_refused(store: Store) -> None:
    record = make_connection(created_at=datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        await store.create_connection(record, make_event())
    assert await store.get_connection(TENANT, record.id) is None


async def test_concurrent_writes_and_reads(store: Store) -> None:
    async def writer(i: int) -> None:
        await create(store, name=f"concurrent-{i}")
        await store.append_audit([make_event(action="resolve") for _ in range(3)])

    async def reader() -> None:
        for _ in range(10):
            await store.list_connections(TENANT, ConnectionFilter(), 100, None)

    await asyncio.gather(*(writer(i) for i in range(30)), *(reader() for _ in range(5)))
    assert len(await list_ids(store, ConnectionFilter())) == 30
    assert await audit_count(store) == 30 * 4


# --------------------------------------------------------------------- oauth


def make_pending(
    state_hash: str, tenant: str = TENANT, actor: str = "alice", **changes: Any
) -> PendingAuthorization:
    pending = PendingAuthorization(
        state_hash=state_hash,
        tenant=tenant,
        actor=actor,
        connection_id="conn_pending",
        created_at=T0,
        expires_at=T0 + timedelta(minutes=10),
        sealed=sealed(),
    )
    return dataclasses.replace(pending, **changes)


async def test_oauth_state_is_taken_once_and_only_by_its_owner(store: Store) -> None:
    pending = make_pending("h1")
    await store.put_oauth_state(pending, make_event(action="oauth.begin"))
    assert set(await store.deks_by_kek()) == {"kek-1"}
    assert await audit_count(store) == 1

    assert await store.take_oauth_state("h1", OTHER, "alice") is None
    assert await store.take_oauth_state("h1", TENANT, "bob") is None
    assert await store.take_oauth_state("h1", TENANT, "alice") == pending
    assert await store.take_oauth_state("h1", TENANT, "alice") is None
    assert set(await store.deks_by_kek()) == set()


async def test_concurrent_takes_of_one_state_give_it_to_one_caller(store: Store) -> None:
    await store.put_oauth_state(make_pending("h1"), make_event())
    taken = await asyncio.gather(*(store.take_oauth_state("h1", TENANT, "alice") for _ in range(10)))
    assert sum(t is not None for t in taken) == 1


async def test_expired_oauth_states_are_forgotten(store: Store) -> None:
    for i, minutes in enumerate((0, 1, 60)):
        expires = T0 + timedelta(minutes=minutes)
        await store.put_oauth_state(make_pending(f"h{i}", expires_at=expires), make_event())
    assert await store.delete_expired_oauth_states(T0 + timedelta(minutes=1)) == 2  # expires_at <= now
    assert await store.delete_expired_oauth_states(T0 + timedelta(minutes=1)) == 0
    assert await store.take_oauth_state("h2", TENANT, "alice") is not None


async def test_list_expiring_tokens(store: Store) -> None:
    def token(minutes: int, **changes: Any) -> dict[str, Any]:
        return {
            "type": "oauth2",
            "config": {"expires_at": (T0 + timedelta(minutes=minutes)).isoformat()},
            **changes,
        }

    soon = await create(store, **token(5))
    sooner = await create(store, OTHER, **token(1))
    await create(store, **token(120))
    await create(store, **token(2, status=ConnectionStatus.REVOKED))
    await create(store, **token(2, suspended_at=T0))
    await create(store, **token(2, reauth_required_at=T0))
    await create(store)  # no token at all

    assert await store.list_expiring_tokens(T0 + timedelta(hours=1), 10) == [
        (OTHER, sooner.id),
        (TENANT, soon.id),
    ]
    assert await store.list_expiring_tokens(T0 + timedelta(hours=1), 1) == [(OTHER, sooner.id)]
    assert await store.list_expiring_tokens(T0, 10) == []


# ------------------------------------------------------------------ security


async def test_security_events_newest_first_filtered_and_paged(store: Store) -> None:
    minute = timedelta(minutes=1)
    events = [
        SecurityEvent(
            time=T0 + i * minute,
            tenant=TENANT,
            rule="failed_tests" if i % 2 else "denied_burst",
            severity="high",
            action="alerted",
            principal=f"p{i % 3}",
            connection_id=f"conn_{i % 2}",
            peer="ipv4:10.0.0.1",
            details={"i": str(i)},
        )
        for i in range(10)
    ]
    stored = [await store.add_security_event(e) for e in events]
    assert [s.id for s in stored] == sorted({s.id for s in stored}) and stored[0].id > 0
    assert all(s == dataclasses.replace(e, id=s.id) for s, e in zip(stored, events, strict=True))
    other = await store.add_security_event(dataclasses.replace(events[0], tenant=OTHER))

    listed = await store.list_security_events(TENANT, SecurityEventFilter(), 100, None)
    assert listed == list(reversed(stored))
    assert await store.list_security_events(OTHER, SecurityEventFilter(), 100, None) == [other]

    def numbers(found: list[SecurityEvent]) -> list[int]:
        return [int(e.details["i"]) for e in found]

    by_rule = await store.list_security_events(TENANT, SecurityEventFilter(rule="failed_tests"), 100, None)
    assert numbers(by_rule) == [9, 7, 5, 3, 1]
    window = SecurityEventFilter(principal="p0", start_time=T0 + 3 * minute, end_time=T0 + 9 * minute)
    assert numbers(await store.list_security_events(TENANT, window, 100, None)) == [6, 3]
    by_connection = SecurityEventFilter(connection_id="conn_0")
    assert numbers(await store.list_security_events(TENANT, by_connection, 100, None)) == [8, 6, 4, 2, 0]

    paged: list[int] = []
    before: int | None = None
    while page := await store.list_security_events(TENANT, SecurityEventFilter(), 3, before):
        paged += [e.id for e in page]
        before = page[-1].id
    assert paged == [e.id for e in listed]


async def test_seen_facts_keep_the_newest_objects_per_subject(store: Store) -> None:
    second = timedelta(seconds=1)
    facts = [SeenFact(TENANT, "peer", "p1", f"host{i}", T0 + i * second) for i in range(5)]
    facts.append(SeenFact(TENANT, "principal", "conn_1", "p1", T0))
    facts.append(SeenFact(OTHER, "peer", "p1", "host0", T0))
    await store.remember_seen(facts, keep=3)
    # Seen again later: the first sighting is kept.
    await store.remember_seen([SeenFact(TENANT, "peer", "p1", "host4", T0 + timedelta(days=1))], keep=3)
    await store.remember_seen([], keep=3)

    loaded = await store.load_seen(100)
    assert sorted(f.object for f in loaded if (f.tenant, f.kind) == (TENANT, "peer")) == [
        "host2",
        "host3",
        "host4",
    ]
    assert [f.first_seen for f in loaded] == sorted((f.first_seen for f in loaded), reverse=True)
    assert SeenFact(TENANT, "peer", "p1", "host4", T0 + 4 * second) in loaded
    assert len(loaded) == 5 and len(await store.load_seen(2)) == 2


# ------------------------------------------------------------- audit chain


async def test_export_audit_is_oldest_first_and_pages(store: Store) -> None:
    for i in range(12):
        await store.append_audit([make_event(details={"i": str(i)}), make_event(OTHER)])
    newest_first = await store.list_audit(TENANT, AuditFilter(), 100, None)

    exported: list[AuditEvent] = []
    after: int | None = None
    while page := await store.export_audit(TENANT, AuditFilter(), 5, after):
        exported += page
        after = page[-1].id
    assert exported == list(reversed(newest_first))
    assert [e.details["i"] for e in exported] == [str(i) for i in range(12)]
    window = AuditFilter(start_time=T0, end_time=T0)
    assert await store.export_audit(TENANT, window, 100, None) == []


async def test_the_chain_verifies_and_pruning_keeps_the_rest_verifiable(store: Store) -> None:
    minute = timedelta(minutes=1)
    await create(store)  # at T0
    await store.append_audit([make_event(time=T0 + i * minute, details={"i": str(i)}) for i in range(30)])
    assert await store.verify_audit_chain(no_seals) == AuditChainReport(True, 31, unsealed_events=31)

    # Pruning deletes no further than a verified seal: nothing without one.
    assert await store.prune_audit(T0 + 10 * minute, T0 + timedelta(days=1), trusted_seals) == 0
    # Everything before T0 + 10 min: the create event and events 0..9, in batches of 4, up to the
    # seal of event 11 (one of event 9 makes the bound 9).
    await seal_for_pruning(store, 9)
    await seal_for_pruning(store, 11)
    await seal_for_pruning(store, 20)
    assert (
        await store.prune_audit(T0 + 10 * minute, T0 + timedelta(days=1), trusted_seals, batch_size=4) == 11
    )
    assert await store.verify_audit_chain(trusted_seals) == AuditChainReport(
        True, 20, seals_checked=1, unsealed_events=11, newest_seal=(await store.audit_anchors()).seal
    )
    oldest = await store.export_audit(TENANT, AuditFilter(), 1, None)
    assert oldest[0].details == {"i": "10"}

    # Prune everything, then append: the new event links to the checkpoint.
    await seal_for_pruning(store)
    assert await store.prune_audit(T0 + timedelta(days=1), T0 + timedelta(days=1), trusted_seals) == 20
    assert (await store.verify_audit_chain(trusted_seals)).events_checked == 0
    await store.append_audit([make_event(time=T0 + timedelta(days=2))])
    [last] = await store.list_audit(TENANT, AuditFilter(), 10, None)
    assert last.id == 32 and last.prev_hash != chain.GENESIS
    report = await store.verify_audit_chain(no_seals)
    assert (report.ok, report.events_checked, report.unsealed_events) == (True, 1, 1)


# ------------------------------------------------------------- master keys


async def test_master_key_bookkeeping_and_rewrap(store: Store) -> None:
    def under(kek_id: str) -> Sealed:
        return dataclasses.replace(sealed(), kek_id=kek_id)

    a = await create(store, sealed=under("kek-old"))
    b = await create(store, sealed=under("kek-new"))
    c = await create(store, OTHER, sealed=under("kek-old"))
    await store.put_oauth_state(make_pending("h1", sealed=under("kek-old")), make_event())
    assert await store.deks_by_kek() == {"kek-old": 3, "kek-new": 1}

    first = await store.list_deks_not_under("kek-new", 2)
    rest = await store.list_deks_not_under("kek-new", 2, (first[-1].kind, first[-1].tenant, first[-1].key))
    found = first + rest
    assert [(d.kind, d.tenant, d.key) for d in found] == sorted(
        [("connection", TENANT, a.id), ("connection", OTHER, c.id), ("oauth_state", TENANT, "h1")]
    )
    assert found[0].secret_version == 1 and found[0].sealed == a.sealed

    rewrapped = [
        (d, Sealed(d.sealed.ciphertext, b"\x02REWRAPPED-" + d.key.encode(), "kek-new")) for d in found
    ]
    stale = dataclasses.replace(found[0], sealed=dataclasses.replace(found[0].sealed, wrapped_dek=b"other"))
    assert await store.rewrap_deks([*rewrapped, (stale, rewrapped[0][1])], {"kek-new": 3}) == 3
    assert await store.deks_by_kek() == {"kek-new": 4}
    got = await store.get_connection(TENANT, a.id)
    assert got is not None and got.version == a.version and got.sealed == rewrapped[0][1]

    # A replace built from a read before the rewrap keeps the re-wrapped key (same ciphertext)...
    await store.replace_connection(next_version(a, name="renamed"), a.version, make_event())
    got = await store.get_connection(TENANT, a.id)
    assert got is not None and got.name == "renamed" and got.sealed == rewrapped[0][1]
    # ...and one with a new secret writes its own, remembering when the old version was superseded.
    assert await store.superseded_at(TENANT, b.id, 1) is None
    resealed = next_version(b, secret_version=2, sealed=under("kek-new"))
    await store.replace_connection(resealed, b.version, make_event())
    assert await store.get_connection(TENANT, b.id) == resealed
    assert await store.superseded_at(TENANT, b.id, 1) == resealed.updated_at
    assert await store.superseded_at(OTHER, b.id, 1) is None
    assert await store.purge_superseded(resealed.updated_at) == 0
    assert await store.purge_superseded(resealed.updated_at + timedelta(seconds=1)) == 1

    assert await store.kek_wraps() == {"kek-new": 3}
    await store.add_kek_wraps({"kek-new": 2, "kek-unused": 0})
    await store.add_kek_wraps({})
    assert await store.kek_wraps() == {"kek-new": 5}


# -------------------------------------------------------------------- leases


def make_lease(username: str, tenant: str = TENANT, **changes: Any) -> Lease:
    lease = Lease(
        tenant=tenant,
        id=f"lease_{next(_counter):08d}",
        connection_id="conn_dyn",
        principal="spiffe://x/tenant/acme/executor/etl",
        username=username,
        state=LeaseState.CREATING,
        created_at=T0,
        expires_at=T0 + timedelta(hours=1),
        max_expires_at=T0 + timedelta(hours=2),
    )
    return dataclasses.replace(lease, **changes)


async def test_a_lease_is_created_activated_renewed_within_its_max_and_read_back(store: Store) -> None:
    connection = await create(store)
    lease = make_lease("brk_aaaaaaaaaaaaaaaa", run_id="run-1", connection_id=connection.id)
    await store.insert_lease(lease)
    assert await store.get_lease(TENANT, lease.id) == lease
    assert await store.get_lease(OTHER, lease.id) is None  # another tenant's looks unknown
    # Activated only while the grant it was made under exists (revoked while the user was made).
    assert not await store.activate_lease(TENANT, lease.id, [make_event(action="lease.create")])
    await store.put_grant(make_grant(connection.id, lease.principal), make_event(action="grant.put"))
    assert await store.activate_lease(TENANT, lease.id, [make_event(action="lease.create")])
    assert not await store.activate_lease(TENANT, lease.id, [make_event(action="lease.create")])
    later = T0 + timedelta(minutes=90)
    assert await store.renew_lease(TENANT, lease.id, later, T0, make_event(action="lease.renew"))
    assert (await store.get_lease(TENANT, lease.id)) == dataclasses.replace(
        lease, state=LeaseState.ACTIVE, expires_at=later
    )
    too_late = T0 + timedelta(hours=3)
    assert not await store.renew_lease(TENANT, lease.id, too_late, T0, make_event(action="lease.renew"))
    expired = T0 + timedelta(hours=2)  # at its end: too late to renew
    assert not await store.renew_lease(TENANT, lease.id, later, expired, make_event(action="lease.renew"))
    actions = [e.action for e in await store.list_audit(TENANT, AuditFilter(), 10, None)]
    assert sorted(actions) == ["connection.create", "grant.put", "lease.create", "lease.renew"]


async def test_due_leases_are_claimed_once_and_failures_retried_later(store: Store) -> None:
    due = make_lease("brk_due0000000000000", state=LeaseState.ACTIVE, expires_at=T0)
    live = make_lease("brk_live000000000000", state=LeaseState.ACTIVE)
    stuck = make_lease("brk_stuck00000000000", created_at=T0 - timedelta(minutes=5))
    fresh = make_lease("brk_fresh00000000000")  # still being created
    for lease in (due, live, stuck, fresh):
        await store.insert_lease(lease)
    now, grace = T0 + timedelta(seconds=1), T0 - timedelta(minutes=1)
    claimed = await store.claim_due_leases(now, grace, now + timedelta(minutes=1), 10)
    assert {(c.id, c.state, c.revoke_reason) for c in claimed} == {
        (due.id, LeaseState.REVOKING, "expired"),
        (stuck.id, LeaseState.REVOKING, "creation_abandoned"),
    }
    # Claimed: not handed out again while the claim lasts, nor activated by a late creator.
    assert await store.claim_due_leases(now, grace, now + timedelta(minutes=1), 10) == []
    assert not await store.activate_lease(TENANT, stuck.id, [make_event()])
    assert await store.pending_revocations(now) == 2
    await store.lease_revocation_failed(TENANT, due.id, "connect_failed", now + timedelta(seconds=5))
    assert await store.lease_revoked(TENANT, stuck.id, now, make_event(action="lease.revoked"))
    # Once only: a second worker's drop of the same lease records nothing.
    assert not await store.lease_revoked(TENANT, stuck.id, now, make_event(action="lease.revoked"))
    failed = await store.get_lease(TENANT, due.id)
    assert failed is not None and (failed.attempts, failed.last_error) == (1, "connect_failed")
    assert await store.claim_due_leases(now, grace, now + timedelta(minutes=1), 10) == []
    retry_at = now + timedelta(seconds=5)
    again = await store.claim_due_leases(retry_at, grace, retry_at + timedelta(minutes=1), 10)
    assert [c.id for c in again] == [due.id]
    revoked = await store.get_lease(TENANT, stuck.id)
    assert revoked is not None and revoked.state is LeaseState.REVOKED and revoked.revoked_at == now
    assert await store.pending_revocations(retry_at) == 1


async def test_concurrent_claims_never_share_a_lease(store: Store) -> None:
    leases = [make_lease(f"brk_{n:016d}", state=LeaseState.ACTIVE, expires_at=T0) for n in range(40)]
    for lease in leases:
        await store.insert_lease(lease)
    now = T0 + timedelta(seconds=1)
    batches = await asyncio.gather(
        *(store.claim_due_leases(now, T0, now + timedelta(minutes=1), 7) for _ in range(8))
    )
    claimed = [lease.id for batch in batches for lease in batch]
    assert sorted(claimed) == sorted(lease.id for lease in leases)  # each exactly once


async def test_revoking_by_filter_takes_only_live_matching_leases(store: Store) -> None:
    active = dict(state=LeaseState.ACTIVE)
    a = make_lease("brk_a000000000000000", run_id="r1", **active)
    b = make_lease("brk_b000000000000000", run_id="r1", principal="spiffe://x/other", **active)
    c = make_lease("brkXc000000000000000", run_id="r2", **active)  # `_` must not be a wildcard
    done = make_lease("brk_d000000000000000", run_id="r1", state=LeaseState.REVOKED)
    theirs = make_lease("brk_e000000000000000", tenant=OTHER, run_id="r1", **active)
    for lease in (a, b, c, done, theirs):
        await store.insert_lease(lease)
    event = make_event(action="lease.revoke")
    assert await store.revoke_leases(TENANT, LeaseFilter(run_id="r1"), "revoked", T0, event) == 2
    assert await store.revoke_leases(TENANT, LeaseFilter(username_prefix="brk_"), "revoked", T0, None) == 0
    assert await store.revoke_leases(TENANT, LeaseFilter(username_prefix="brkX"), "revoked", T0, None) == 1
    states = {
        lease.username: lease.state for lease in await store.list_leases(TENANT, LeaseFilter(), 10, None)
    }
    assert states == {
        a.username: LeaseState.REVOKING,
        b.username: LeaseState.REVOKING,
        c.username: LeaseState.REVOKING,
        done.username: LeaseState.REVOKED,
    }
    revoking = await store.list_leases(TENANT, LeaseFilter(state=LeaseState.REVOKING), 2, None)
    rest = await store.list_leases(TENANT, LeaseFilter(state=LeaseState.REVOKING), 2, revoking[-1].id)
    assert len(revoking) == 2 and len(rest) == 1
    assert await store.live_lease_usernames([a.username, done.username, theirs.username, "nobody"]) == {
        a.username,  # revoking: not yet dropped, so still accounted for
        theirs.username,
    }
    assert sorted(await store.lease_connections()) == [(TENANT, "conn_dyn"), (OTHER, "conn_dyn")]


async def test_revoked_leases_are_pruned_after_their_revocation_and_nothing_else(store: Store) -> None:
    old = make_lease("brk_old0000000000000", state=LeaseState.REVOKED, revoked_at=T0 - timedelta(days=31))
    theirs = make_lease(
        "brk_their00000000000", tenant=OTHER, state=LeaseState.REVOKED, revoked_at=T0 - timedelta(days=40)
    )
    recent = make_lease("brk_recent0000000000", state=LeaseState.REVOKED, revoked_at=T0 - timedelta(days=29))
    revoking = make_lease("brk_revoking00000000", state=LeaseState.REVOKING)  # a drop still owed
    active = make_lease("brk_active0000000000", state=LeaseState.ACTIVE, created_at=T0 - timedelta(days=90))
    for lease in (old, theirs, recent, revoking, active):
        await store.insert_lease(lease)
    before = T0 - timedelta(days=30)
    assert await store.prune_revoked_leases(before, 1) == 1  # in batches of `limit`
    assert await store.prune_revoked_leases(before, 10) == 1
    assert await store.prune_revoked_leases(before, 10) == 0
    left = {lease.username for lease in await store.list_leases(TENANT, LeaseFilter(), 10, None)}
    assert left == {recent.username, revoking.username, active.username}
    assert await store.list_leases(OTHER, LeaseFilter(), 10, None) == []


# -------------------------------------------------------- postgres specifics


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    async with fresh_database() as dsn:
        yield dsn


@contextlib.asynccontextmanager
async def replicas(dsn: str, count: int) -> AsyncIterator[list[PostgresStore]]:
    """`count` stores on one database, opened at once, as replicas starting together would."""
    stores = [PostgresStore(dsn, pool_min=1, pool_max=3) for _ in range(count)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        yield stores
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_postgres_replicas_migrate_once_and_share_one_audit_chain(pg_dsn: str) -> None:
    async with replicas(pg_dsn, 3) as stores:
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY version")
        finally:
            await conn.close()
        assert [(r["version"], r["name"], r["checksum"]) for r in rows] == [
            (m.version, m.name, m.checksum) for m in load_migrations("postgres")
        ]

        async def work(store: Store, i: int) -> None:
            await create(store, name=f"replica-write-{i}")
            await store.append_audit([make_event(action="resolve") for _ in range(5)])

        await asyncio.gather(*(work(stores[i % 3], i) for i in range(30)))
        assert await stores[1].verify_audit_chain(no_seals) == AuditChainReport(
            True, 180, unsealed_events=180
        )
        exported = await stores[2].export_audit(TENANT, AuditFilter(), 1000, None)
        assert [e.id for e in exported] == list(range(1, 181))


async def test_postgres_compare_and_swap_across_replicas(pg_dsn: str) -> None:
    async with replicas(pg_dsn, 2) as (one, two):
        record = await create(one)
        results = await asyncio.gather(
            one.replace_connection(next_version(record, name="by-one"), record.version, make_event()),
            two.replace_connection(next_version(record, name="by-two"), record.version, make_event()),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["Aborted", "NoneType"]
        assert await audit_count(one) == 2

        await one.put_oauth_state(make_pending("h1"), make_event())
        taken = await asyncio.gather(*(s.take_oauth_state("h1", TENANT, "alice") for s in (one, two) * 5))
        assert sum(t is not None for t in taken) == 1


async def test_postgres_refuses_edited_or_unknown_migrations(pg_dsn: str) -> None:
    async with replicas(pg_dsn, 1):
        pass
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        with pytest.raises(RuntimeError, match="0001_initial was changed after it was applied"):
            await PostgresStore(pg_dsn).open()
        await conn.execute(
            "UPDATE schema_migrations SET checksum = $1 WHERE version = 1",
            load_migrations("postgres")[0].checksum,
        )
        await conn.execute("INSERT INTO schema_migrations VALUES (9999, 'future', 'x', 0)")
        with pytest.raises(RuntimeError, match="written by a newer version"):
            await PostgresStore(pg_dsn).open()
    finally:
        await conn.close()


async def test_postgres_purge_overwrites_the_sealed_columns(pg_dsn: str) -> None:
    async with replicas(pg_dsn, 1) as (store,):
        record = await create(store)
        await store.put_grant(make_grant(record.id, "spiffe://x"), make_event())
        purged = next_version(soft_deleted(record), sealed=None, purged_at=T0 + timedelta(seconds=2))
        await store.replace_connection(purged, record.version, make_event(), drop_grants=True)
    conn = await asyncpg.connect(pg_dsn)
    try:
        row = await conn.fetchrow("SELECT ciphertext, wrapped_dek, kek_id FROM connections")
        assert tuple(row) == (None, None, None)
        assert await conn.fetchval("SELECT count(*) FROM grants") == 0
    finally:
        await conn.close()


async def test_postgres_failing_statement_rolls_back_the_whole_transaction(pg_dsn: str) -> None:
    async with replicas(pg_dsn, 1) as (store,):
        record = make_connection(labels={"env": "prod"})
        with pytest.raises(asyncpg.NotNullViolationError):
            await store.create_connection(record, make_event(actor=None))
        assert await store.get_connection(TENANT, record.id) is None
        assert await list_ids(store, ConnectionFilter(labels={"env": "prod"})) == []
        assert await audit_count(store) == 0
        await create(store, name=record.name)


async def test_postgres_cancelled_writes_are_all_or_nothing(pg_dsn: str) -> None:
    async with replicas(pg_dsn, 1) as (store,):
        for i in range(20):
            record = make_connection()
            task = asyncio.create_task(store.create_connection(record, make_event(connection_id=record.id)))
            await asyncio.sleep(i * 0.0003)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            got = await store.get_connection(TENANT, record.id)
            events = await store.list_audit(TENANT, AuditFilter(connection_id=record.id), 10, None)
            assert (got is None) == (events == [])
        await create(store)
        assert (await store.verify_audit_chain(no_seals)).ok


async def test_postgres_lost_connections_are_unavailable_then_recover(pg_dsn: str) -> None:
    async with replicas(pg_dsn, 1) as (store,):
        record = await create(store)
        admin = await asyncpg.connect(with_database(pg_dsn, "postgres"))
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND application_name LIKE 'broker/%'",
                pg_dsn.rpartition("/")[2],
            )
        finally:
            await admin.close()
        assert killed >= 1
        # Each dead pooled connection costs at most one Unavailable (reads retry once); then it serves.
        for _ in range(5):
            try:
                assert await store.get_connection(TENANT, record.id) == record
                break
            except Unavailable:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the store did not recover after its connections were terminated")

    unreachable = PostgresStore("postgresql://postgres:pw-never-shown@127.0.0.1:1/nothing")
    with pytest.raises(Unavailable) as raised:
        await unreachable.open()
    assert "pw-never-shown" not in str(raised.value) and "pw-never-shown" not in repr(unreachable)


# ------------------------------------------------------------ sqlite specifics


async def test_database_file_is_owner_only(sqlite_store: SqliteStore) -> None:
    await create(sqlite_store)
    for path in (sqlite_store.path, Path(f"{sqlite_store.path}-wal")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize("config_size", [10, 20_000], ids=["inline", "overflow-pages"])
async def test_purge_leaves_no_wrapped_key_bytes_on_disk(sqlite_store: SqliteStore, config_size: int) -> None:
    # A large config pushes the sealed columns onto overflow pages, which a purge frees.
    record = await create(
        sqlite_store, sealed=sealed(tag=b"-CANARY-7f3a9c"), config={"blob": "x" * config_size}
    )
    assert record.sealed is not None
    await create(sqlite_store)  # a neighbour on the same page
    assert record.sealed.wrapped_dek in _database_bytes(sqlite_store.path)

    purged = next_version(soft_deleted(record), sealed=None, purged_at=T0 + timedelta(seconds=2))
    await sqlite_store.replace_connection(purged, record.version, make_event(), drop_grants=True)
    _checkpoint(sqlite_store.path)

    content = _database_bytes(sqlite_store.path)
    assert record.sealed.wrapped_dek not in content
    assert record.sealed.ciphertext not in content
    assert b"-CANARY-7f3a9c" not in content


async def test_a_read_by_key_that_finds_the_database_busy_waits_on_the_readers_thread(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    # Reads by key run on the event loop's thread with no lock timeout, so they never stop the
    # loop: one that meets a lock is handed to the reader's thread, which waits (busy_timeout).
    record = await create(sqlite_store)
    locked = tmp_path / "locked.db"
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    busy = sqlite3.connect(locked, isolation_level=None, timeout=0)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        busy.execute("SELECT * FROM t")  # what the inline connection meets on a busy database
    engine = sqlite_store.engine
    inline, engine._inline = engine._inline, busy  # type: ignore[attr-defined]
    try:
        assert await sqlite_store.get_connection(TENANT, record.id) == record
        assert await sqlite_store.get_connection_with_grant(TENANT, record.id, "p") == (record, None)
    finally:
        engine._inline = inline  # type: ignore[attr-defined]
        busy.close()
        holder.close()


async def test_migrations_are_recorded_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    first = SqliteStore(path)
    await first.open()
    record = await create(first)
    await first.close()

    again = SqliteStore(path)
    await again.open()
    try:
        assert await again.get_connection(TENANT, record.id) == record
    finally:
        await again.close()
    await again.open()  # the same instance reopens too
    await again.close()

    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    db.close()
    assert rows[0] == (1, "initial")
    assert len(rows) == len({v for v, _ in rows})


@pytest.mark.parametrize("with_rows", [False, True])
async def test_an_up_to_date_store_opens_while_another_process_holds_the_write_lock(
    tmp_path: Path, with_rows: bool
) -> None:
    # `broker keys status` and `retire` open the store next to a running broker and a rewrap, which
    # take the write lock for each batch: with nothing to migrate or hash, opening takes no write lock.
    path = tmp_path / "broker.db"
    first = SqliteStore(path)
    await first.open()
    record = await create(first) if with_rows else None
    await first.close()

    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        store = SqliteStore(path, busy_timeout_ms=100)
        await store.open()
        try:
            if record is not None:
                assert await store.get_connection(TENANT, record.id) == record
        finally:
            await store.close()
    finally:
        holder.rollback()
        holder.close()


async def test_failing_statement_rolls_back_the_whole_transaction(sqlite_store: SqliteStore) -> None:
    record = make_connection(labels={"env": "prod"})
    bad_event = make_event(actor=None)  # violates NOT NULL after the connection row was written

    with pytest.raises(sqlite3.IntegrityError):
        await sqlite_store.create_connection(record, bad_event)

    assert await sqlite_store.get_connection(TENANT, record.id) is None
    assert await list_ids(sqlite_store, ConnectionFilter(labels={"env": "prod"})) == []
    assert await audit_count(sqlite_store) == 0
    await create(sqlite_store, name=record.name)  # the writer is usable again


async def test_exception_mid_transaction_rolls_back_replace(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = await create(sqlite_store, labels={"env": "prod"})
    await sqlite_store.put_grant(make_grant(record.id, "spiffe://x"), make_event())
    events = await audit_count(sqlite_store)

    async def explode(*args: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(SqliteStore, "_insert_audit", staticmethod(explode))
    purged = next_version(soft_deleted(record), sealed=None, labels={}, purged_at=T0)
    with pytest.raises(RuntimeError, match="disk on fire"):
        await sqlite_store.replace_connection(purged, record.version, make_event(), drop_grants=True)
    monkeypatch.undo()

    assert await sqlite_store.get_connection(TENANT, record.id) == record
    assert await sqlite_store.get_grant(TENANT, record.id, "spiffe://x") is not None
    assert await list_ids(sqlite_store, ConnectionFilter(labels={"env": "prod"})) == [record.id]
    assert await audit_count(sqlite_store) == events


async def test_cancelled_write_leaves_the_store_usable(sqlite_store: SqliteStore) -> None:
    # Growing delays cancel the write before, during and after its transaction.
    for i in range(40):
        record = make_connection()
        task = asyncio.create_task(
            sqlite_store.create_connection(record, make_event(connection_id=record.id))
        )
        await asyncio.sleep(i * 0.00005)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # All or nothing: the row and its event are both there or both absent.
        got = await sqlite_store.get_connection(TENANT, record.id)
        events = await sqlite_store.list_audit(TENANT, AuditFilter(connection_id=record.id), 10, None)
        assert (got is None) == (events == [])
    await create(sqlite_store)


def _checkpoint(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        db.close()


def _database_bytes(path: Path) -> bytes:
    content = path.read_bytes()
    wal = Path(f"{path}-wal")
    return content + (wal.read_bytes() if wal.exists() else b"")
