"""Contract tests for the `Store` protocol, run against every backend in `BACKENDS`.

The first part holds for any backend; the last part (file mode, bytes on disk,
migrations, transactions broken on purpose) is specific to SQLite.
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

import pytest

from broker.crypto.envelope import Sealed
from broker.errors import Aborted, AlreadyExists, NotFound
from broker.model import (
    AuditEvent,
    AuditFilter,
    ConnectionFilter,
    ConnectionRecord,
    ConnectionStatus,
    Grant,
    GrantFilter,
    McpTool,
    Outcome,
    TestCategory,
    TestResult,
    TestStage,
    TestStatus,
)
from broker.store import Store
from broker.store.sqlite import SqliteStore

T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
TENANT = "acme"
OTHER = "globex"

# ------------------------------------------------------------------ fixtures

BACKENDS: dict[str, Callable[[Path], Store]] = {
    "sqlite": lambda tmp: SqliteStore(tmp / "broker.db"),
}


@pytest.fixture(params=sorted(BACKENDS))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    backend = BACKENDS[request.param](tmp_path)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    backend = SqliteStore(tmp_path / "broker.db")
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
    with pytest.raises(Aborted, match="etag mismatch"):
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
    assert await store.kek_ids_in_use() == {"kek-old", "kek-new", "kek-other"}

    purged = next_version(soft_deleted(gone), sealed=None, purged_at=T0 + timedelta(seconds=2))
    await store.replace_connection(
        purged, gone.version, make_event(action="connection.purge"), drop_grants=True
    )

    assert await store.get_connection(TENANT, gone.id) == purged
    assert await store.get_grant(TENANT, gone.id, "spiffe://x") is None
    assert await store.get_grant(TENANT, keep.id, "spiffe://x") is not None
    assert await store.kek_ids_in_use() == {"kek-old", "kek-other"}


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
        McpTool("fetch", "Fetch a URL", {"type": "object"}, "h2"),
    ]
    await store.replace_mcp_tools(TENANT, record.id, tools, T0, make_event(action="mcp.refresh"))
    listed, when = await store.list_mcp_tools(TENANT, record.id)
    assert [t.name for t in listed] == ["fetch", "search"] and when == T0
    assert listed[1] == tools[0]
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
