"""The tamper-evident audit log: hash chain, VerifyAuditLog, export, retention, failing closed."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto import broker_pb2 as pb
from broker.crypto import Kek, Keyring
from broker.errors import FailedPrecondition, Unavailable
from broker.model import AuditEvent, AuditFilter, Outcome
from broker.service.audit import AuditLog
from broker.service.fingerprint import fingerprint
from broker.store import _chain as chain
from broker.store._migrate import apply_sqlite, load_migrations
from broker.store.sqlite import SqliteStore
from tests import oauthserver
from tests.conftest import Running
from tests.helpers import (
    EXECUTOR,
    ShiftedClock,
    db_request,
    field_violations,
    no_seals,
    rpc_error,
    seal_for_pruning,
    trusted_seals,
)
from tests.integration.test_oauth_flow import (  # noqa: F401 (fixtures)
    SHORT_LIFE,
    age_past_half_life,
    authorize,
    clock,
    server,
    start,
)

T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
GENERIC_PROBLEMS = {chain.PROBLEM_HASH, chain.PROBLEM_LINK, chain.PROBLEM_MISSING, chain.PROBLEM_UNREADABLE}
CONTENT_COLUMNS = (
    "tenant, time, actor, action, outcome, connection_id, reason, request_id, peer, details, prev_hash, hash"
)


def event(i: int = 0, tenant: str = "acme", time: datetime = T0, **fields: Any) -> AuditEvent:
    values: dict[str, Any] = {
        "action": "connection.resolve",
        "outcome": Outcome.ALLOWED,
        "details": {"i": str(i)},
    }
    values.update(fields)
    return AuditEvent(time=time, tenant=tenant, actor="spiffe://x/tenant/acme/executor/e", **values)


def edit_db(path: Path, *statements: tuple[str, tuple[Any, ...]]) -> None:
    """Change the database behind the broker's back, as an attacker with file access would."""
    db = sqlite3.connect(path)
    with db:
        for sql, params in statements:
            db.execute(sql, params)
    db.close()


async def populate(running: Running) -> list[pb.AuditEvent]:
    """Events from two tenants, through the admin API and Resolve; returns tenant default's, oldest first."""
    admin, other = running.admin(), running.admin("admin_b")
    for i in range(3):
        created = await admin.CreateConnection(db_request(name=f"db-{i}", password="pw-chain"))
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
        await other.CreateConnection(db_request(name=f"theirs-{i}"))
        await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
    page = await admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))
    return list(reversed(page.events))


async def verify(running: Running, who: str = "admin") -> pb.VerifyAuditLogResponse:
    return await running.admin(who).VerifyAuditLog(pb.VerifyAuditLogRequest())


# ------------------------------------------------------------------ chain


async def test_every_event_is_chained_and_the_chain_verifies(running: Running) -> None:
    events = await populate(running)
    assert all(len(e.hash) == 64 and len(e.prev_hash) == 64 for e in events)
    # One global chain: this tenant's events link to each other or to the other tenant's in between.
    with sqlite3.connect(running.broker.settings.storage_path) as db:
        rows = db.execute("SELECT id, prev_hash, hash FROM audit_events ORDER BY id").fetchall()
    assert rows[0][1] == chain.GENESIS
    assert all(later[1] == earlier[2] for earlier, later in itertools.pairwise(rows))
    assert {e.hash for e in events} <= {row[2] for row in rows}
    report = await verify(running)
    assert (report.ok, report.events_checked, report.first_broken_id, report.problem) == (
        True,
        len(rows),
        0,
        "",
    )
    # Any tenant's admin may verify; the answer is the same and names no content.
    assert (await verify(running, "admin_b")) == report


async def test_admins_verifying_at_once_share_walks_and_each_sees_its_own_events_checked(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A walk reads every event of every tenant: twelve admins asking at once must not start twelve.
    await populate(running)
    store = running.broker.store
    walk = store.verify_audit_chain
    walks = 0

    async def counted(*args: Any) -> Any:
        nonlocal walks
        walks += 1
        await asyncio.sleep(0.5)  # a long chain: every caller asks while the first walk runs
        return await walk(*args)

    monkeypatch.setattr(store, "verify_audit_chain", counted)
    reports = await asyncio.gather(*(verify(running, who) for who in ("admin", "admin_b") * 6))
    assert all(report.ok for report in reports) and walks <= 2
    # An event appended after a walk began is in the next one, not in a report shared from before.
    checked = reports[0].events_checked
    await running.admin().CreateConnection(db_request(name="after-the-walks"))
    assert (await verify(running)).events_checked > checked and walks <= 3


@pytest.mark.parametrize(
    "tamper", ["edit", "edit_details", "delete", "swap_contents", "swap_fields", "unhash"]
)
async def test_verify_finds_each_kind_of_tampering(running: Running, tamper: str) -> None:
    await populate(running)
    path = running.broker.settings.storage_path
    with sqlite3.connect(path) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM audit_events ORDER BY id")]
    a, b = ids[4], ids[5]
    edits: dict[str, tuple[list[tuple[str, tuple[Any, ...]]], int, str]] = {
        "edit": ([("UPDATE audit_events SET outcome = 'denied' WHERE id = ?", (a,))], a, chain.PROBLEM_HASH),
        "edit_details": (
            [('UPDATE audit_events SET details = \'{"purpose":"x"}\' WHERE id = ?', (a,))],
            a,
            chain.PROBLEM_HASH,
        ),
        "delete": ([("DELETE FROM audit_events WHERE id = ?", (a,))], b, chain.PROBLEM_LINK),
        # Two rows trade everything but their ids (hashes too): the links no longer meet.
        "swap_contents": (_swap(a, b, CONTENT_COLUMNS), a, chain.PROBLEM_LINK),
        # Two rows trade their fields but keep their hashes: the hashes no longer match.
        "swap_fields": (
            _swap(a, b, CONTENT_COLUMNS.removesuffix(", prev_hash, hash")),
            a,
            chain.PROBLEM_HASH,
        ),
        "unhash": ([("UPDATE audit_events SET hash = NULL WHERE id = ?", (a,))], a, chain.PROBLEM_MISSING),
    }
    statements, broken_id, problem = edits[tamper]
    edit_db(path, *statements)
    report = await verify(running)
    assert (report.ok, report.first_broken_id, report.problem) == (False, broken_id, problem)
    assert report.problem in GENERIC_PROBLEMS  # a fixed sentence, never another tenant's content


def _swap(a: int, b: int, columns: str) -> list[tuple[str, tuple[Any, ...]]]:
    names = [c.strip() for c in columns.split(",")]
    assignments = ", ".join(f"{n} = (SELECT {n} FROM audit_events WHERE id = ?)" for n in names)
    from_kept = ", ".join(f"{n} = (SELECT {n} FROM keep)" for n in names)
    return [
        ("CREATE TEMP TABLE keep AS SELECT * FROM audit_events WHERE id = ?", (a,)),
        (f"UPDATE audit_events SET {assignments} WHERE id = ?", (*([b] * len(names)), a)),
        (f"UPDATE audit_events SET {from_kept} WHERE id = ?", (b,)),
    ]


async def test_an_unreadable_row_is_a_break_not_a_crash(sqlite_store: SqliteStore) -> None:
    await sqlite_store.append_audit([event(i) for i in range(3)])
    edit_db(
        sqlite_store.path, ("UPDATE audit_events SET details = 'not json', outcome = 'nope' WHERE id = 2", ())
    )
    report = await sqlite_store.verify_audit_chain(no_seals)
    assert (report.ok, report.first_broken_id, report.problem) == (False, 2, chain.PROBLEM_UNREADABLE)


async def test_verify_walks_in_pages(sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("broker.store.audit._AUDIT_PAGE", 7)
    await sqlite_store.append_audit([event(i) for i in range(30)])
    assert (await sqlite_store.verify_audit_chain(no_seals)).events_checked == 30
    edit_db(sqlite_store.path, ("UPDATE audit_events SET reason = 'x' WHERE id = 22", ()))
    report = await sqlite_store.verify_audit_chain(no_seals)
    assert (report.first_broken_id, report.events_checked) == (22, 22)


async def test_events_written_with_a_change_join_the_same_chain(sqlite_store: SqliteStore) -> None:
    from tests.integration.test_store import make_connection

    await sqlite_store.append_audit([event(1)])
    record = make_connection()
    await sqlite_store.create_connection(
        record, event(2, connection_id=record.id, action="connection.create")
    )
    await sqlite_store.append_audit([event(3)])
    events = list(reversed(await sqlite_store.list_audit("acme", AuditFilter(), 10, None)))
    assert [e.id for e in events] == [1, 2, 3]
    assert [e.prev_hash for e in events] == [chain.GENESIS, events[0].hash, events[1].hash]
    assert (await sqlite_store.verify_audit_chain(no_seals)).ok


async def test_two_processes_appending_to_one_file_keep_one_chain(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    # A second store on the same file, as the `broker` CLI's key commands open it while the broker
    # serves: each append reads the chain's tail in its own transaction, so neither forks the chain.
    other = SqliteStore(sqlite_store.path)
    await other.open()
    try:
        for i in range(5):
            await asyncio.gather(
                sqlite_store.append_audit([event(10 * i + j) for j in range(3)]),
                other.append_audit([event(10 * i + 5 + j) for j in range(2)]),
            )
    finally:
        await other.close()
    report = await sqlite_store.verify_audit_chain(no_seals)
    assert (report.ok, report.events_checked) == (True, 25)


def test_the_tail_query_prefers_the_newest_event_then_the_newest_checkpoint() -> None:
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.row_factory = sqlite3.Row
        db.execute("CREATE TABLE audit_events (id INTEGER PRIMARY KEY, hash TEXT)")
        db.execute("CREATE TABLE audit_checkpoints (last_id INTEGER, last_hash TEXT)")
        assert chain.tail(db.execute(chain.TAIL_QUERY).fetchall()) == (0, chain.GENESIS)
        db.executemany("INSERT INTO audit_checkpoints VALUES (?, ?)", [(3, "c3"), (7, "c7")])
        assert chain.tail(db.execute(chain.TAIL_QUERY).fetchall()) == (7, "c7")
        db.executemany("INSERT INTO audit_events VALUES (?, ?)", [(8, "e8"), (9, "e9")])
        assert chain.tail(db.execute(chain.TAIL_QUERY).fetchall()) == (9, "e9")


# --------------------------------------------------------------- backfill


async def test_events_from_before_the_chain_are_hashed_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        await apply_sqlite(conn, load_migrations("sqlite")[:3])  # a database from before migration 0004
        for i in range(5):
            await conn.execute(
                "INSERT INTO audit_events (tenant, time, actor, action, outcome, connection_id, reason,"
                " request_id, peer, details) VALUES ('acme', ?, 'a', 'connection.create', 'succeeded',"
                " '', '', '', '', ?)",
                (1_714_979_289_000_000 + i, f'{{"i":"{i}"}}'),
            )
    sqlite_store = SqliteStore(path)
    await sqlite_store.open()
    try:
        events = list(reversed(await sqlite_store.list_audit("acme", AuditFilter(), 10, None)))
        assert [e.details["i"] for e in events] == ["0", "1", "2", "3", "4"]
        assert events[0].prev_hash == chain.GENESIS
        assert all(e.hash == chain.event_hash(e) for e in events)
        await sqlite_store.append_audit([event(5)])
        report = await sqlite_store.verify_audit_chain(no_seals)
        assert (report.ok, report.events_checked) == (True, 6)
    finally:
        await sqlite_store.close()

    # Once the chain has begun, a missing hash is tampering to report, never something to re-hash.
    edit_db(path, ("UPDATE audit_events SET hash = NULL, reason = 'edited' WHERE id = 2", ()))
    sqlite_store = SqliteStore(path)
    await sqlite_store.open()
    try:
        report = await sqlite_store.verify_audit_chain(no_seals)
        assert (report.ok, report.first_broken_id, report.problem) == (False, 2, chain.PROBLEM_MISSING)
    finally:
        await sqlite_store.close()


# ----------------------------------------------------------------- export


async def test_export_streams_the_tenants_events_oldest_first(running: Running) -> None:
    events = await populate(running)
    exported = [e async for e in running.admin().ExportAuditEvents(pb.ExportAuditEventsRequest())]
    assert exported == events  # same content, hash and prev_hash included, oldest first
    theirs = [e async for e in running.admin("admin_b").ExportAuditEvents(pb.ExportAuditEventsRequest())]
    assert theirs and not {e.id for e in theirs} & {e.id for e in events}
    assert all("theirs" in e.details.get("name", "theirs") for e in theirs)

    one = events[0].connection_id or events[1].connection_id
    by_connection = running.admin().ExportAuditEvents(pb.ExportAuditEventsRequest(connection_id=one))
    assert [e.id async for e in by_connection] == [e.id for e in events if e.connection_id == one]

    request = pb.ExportAuditEventsRequest()
    request.start_time.CopyFrom(events[2].time)
    request.end_time.CopyFrom(events[-1].time)
    in_range = [e.id async for e in running.admin().ExportAuditEvents(request)]
    since, until = events[2].time.ToDatetime(), events[-1].time.ToDatetime()
    assert in_range == [e.id for e in events if since <= e.time.ToDatetime() < until]


async def test_export_pages_through_more_than_one_read(
    sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("broker.service.audit._EXPORT_PAGE", 4)
    await sqlite_store.append_audit([event(i, tenant="acme" if i % 3 else "other") for i in range(20)])
    from broker.model import Principal, Role
    from broker.service.context import Call

    call = Call(Principal("broker.local", "acme", Role.ADMIN, "cli"))
    exported = [e async for e in AuditLog(sqlite_store).export(call, AuditFilter())]
    assert [int(e.details["i"]) for e in exported] == [i for i in range(20) if i % 3]


async def test_export_errors_and_roles_go_through_the_interceptor(running: Running) -> None:
    request = pb.ExportAuditEventsRequest()
    request.start_time.FromDatetime(T0)
    request.end_time.FromDatetime(T0 - timedelta(days=1))
    error = await rpc_error(_drain(running.admin().ExportAuditEvents(request)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "end_time" in field_violations(error)
    assert dict(error.trailing_metadata() or ()).get("x-request-id")
    denied = await rpc_error(
        _drain(running.admin("executor").ExportAuditEvents(pb.ExportAuditEventsRequest()))
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    denied = await rpc_error(running.admin("executor").VerifyAuditLog(pb.VerifyAuditLogRequest()))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


async def _drain(stream: Any) -> list[Any]:
    return [item async for item in stream]


# -------------------------------------------------------------- retention


async def test_pruning_keeps_the_rest_verifiable_behind_a_checkpoint(sqlite_store: SqliteStore) -> None:
    day = timedelta(days=1)
    now = T0 + 400 * day
    old = [event(i, time=T0 + i * day) for i in range(10)]  # 400..391 days old
    recent = [event(10 + i, time=now - i * day) for i in range(5)]
    # Times are not monotonic in id: a recent event in the middle stops the prune there.
    log = AuditLog(
        sqlite_store, clock=lambda: now, retention=timedelta(days=365), keyring=Keyring(Kek(os.urandom(32)))
    )
    await sqlite_store.append_audit(old[:7])
    await log.seal()  # pruning goes no further than a seal that verifies
    await sqlite_store.append_audit([recent[0], *old[7:], *recent[1:]])
    await log.seal()
    assert await log.prune() == 7
    with sqlite3.connect(sqlite_store.path) as db:
        [(last_id, last_hash, count)] = db.execute(
            "SELECT last_id, last_hash, pruned_count FROM audit_checkpoints"
        ).fetchall()
        assert db.execute("SELECT min(id), count(*) FROM audit_events").fetchone() == (8, 8)
    assert (last_id, count) == (7, 7) and len(last_hash) == 64
    report = await sqlite_store.verify_audit_chain(no_seals)
    assert (report.ok, report.events_checked) == (True, 8)
    assert await log.prune() == 0  # event 8 is recent: nothing before it may go

    edit_db(sqlite_store.path, ("UPDATE audit_events SET actor = 'someone else' WHERE id = 9", ()))
    report = await sqlite_store.verify_audit_chain(no_seals)
    assert (report.ok, report.first_broken_id) == (False, 9)


async def test_pruning_in_batches_and_appending_after_everything_was_pruned(
    sqlite_store: SqliteStore,
) -> None:
    await sqlite_store.append_audit([event(i, time=T0) for i in range(25)])
    await seal_for_pruning(sqlite_store)
    assert await sqlite_store.prune_audit(T0 + timedelta(seconds=1), T0, trusted_seals, batch_size=10) == 25
    with sqlite3.connect(sqlite_store.path) as db:
        assert db.execute("SELECT last_id, pruned_count FROM audit_checkpoints").fetchall() == [(25, 25)]
    assert (await sqlite_store.verify_audit_chain(no_seals)).ok
    await sqlite_store.append_audit([event(99)])  # continues from the checkpoint
    [latest] = await sqlite_store.list_audit("acme", AuditFilter(), 10, None)
    assert latest.id == 26 and latest.prev_hash != chain.GENESIS
    report = await sqlite_store.verify_audit_chain(no_seals)
    assert (report.ok, report.events_checked) == (True, 1)


async def test_pruning_stops_at_a_broken_link_and_keeps_the_evidence(sqlite_store: SqliteStore) -> None:
    await sqlite_store.append_audit([event(i, time=T0) for i in range(10)])
    await seal_for_pruning(sqlite_store)
    edit_db(sqlite_store.path, ("DELETE FROM audit_events WHERE id = 6", ()))
    with pytest.raises(FailedPrecondition, match="event 7"):
        await sqlite_store.prune_audit(T0 + timedelta(seconds=1), T0, trusted_seals, batch_size=3)
    with sqlite3.connect(sqlite_store.path) as db:
        assert db.execute("SELECT min(id) FROM audit_events").fetchone() == (1,)  # walked first: none went
    assert (await sqlite_store.verify_audit_chain(no_seals)).first_broken_id == 7


def test_retention_has_a_floor() -> None:
    with pytest.raises(ValueError, match="90 days"):
        AuditLog(object(), retention=timedelta(days=30))  # type: ignore[arg-type]


# ---------------------------------------------------------- fingerprints


async def test_an_oauth_refresh_records_a_fingerprint_of_the_token_it_used(
    start: Callable[..., Any],  # noqa: F811
    server: oauthserver.OAuthTestServer,  # noqa: F811
    clock: ShiftedClock,  # noqa: F811
) -> None:
    running: Running = await start()
    try:
        server.expires_in = SHORT_LIFE
        created = await authorize(running, server)
        age_past_half_life(clock)  # the next Resolve refreshes
        [used] = list(server.refresh_tokens)
        await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
        page = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="oauth.refresh"))
        [refresh] = page.events
        keyring = running.broker.settings.load_keyring()
        assert refresh.details["refresh_token_fp"] == fingerprint(keyring.active, used)
        every = [e async for e in running.admin().ExportAuditEvents(pb.ExportAuditEventsRequest())]
        assert used not in str(every)
    finally:
        await running.close()
        await running.broker.stop(grace=0)


# ------------------------------------------------------------ fail closed


async def test_resolves_fail_closed_while_the_audit_store_is_unwritable(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request(password="fail-closed-pw"))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    resolver = running.resolver()
    request = pb.ResolveRequest(connection_id=created.id)
    acknowledged = 0
    for _ in range(5):
        await resolver.Resolve(request)
        acknowledged += 1

    sqlite_store = running.broker.store
    real = sqlite_store.engine.transaction
    attempts = 0

    @contextlib.asynccontextmanager
    async def unwritable() -> AsyncIterator[Any]:
        nonlocal attempts
        attempts += 1
        raise sqlite3.OperationalError("disk I/O error")
        yield  # pragma: no cover

    sqlite_store.engine.transaction = unwritable  # type: ignore[method-assign]
    try:
        # One after another (each its own group-commit batch) and a burst: every one fails
        # promptly, so a failed batch never holds up the next.
        for _ in range(3):
            error = await rpc_error(asyncio.wait_for(resolver.Resolve(request), 5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "audit log cannot be written" in str(error.details())
            assert "fail-closed-pw" not in str(error.details()) + str(error.trailing_metadata())
        burst = await asyncio.gather(*(resolver.Resolve(request) for _ in range(20)), return_exceptions=True)
        assert all(isinstance(r, grpc.aio.AioRpcError) for r in burst)
        assert {r.code() for r in burst if isinstance(r, grpc.aio.AioRpcError)} == {
            grpc.StatusCode.UNAVAILABLE
        }
        assert attempts >= 4

        # Health and read-only admin calls keep answering.
        for identity, port in (
            ("admin", running.broker.admin_port),
            ("executor", running.broker.resolve_port),
        ):
            health = health_pb2_grpc.HealthStub(running.channel(running.identities[identity], port))
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert (await admin.GetConnection(pb.GetConnectionRequest(id=created.id))).id == created.id
        assert [c.id for c in (await admin.ListConnections(pb.ListConnectionsRequest())).connections] == [
            created.id
        ]
        assert (await verify(running)).ok
    finally:
        sqlite_store.engine.transaction = real  # type: ignore[method-assign]

    # The fault cleared: Resolves succeed again, and every acknowledged one is on record.
    for _ in range(5):
        await resolver.Resolve(request)
        acknowledged += 1
    allowed = await admin.ListAuditEvents(
        pb.ListAuditEventsRequest(action="connection.resolve", page_size=1000)
    )
    assert len([e for e in allowed.events if e.outcome == "allowed"]) == acknowledged == 10
    assert (await verify(running)).ok


class _FlakyStore:
    """A store whose audit writes hang, then fail, then work."""

    def __init__(self) -> None:
        self.mode = "hang"
        self.written: list[AuditEvent] = []

    async def append_audit(self, events: list[AuditEvent]) -> None:
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "fail":
            raise sqlite3.OperationalError("database is locked")
        self.written.extend(events)


async def test_a_stuck_or_failing_audit_write_does_not_stall_later_batches() -> None:
    sqlite_store = _FlakyStore()
    log = AuditLog(sqlite_store, write_timeout=0.2)  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="audit log cannot be written"):
        await asyncio.wait_for(log.append(event(1)), 5)
    sqlite_store.mode = "fail"
    results = await asyncio.gather(*(log.append(event(i)) for i in range(10)), return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    sqlite_store.mode = "ok"
    await asyncio.wait_for(asyncio.gather(*(log.append(event(i)) for i in range(10))), 5)
    assert len(sqlite_store.written) == 10
    await log.close()
