"""Audit seals: a chain rewritten by someone with the database but not the master key is caught.

Without seals, rewriting one event and recomputing every hash after it leaves a chain that
verifies (the first test shows it). Seals (`service/auditseal.py`) are MACs over the tail
under a key derived from the master key; the store tests run on both backends.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog.testing

from broker._proto import broker_pb2 as pb
from broker.crypto import Kek, Keyring
from broker.model import AuditEvent, AuditFilter, Outcome
from broker.service import auditseal
from broker.service.audit import AuditLog
from broker.store import Store
from broker.store import _chain as chain
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore
from tests.conftest import Running
from tests.helpers import db_request, no_seals
from tests.integration import test_store as contract
from tests.postgres_db import shared_postgres  # noqa: F401 (fixture)

store = contract.store  # each backend in turn
T0 = datetime(2026, 11, 1, tzinfo=UTC)
KEK = Kek(os.urandom(32))
KEYRING = Keyring(KEK)
CHECK = auditseal.checker(KEYRING)


def event(i: int) -> AuditEvent:
    return AuditEvent(
        time=T0, tenant="acme", actor="spiffe://x/tenant/acme/executor/e", action="connection.resolve",
        outcome=Outcome.ALLOWED, details={"i": str(i)},
    )  # fmt: skip


async def seal_now(store: Store, kek: Kek = KEK) -> int:
    last_id, last_hash = await store.audit_tail()
    await store.add_audit_seal(auditseal.make_seal(kek, last_id, last_hash, T0))
    return last_id


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
    report = await store.verify_audit_chain(CHECK)
    assert (report.ok, report.seals_checked, report.unsealed_events) == (True, 1, 3)

    await rewrite(store, 4)
    assert (await store.verify_audit_chain(no_seals)).ok  # the chain alone cannot tell
    report = await store.verify_audit_chain(CHECK)
    assert (report.ok, report.first_broken_id, report.problem) == (
        False,
        sealed_id,
        chain.PROBLEM_SEAL_MISMATCH,
    )


async def test_a_seal_without_the_master_key_is_forged(store: Store) -> None:
    await store.append_audit([event(i) for i in range(5)])
    await rewrite(store, 2)
    last_id, last_hash = await store.audit_tail()
    forged = dataclasses.replace(auditseal.make_seal(KEK, last_id, last_hash, T0), mac="0" * 64)
    await store.add_audit_seal(forged)
    report = await store.verify_audit_chain(CHECK)
    assert (report.ok, report.first_broken_id, report.problem) == (False, 5, chain.PROBLEM_SEAL_FORGED)


async def test_cutting_off_sealed_events_is_caught(store: Store) -> None:
    await store.append_audit([event(i) for i in range(8)])
    sealed_id = await seal_now(store)
    await _execute(store, "DELETE FROM audit_events WHERE id > ?", [(5,)])
    assert (await store.verify_audit_chain(no_seals)).ok  # a shorter chain is still a chain
    report = await store.verify_audit_chain(CHECK)
    assert (report.ok, report.first_broken_id, report.problem) == (
        False,
        sealed_id,
        chain.PROBLEM_SEAL_MISSING,
    )


async def test_seals_under_a_key_no_longer_configured_are_counted_not_failed(store: Store) -> None:
    await store.append_audit([event(i) for i in range(3)])
    await seal_now(store, Kek(os.urandom(32)))  # a retired master key
    await store.add_audit_seal(auditseal.make_seal(KEK, *await store.audit_tail(), T0))  # same tail: kept
    report = await store.verify_audit_chain(CHECK)
    assert (report.ok, report.seals_checked, report.seals_unverifiable) == (True, 0, 1)


async def test_pruning_takes_the_seals_of_the_events_it_deletes(store: Store) -> None:
    old = datetime(2020, 1, 1, tzinfo=UTC)
    await store.append_audit([dataclasses.replace(event(i), time=old) for i in range(4)])
    await seal_now(store)
    await store.append_audit([event(i) for i in range(4, 6)])
    last = await seal_now(store)
    assert await store.prune_audit(datetime(2021, 1, 1, tzinfo=UTC), T0) == 4
    report = await store.verify_audit_chain(CHECK)
    assert (report.ok, report.seals_checked, report.events_checked) == (True, 1, 2) and last == 6


# ------------------------------------------------------------------ the service and the broker


async def test_the_audit_log_seals_when_the_tail_moved_and_on_close(tmp_path: Any) -> None:
    backend = SqliteStore(tmp_path / "broker.db")
    await backend.open()
    try:
        log = AuditLog(backend, clock=lambda: T0, keyring=KEYRING)
        assert await log.seal() is None  # nothing to seal yet
        await log.append(event(1))
        first = await log.seal()
        assert first is not None and (first.last_id, first.kek_id) == (1, KEK.id)
        assert await log.seal() is None  # the tail has not moved
        await log.append(event(2))
        await log.close()  # seals what is there
        report = await backend.verify_audit_chain(CHECK)
        assert (report.seals_checked, report.unsealed_events) == (2, 0)
    finally:
        await backend.close()


async def test_a_seal_planted_where_the_next_one_goes_is_reported_not_passed_over(tmp_path: Any) -> None:
    """A seal row written ahead, at the id the broker's next seal will cover, used to make that seal
    a silent no-op (ON CONFLICT DO NOTHING) while the log said `audit_sealed`."""
    backend = SqliteStore(tmp_path / "broker.db")
    await backend.open()
    try:
        log = AuditLog(backend, clock=lambda: T0, keyring=KEYRING)
        await log.append(event(1))
        planted = auditseal.make_seal(Kek(os.urandom(32)), 2, "0" * 64, T0)  # no key the broker has
        await backend.add_audit_seal(planted)
        await log.append(event(2))
        with structlog.testing.capture_logs() as logs:
            assert await log.seal() is None
        assert [e["event"] for e in logs] == ["audit_seal_conflict"]
        assert (logs[0]["last_id"], logs[0]["found_kek_id"]) == (2, planted.kek_id)
        # Another replica's seal of the same tail is no conflict: the same MAC under the same key.
        await log.append(event(3))
        await backend.add_audit_seal(auditseal.make_seal(KEK, *await backend.audit_tail(), T0))
        with structlog.testing.capture_logs() as logs:
            assert await log.seal() is not None
        assert [e["event"] for e in logs] == ["audit_sealed"]
    finally:
        await backend.close()


async def test_verify_audit_log_reports_seals(running: Running) -> None:
    admin = running.admin()
    await admin.CreateConnection(db_request(name="sealed"))
    assert await running.broker.services.audit.seal() is not None
    await admin.CreateConnection(db_request(name="after"))
    report = await admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
    assert (report.ok, report.seals_checked, report.unsealed_events) == (True, 1, 1)
    assert "audit_sealed" in running.logs.getvalue()
