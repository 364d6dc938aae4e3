"""Audit seals: a chain rewritten by someone with the database but not the master key is caught.

Without seals, rewriting one event and recomputing every hash after it leaves a chain that
verifies (the first test shows it). Seals (`service/auditseal.py`) are MACs over the tail
under a key derived from the master key; the store tests run on both backends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog.testing

from broker import pki
from broker._proto import broker_pb2 as pb
from broker.cli import broker as broker_cli
from broker.config import Settings
from broker.crypto import Kek, Keyring
from broker.errors import FailedPrecondition
from broker.model import AuditEvent, AuditFilter, AuditSeal, Outcome, Principal, Role
from broker.service import auditseal
from broker.service.audit import MIN_RETENTION, PROBLEM_SEEN_CHANGED, AuditLog
from broker.service.context import Call
from broker.store import Store
from broker.store import _chain as chain
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore
from tests.conftest import Running
from tests.helpers import db_request, no_seals, seal_for_pruning, trusted_seals
from tests.integration import test_store as contract
from tests.postgres_db import shared_postgres  # noqa: F401 (fixture)

store = contract.store  # each backend in turn
T0 = datetime(2026, 11, 1, tzinfo=UTC)
KEK = Kek(os.urandom(32))
KEYRING = Keyring(KEK)
ANCHORS = auditseal.Anchors(KEYRING, MIN_RETENTION)


def event(i: int) -> AuditEvent:
    return AuditEvent(
        time=T0, tenant="acme", actor="spiffe://x/tenant/acme/executor/e", action="connection.resolve",
        outcome=Outcome.ALLOWED, details={"i": str(i)},
    )  # fmt: skip


async def seal_now(store: Store, kek: Kek = KEK) -> int:
    anchors = await store.audit_anchors()
    await store.add_audit_seal(auditseal.make_seal(kek, anchors.tail_id, anchors.tail_hash, T0))
    return anchors.tail_id


async def rewrite(store: Store, from_id: int) -> None:
    """What an attacker with write access to the database (not the master key) can do: edit one
    event and recompute every hash after it, so the chain itself still verifies."""
    events = list(reversed(await store.list_audit("acme", AuditFilter(), 10_000, None)))
    previous = next((e.hash for e in events if e.id == from_id - 1), chain.GENESIS)
    rows = []
    for e in events:
        if e.id < from_id:
            continue
        reason = "nothing to see" if e.id == from_id else e.reason
        linked = dataclasses.replace(e, reason=reason, prev_hash=previous)
        previous = chain.event_hash(linked)
        rows.append((reason, linked.prev_hash, previous, e.id))
    await _execute(store, "UPDATE audit_events SET reason = ?, prev_hash = ?, hash = ? WHERE id = ?", rows)


async def _execute(store: Store, sql: str, rows: list[tuple[Any, ...]]) -> None:
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as db:
            db.executemany(sql, rows)
        return
    assert isinstance(store, PostgresStore)
    numbered = sql
    for i in range(1, sql.count("?") + 1):
        numbered = numbered.replace("?", f"${i}", 1)
    conn = await asyncpg.connect(store.engine._dsn)
    try:
        await conn.executemany(numbered, rows)
    finally:
        await conn.close()


async def test_a_rewritten_chain_verifies_without_seals_and_fails_with_them(store: Store) -> None:
    await store.append_audit([event(i) for i in range(10)])
    sealed_id = await seal_now(store)
    await store.append_audit([event(i) for i in range(10, 13)])
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.seals_checked, report.unsealed_events) == (True, 1, 3)

    await rewrite(store, 4)
    assert (await store.verify_audit_chain(no_seals)).ok  # the chain alone cannot tell
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.first_broken_id, report.problem) == (
        False,
        sealed_id,
        chain.PROBLEM_SEAL_MISMATCH,
    )


async def test_a_seal_without_the_master_key_is_forged(store: Store) -> None:
    await store.append_audit([event(i) for i in range(5)])
    await rewrite(store, 2)
    anchors = await store.audit_anchors()
    forged = dataclasses.replace(
        auditseal.make_seal(KEK, anchors.tail_id, anchors.tail_hash, T0), mac="0" * 64
    )
    await store.add_audit_seal(forged)
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.first_broken_id, report.problem) == (False, 5, chain.PROBLEM_SEAL_FORGED)


async def test_cutting_off_sealed_events_is_caught(store: Store) -> None:
    await store.append_audit([event(i) for i in range(8)])
    sealed_id = await seal_now(store)
    await _execute(store, "DELETE FROM audit_events WHERE id > ?", [(5,)])
    assert (await store.verify_audit_chain(no_seals)).ok  # a shorter chain is still a chain
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.first_broken_id, report.problem) == (
        False,
        sealed_id,
        chain.PROBLEM_SEAL_MISSING,
    )


async def test_seals_under_a_key_no_longer_configured_are_counted_not_failed(store: Store) -> None:
    await store.append_audit([event(i) for i in range(3)])
    await seal_now(store, Kek(os.urandom(32)))  # a retired master key
    await seal_now(store)  # the same tail: the first seal stays
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.seals_checked, report.seals_unverifiable) == (True, 0, 1)


async def test_pruning_takes_the_seals_of_the_events_it_deletes(store: Store) -> None:
    old = datetime(2020, 1, 1, tzinfo=UTC)
    await store.append_audit([dataclasses.replace(event(i), time=old) for i in range(4)])
    await seal_now(store)
    await store.append_audit([event(i) for i in range(4, 6)])
    last = await seal_now(store)
    assert await store.prune_audit(datetime(2021, 1, 1, tzinfo=UTC), T0, ANCHORS) == 4
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.seals_checked, report.events_checked) == (True, 1, 2) and last == 6


async def test_an_old_seal_relabelled_under_an_unknown_key_changes_nothing(store: Store) -> None:
    """The newest seal vouches for every event before it (each hash covers the ones before), so
    an older seal that can no longer be checked hides nothing."""
    await store.append_audit([event(i) for i in range(3)])
    await seal_now(store)
    await store.append_audit([event(i) for i in range(3, 5)])
    await seal_now(store)
    await _execute(store, "UPDATE audit_seals SET kek_id = ? WHERE last_id = ?", [("gone", 3)])
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.seals_checked, report.seals_unverifiable) == (True, 1, 1)
    assert report.newest_seal is not None and report.newest_seal.last_id == 5


# ------------------------------------------------------------------ checkpoints


async def _events(store: Store) -> list[AuditEvent]:
    return list(reversed(await store.list_audit("acme", AuditFilter(), 10_000, None)))


async def test_a_checkpoint_written_without_the_broker_is_caught_and_not_pruned_from(store: Store) -> None:
    """Deleting the oldest events and writing a checkpoint in their place, to hide them, used to
    leave a chain that verified: checkpoints carried no MAC."""
    await store.append_audit([event(i) for i in range(6)])
    hidden = (await _events(store))[2]
    await _execute(store, "DELETE FROM audit_events WHERE id <= ?", [(hidden.id,)])
    await _execute(
        store,
        "INSERT INTO audit_checkpoints (last_id, last_hash, pruned_count, created_at) VALUES (?, ?, ?, ?)",
        [(hidden.id, hidden.hash, 3, 0)],
    )
    assert (await store.verify_audit_chain(no_seals)).ok  # without the master key nothing can tell
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.first_broken_id, report.problem) == (
        False,
        hidden.id,
        auditseal.PROBLEM_CHECKPOINT_UNSIGNED,
    )
    # A prune continuing from it would write a signed checkpoint over it: refused.
    with pytest.raises(FailedPrecondition, match="no signature"):
        await store.prune_audit(datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC), ANCHORS)
    assert len(await _events(store)) == 3


async def test_a_checkpoint_must_verify_under_a_configured_key(store: Store) -> None:
    old = datetime(2020, 1, 1, tzinfo=UTC)
    await store.append_audit([dataclasses.replace(event(i), time=old) for i in range(4)])
    await seal_now(store)
    await store.append_audit([event(4)])
    assert await store.prune_audit(datetime(2021, 1, 1, tzinfo=UTC), T0, ANCHORS) == 4
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.events_checked) == (True, 1)

    await _execute(store, "UPDATE audit_checkpoints SET pruned_count = ?", [(1,)])
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.first_broken_id, report.problem) == (
        False,
        4,
        auditseal.PROBLEM_CHECKPOINT_FORGED,
    )
    await _execute(store, "UPDATE audit_checkpoints SET pruned_count = ?, kek_id = ?", [(4, "gone")])
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.problem) == (False, auditseal.PROBLEM_CHECKPOINT_UNCHECKABLE)


async def test_a_checkpoint_that_pruned_events_younger_than_the_retention_floor_is_caught(
    store: Store,
) -> None:
    """The store prunes what it is told to; only the service holds the 90-day floor. A checkpoint
    past it (a prune run with the master key by hand, or a bug) is reported."""
    await store.append_audit([event(i) for i in range(3)])  # all at T0
    await seal_now(store)
    assert await store.prune_audit(T0 + timedelta(seconds=1), T0 + timedelta(days=89), ANCHORS) == 3
    await store.append_audit([event(3)])
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.problem) == (False, auditseal.PROBLEM_CHECKPOINT_TOO_YOUNG)


# ------------------------------------------------------------------ the service and the broker


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


CALL = Call(Principal("broker.local", "acme", Role.ADMIN, "cli"))


async def test_the_audit_log_seals_each_new_tail_and_re_signs_the_newest_in_place(store: Store) -> None:
    clock = Clock()
    log = AuditLog(store, clock=clock, keyring=KEYRING)
    first = await log.seal()  # an empty chain is sealed too: a seal to keep recent from the start
    assert first is not None and first.last_id == 0
    await log.append(event(1))
    with structlog.testing.capture_logs() as logs:
        second = await log.seal()
    assert second is not None and (second.last_id, second.kek_id) == (1, KEK.id)
    assert [e["event"] for e in logs] == ["audit_sealed"] and logs[0]["mac"] == second.mac

    clock.now = T0 + timedelta(minutes=1)
    assert await log.seal() is not None  # the tail has not moved: the newest seal is re-signed
    newest = (await store.audit_anchors()).seal
    assert newest is not None and (newest.last_id, newest.sealed_at, newest.format) == (1, clock.now, 2)

    rotated = Kek(os.urandom(32))
    log = AuditLog(store, clock=clock, keyring=Keyring(rotated, [KEK]))
    assert await log.seal() is not None
    newest = (await store.audit_anchors()).seal
    assert newest is not None and newest.kek_id == rotated.id
    await log.append(event(2))
    await log.close()  # seals what is there
    report = await log.verify(CALL)
    assert (report.ok, report.seals_checked, report.unsealed_events) == (True, 2, 0)


async def test_deleting_every_seal_is_reported(store: Store) -> None:
    log = AuditLog(store, clock=lambda: T0, keyring=KEYRING)
    for i in range(4):
        await log.append(event(i))
    await log.seal()
    await rewrite(store, 2)
    await _execute(store, "DELETE FROM audit_seals WHERE last_id >= ?", [(0,)])
    report = await log.verify(CALL)
    assert (report.ok, report.problem) == (False, auditseal.PROBLEM_NO_SEAL)
    with structlog.testing.capture_logs() as logs:
        assert await log.seal() is None  # this broker saw a seal: it does not seal over the gap
    assert [e["event"] for e in logs] == ["audit_seal_refused"]
    # A broker started afterwards cannot know; it seals, and the log says what it found.
    with structlog.testing.capture_logs() as logs:
        assert await AuditLog(store, clock=lambda: T0, keyring=KEYRING).seal() is not None
    assert [(e["event"], e["last_id"]) for e in logs] == [("audit_seal_first", 4), ("audit_sealed", 4)]


async def sealed_at_3_and_6(store: Store, clock: Clock) -> AuditLog:
    """A broker's audit log with events 1-6, sealed at 3 and, a minute later, at 6."""
    log = AuditLog(store, clock=clock, keyring=KEYRING, seal_interval=60)
    for i in range(3):
        await log.append(event(i))
    await log.seal()
    for i in range(3, 6):
        await log.append(event(i))
    clock.now += timedelta(minutes=1)
    assert await log.seal() is not None
    return log


async def cut_the_seal_of_6_and_rewrite(store: Store) -> None:
    """The attack: delete the seals after event 3, then rewrite from event 4 (hashes recomputed)."""
    await _execute(store, "DELETE FROM audit_seals WHERE last_id > ?", [(3,)])
    await rewrite(store, 4)


async def test_deleting_the_newest_seals_to_rewrite_after_an_older_one_is_reported_and_not_sealed_over(
    store: Store,
) -> None:
    clock = Clock()
    log = await sealed_at_3_and_6(store, clock)
    assert (await log.verify(CALL)).ok
    clock.now += timedelta(minutes=10)  # ticks re-signed the newest seal meanwhile; now the attack:
    assert await log.seal() is not None
    await cut_the_seal_of_6_and_rewrite(store)
    with structlog.testing.capture_logs() as logs:
        assert await log.seal() is None  # this broker saw the seal of event 6: it does not seal over
    assert [(e["event"], e["newest_seal_id"]) for e in logs] == [("audit_seal_refused", 3)]
    assert logs[0]["reason"] == PROBLEM_SEEN_CHANGED
    report = await log.verify(CALL)
    assert (report.ok, report.first_broken_id, report.problem) == (
        False,
        3,
        auditseal.PROBLEM_SEAL_STALE,
    )


async def test_relabelling_the_newest_seal_is_reported_and_not_sealed_over(store: Store) -> None:
    log = AuditLog(store, clock=lambda: T0, keyring=KEYRING)
    for i in range(3):
        await log.append(event(i))
    await log.seal()
    await rewrite(store, 2)
    await _execute(store, "UPDATE audit_seals SET kek_id = ?", [("retired",)])
    assert (await store.verify_audit_chain(ANCHORS)).ok  # an unverifiable seal alone proves nothing
    report = await log.verify(CALL)
    assert (report.ok, report.problem) == (False, auditseal.PROBLEM_SEAL_UNCHECKABLE)
    await log.append(event(3))
    with structlog.testing.capture_logs() as logs:  # a broker started since, which saw no seal yet
        assert await AuditLog(store, clock=lambda: T0, keyring=KEYRING).seal() is None
    assert [e["event"] for e in logs] == ["audit_seal_refused"] and "'retired'" in logs[0]["reason"]


async def test_a_seal_planted_where_the_next_one_goes_is_reported_not_passed_over(store: Store) -> None:
    """A seal row written at the id the broker is about to seal (between its read and its write) used
    to make that seal a silent no-op (ON CONFLICT DO NOTHING) while the log said `audit_sealed`."""
    planted = auditseal.make_seal(Kek(os.urandom(32)), 1, "0" * 64, T0)  # no key the broker has

    class Planting:
        """The store, with someone writing a seal just before the broker's own."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def add_audit_seal(self, seal: AuditSeal) -> AuditSeal:
            await store.add_audit_seal(planted)
            return await store.add_audit_seal(seal)

    log = AuditLog(store, clock=lambda: T0, keyring=KEYRING)
    await log.seal()  # as the broker starts
    await log.append(event(1))
    with structlog.testing.capture_logs() as logs:
        assert await AuditLog(Planting(), clock=lambda: T0, keyring=KEYRING).seal() is None  # type: ignore[arg-type]
    assert [(e["event"], e["last_id"], e["found_kek_id"]) for e in logs] == [
        ("audit_seal_conflict", 1, planted.kek_id)
    ]
    # Another replica's seal of the same tail is no conflict: the same MAC under the same key.
    await log.append(event(2))
    anchors = await store.audit_anchors()
    await _execute(store, "DELETE FROM audit_seals WHERE last_id = ?", [(1,)])
    await store.add_audit_seal(auditseal.make_seal(KEK, anchors.tail_id, anchors.tail_hash, T0))
    assert await log.seal() is not None  # re-signs that replica's seal of the tail


async def test_verify_audit_log_reports_seals(running: Running) -> None:
    admin = running.admin()
    await admin.CreateConnection(db_request(name="sealed"))
    assert await running.broker.services.audit.seal() is not None
    await admin.CreateConnection(db_request(name="after"))
    report = await admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert (report.ok, report.seals_checked, report.unsealed_events) == (True, 1, 1)
    assert report.sealed_through_id == report.events_checked - 1
    assert "audit_sealed" in running.logs.getvalue()


async def test_the_broker_seals_as_it_starts(running: Running) -> None:
    """A seal from the first moment: verification right after start must not find none."""
    anchors = await running.broker.store.audit_anchors()
    assert anchors.seal is not None and anchors.seal.last_id == anchors.tail_id


async def test_a_checkpoint_from_before_signatures_is_signed_when_an_operator_vouches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checkpoints written before they were signed fail verification and stop pruning, like one
    written to hide events; `broker audit sign-checkpoint` is the operator's way to vouch for it."""
    pki.ensure_dev_layout(tmp_path)
    keyring = Settings.for_dev(tmp_path, "127.0.0.1:0", "127.0.0.1:0").load_keyring()
    backend = SqliteStore(tmp_path / "broker.db")
    await backend.open()
    try:
        old = datetime(2020, 1, 1, tzinfo=UTC)
        await backend.append_audit([dataclasses.replace(event(i), time=old) for i in range(3)])
        await seal_for_pruning(backend)
        await backend.append_audit([event(3)])
        assert await backend.prune_audit(datetime(2021, 1, 1, tzinfo=UTC), T0, trusted_seals) == 3
        # As before 0014, without the seal the test made without a key.
        await _execute(backend, "UPDATE audit_checkpoints SET newest_pruned_at = NULL", [()])
        await _execute(backend, "DELETE FROM audit_seals", [()])
        log = AuditLog(backend, clock=lambda: T0, keyring=keyring)
        await log.seal()
        report = await log.verify(CALL)
        assert (report.ok, report.problem) == (False, auditseal.PROBLEM_CHECKPOINT_UNSIGNED)
        with pytest.raises(FailedPrecondition, match="no signature"):
            await log.prune()

        capsys.readouterr()
        command = ["audit", "sign-checkpoint", "--data-dir", str(tmp_path)]
        assert await asyncio.to_thread(broker_cli.main, command) == 1  # shown, not signed
        shown = capsys.readouterr().err
        assert "unsigned: the checkpoint of 3 events pruned up to event 3" in shown and "--last-id 3" in shown
        assert await asyncio.to_thread(broker_cli.main, [*command, "--last-id", "2"]) == 1
        assert "ends at event 3, not 2" in capsys.readouterr().err
        assert not (await log.verify(CALL)).ok
        assert await asyncio.to_thread(broker_cli.main, [*command, "--last-id", "3"]) == 0
        assert "signed the checkpoint of 3 events pruned up to event 3" in capsys.readouterr().err
        await log.seal()  # refused while the checkpoint was unsigned; the next interval seals
        report = await log.verify(CALL)
        assert (report.ok, report.events_checked) == (True, 1)
        assert await asyncio.to_thread(broker_cli.main, command) == 0
        assert "nothing to sign" in capsys.readouterr().err
    finally:
        await backend.close()


async def test_a_seal_from_before_format_2_verifies_and_is_re_signed_with_its_time(store: Store) -> None:
    """Format 1 (before this release) MACs the tail only: it still pins the chain, but its time
    cannot be trusted, so the broker's first seal after the upgrade re-signs it in format 2."""
    await store.append_audit([event(i) for i in range(2)])
    tail = await store.audit_anchors()
    text = f"{tail.tail_id}\n{tail.tail_hash}".encode()
    mac = hmac.new(KEK.derive(auditseal.SEAL_INFO), text, hashlib.sha256).hexdigest()
    await store.add_audit_seal(AuditSeal(tail.tail_id, tail.tail_hash, KEK.id, mac, T0, format=1))
    log = AuditLog(store, clock=lambda: T0, keyring=KEYRING)
    report = await log.verify(CALL)
    assert (report.ok, report.seals_checked, report.problem) == (False, 1, auditseal.PROBLEM_SEAL_STALE)
    assert await log.seal() is not None
    newest = (await store.audit_anchors()).seal
    assert newest is not None and (newest.last_id, newest.format) == (tail.tail_id, 2)
    assert (await log.verify(CALL)).ok


# ------------------------------------------------------------------ found by attacking the anchors

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(value: datetime) -> int:
    return (value - EPOCH) // timedelta(microseconds=1)


async def test_a_newest_seal_that_does_not_verify_or_is_dated_ahead_is_reported(store: Store) -> None:
    """A seal row at id 0 with any MAC and a date far ahead used to keep verification at ok for good."""
    clock = Clock()
    log = AuditLog(store, clock=clock, keyring=KEYRING)
    for i in range(6):
        await log.append(event(i))
    await log.seal()
    await rewrite(store, 2)
    await _execute(store, "DELETE FROM audit_seals", [()])
    insert = (
        "INSERT INTO audit_seals (last_id, last_hash, kek_id, mac, sealed_at, format) VALUES (?,?,?,?,?,?)"
    )
    far = micros(datetime(9000, 1, 1, tzinfo=UTC))
    await _execute(store, insert, [(0, chain.GENESIS, KEK.id, "0" * 64, far, 2)])
    clock.now += timedelta(days=365)
    assert (await log.verify(CALL)).problem == auditseal.PROBLEM_SEAL_FORGED
    ahead = auditseal.make_seal(KEK, 0, chain.GENESIS, clock.now + timedelta(hours=1))  # a replica's clock
    await _execute(
        store, "UPDATE audit_seals SET mac = ?, sealed_at = ?", [(ahead.mac, micros(ahead.sealed_at))]
    )
    assert (await log.verify(CALL)).problem == auditseal.PROBLEM_SEAL_AHEAD


async def test_a_planted_checkpoint_does_not_let_the_broker_seal_over_a_rewrite(store: Store) -> None:
    """A checkpoint past the seal the broker saw used to count as pruning it, and the broker sealed
    the rewritten tail."""
    clock = Clock()
    log = await sealed_at_3_and_6(store, clock)
    await cut_the_seal_of_6_and_rewrite(store)
    insert = (
        "INSERT INTO audit_checkpoints (last_id, last_hash, pruned_count, created_at) VALUES (?, ?, ?, ?)"
    )
    await _execute(store, insert, [(10**9, "0" * 64, 0, 0)])
    with structlog.testing.capture_logs() as logs:
        assert await log.seal() is None
    assert logs[0]["reason"] == f"the newest checkpoint: {auditseal.PROBLEM_CHECKPOINT_UNSIGNED}"
    await _execute(store, "DELETE FROM audit_checkpoints WHERE last_id = ?", [(10**9,)])
    with structlog.testing.capture_logs() as logs:
        assert await log.seal() is None
    assert logs[0]["reason"] == PROBLEM_SEEN_CHANGED
    assert not (await log.verify(CALL)).ok


async def test_a_broker_that_saw_a_seal_reports_the_rewrite_even_after_another_sealed_over_it(
    store: Store,
) -> None:
    clock = Clock()
    first = await sealed_at_3_and_6(store, clock)
    await cut_the_seal_of_6_and_rewrite(store)
    started_since = AuditLog(store, clock=clock, keyring=KEYRING)  # never saw the seal of event 6
    assert await started_since.seal() is not None  # the documented limit: it seals what it finds
    assert (await started_since.verify(CALL)).ok
    report = await first.verify(CALL)
    assert (report.ok, report.first_broken_id, report.problem) == (False, 6, PROBLEM_SEEN_CHANGED)


async def test_pruning_refuses_a_chain_rewritten_to_look_old_and_deletes_nothing(store: Store) -> None:
    """Pruning used to check only the links of what it deleted: events rewritten (with their hashes)
    to look older than the retention period were deleted, and a signed checkpoint covered them."""
    clock = Clock()
    clock.now = datetime.now(UTC)
    log = AuditLog(store, clock=clock, keyring=KEYRING)
    for i in range(6):
        await log.append(dataclasses.replace(event(i), time=clock.now))
    await log.seal()
    old = clock.now - timedelta(days=800)
    previous, rows = chain.GENESIS, []
    for e in await _events(store):
        linked = dataclasses.replace(e, time=old, prev_hash=previous)
        previous = chain.event_hash(linked)
        rows.append((micros(old), linked.prev_hash, previous, e.id))
    await _execute(store, "UPDATE audit_events SET time = ?, prev_hash = ?, hash = ? WHERE id = ?", rows)
    with pytest.raises(FailedPrecondition, match="nothing was pruned"):
        await log.prune()
    assert len(await _events(store)) == 6


async def test_pruning_everything_keeps_the_newest_seal(store: Store) -> None:
    """After a stop longer than the retention period, the start-up prune used to delete the seal
    the start had just made: verification then found none until the next interval."""
    clock = Clock()
    clock.now = T0 + timedelta(days=400)
    log = AuditLog(store, clock=clock, keyring=KEYRING)
    for i in range(3):
        await log.append(event(i))  # at T0
    await log.seal()
    assert await log.prune() == 3
    await log.append(dataclasses.replace(event(3), time=clock.now))
    report = await log.verify(CALL)
    assert (report.ok, report.events_checked, report.unsealed_events) == (True, 1, 1)


async def test_an_event_inserted_before_where_the_walk_starts_is_reported(store: Store) -> None:
    await store.append_audit([event(i) for i in range(3)])
    row = (
        0,
        micros(T0),
        "acme",
        "someone",
        "connection.resolve",
        "allowed",
        "",
        "",
        "",
        "",
        "{}",
        "f" * 64,
        "0",
    )
    columns = "id, time, tenant, actor, action, outcome, connection_id, reason, request_id, peer, details"
    placeholders = ", ".join("?" * len(row))
    await _execute(
        store, f"INSERT INTO audit_events ({columns}, hash, prev_hash) VALUES ({placeholders})", [row]
    )
    report = await store.verify_audit_chain(ANCHORS)
    assert (report.ok, report.first_broken_id, report.problem) == (False, 0, chain.PROBLEM_BEFORE_START)


async def test_rows_edited_beyond_what_they_can_hold_are_reported_not_an_internal_error(store: Store) -> None:
    log = AuditLog(store, clock=lambda: T0, keyring=KEYRING)
    for i in range(3):
        await log.append(event(i))
    await log.seal()
    for table, column, value in (
        ("audit_seals", "sealed_at", 2**63 - 1),
        ("audit_seals", "mac", "é" * 64),
        ("audit_events", "time", 2**63 - 1),
    ):
        before = await store.audit_anchors()
        await _execute(store, f"UPDATE {table} SET {column} = ?", [(value,)])
        report = await log.verify(CALL)
        assert not report.ok and report.problem, (table, column)
        await _execute(store, "DELETE FROM audit_seals", [()])
        assert before.seal is not None
        await store.add_audit_seal(before.seal)
        await _execute(store, "UPDATE audit_events SET time = ?", [(micros(T0),)])


async def test_a_long_walk_is_judged_against_the_time_it_started(store: Store) -> None:
    clock = Clock()

    class Slow:
        """The store, with a walk that takes five minutes."""

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def verify_audit_chain(self, anchors: Any) -> Any:
            report = await store.verify_audit_chain(anchors)
            clock.now += timedelta(minutes=5)
            return report

    log = AuditLog(Slow(), clock=clock, keyring=KEYRING)  # type: ignore[arg-type]
    await log.append(event(1))
    await log.seal()
    assert (await log.verify(CALL)).ok
