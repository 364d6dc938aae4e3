"""The monitor's rule arithmetic with explicit times, and its rules against a store file with a fake clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from broker.api import resolve_public_part
from broker.config import MonitorSettings
from broker.model import (
    AuditEvent,
    AuditFilter,
    ConnectionRecord,
    ConnectionStatus,
    Outcome,
    Principal,
    Role,
    SecurityEventFilter,
)
from broker.service.audit import AuditLog
from broker.service.cache import ResolveCache
from broker.service.context import Call
from broker.service.denials import WINDOW_SECONDS, DenialAudit
from broker.service.monitor import Burst, Monitor, Seen, Spike, peer_host
from broker.service.replicas import ReplicaChanges
from broker.store.sqlite import SqliteStore
from tests.helpers import Recorder

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


# ------------------------------------------------------------------ Burst


def test_burst_fires_at_the_threshold_within_the_window_then_starts_over() -> None:
    burst = Burst(threshold=3, window=10)
    assert [burst.hit("k", t) for t in (0, 1, 2)] == [False, False, True]
    assert [burst.hit("k", t) for t in (3, 4, 5)] == [False, False, True]


def test_burst_needs_all_hits_strictly_inside_the_window() -> None:
    burst = Burst(threshold=3, window=10)
    assert [burst.hit("k", t) for t in (0, 5, 10)] == [False, False, False]  # 10 - 0 is not < 10
    assert burst.hit("k", 10.5)  # 5, 10, 10.5


def test_burst_keys_are_separate_and_zero_turns_it_off() -> None:
    burst = Burst(threshold=2, window=10)
    assert not burst.hit("a", 0) and not burst.hit("b", 1) and burst.hit("a", 2)
    off = Burst(threshold=0, window=10)
    assert not any(off.hit("k", t) for t in range(100))


def test_burst_once_per_window_stays_quiet_for_a_window_after_firing() -> None:
    burst = Burst(threshold=2, window=10, once_per_window=True)
    assert [burst.hit("k", t) for t in (0, 1, 2, 3, 10.9)] == [False, True, False, False, False]
    assert [burst.hit("k", t) for t in (11, 12)] == [False, True]  # the window since firing passed
    assert burst.hit("other", 12.5) is False and burst.hit("other", 13)


def test_burst_memory_is_bounded() -> None:
    burst = Burst(threshold=2, window=10, max_keys=3)
    for key in "abcd":
        burst.hit(key, 0)
    assert not burst.hit("a", 1)  # "a" was evicted: its first hit is forgotten
    assert burst.hit("d", 1)


# ------------------------------------------------------------------ Spike


def test_spike_without_history_fires_above_min_count_once_per_window() -> None:
    spike = Spike(factor=3, min_count=5, window=60, smoothing=0.5)
    assert [spike.hit("k", 1.0) for _ in range(5)] == [None] * 5
    assert spike.hit("k", 2.0) == (6, 0.0)
    assert spike.hit("k", 3.0) is None  # already reported in this window


def test_spike_compares_with_the_weighted_average_of_earlier_windows() -> None:
    spike = Spike(factor=3, min_count=5, window=60, smoothing=0.5)
    for _ in range(4):
        assert spike.hit("k", 0) is None  # window 0: 4, the first average
    for _ in range(2):
        assert spike.hit("k", 60) is None  # window 1: 2 -> average 0.5 * 2 + 0.5 * 4 = 3
    # window 2 (t=120): the limit is max(5, 3 x 3) = 9
    assert [spike.hit("k", 120) for _ in range(9)] == [None] * 9
    assert spike.hit("k", 121) == (10, 3.0)


def test_spike_empty_windows_decay_the_average() -> None:
    spike = Spike(factor=2, min_count=1, window=10, smoothing=0.5)
    for _ in range(8):
        spike.hit("k", 0)  # window 0: 8, but it fires (8 > 1 with no history): fine
    # t=30 is window 3: window 0 gives 8, windows 1 and 2 are empty: 8 * 0.5 * 0.5 = 2; limit 4
    assert [spike.hit("k", 30) for _ in range(4)] == [None] * 4
    assert spike.hit("k", 31) == (5, 2.0)


def test_spike_windows_start_at_the_keys_first_hit() -> None:
    spike = Spike(factor=10, min_count=2, window=60, smoothing=0.5)
    assert spike.hit("k", 59.0) is None and spike.hit("k", 61.0) is None  # same window, from 59
    assert spike.hit("k", 118.0) == (3, 0.0)


def test_spike_min_count_zero_turns_it_off() -> None:
    spike = Spike(factor=1, min_count=0, window=60, smoothing=0.5)
    assert all(spike.hit("k", 0) is None for _ in range(1000))


# ------------------------------------------------------------- Seen, peers


def test_seen_is_bounded_per_subject_and_in_subjects() -> None:
    seen = Seen(per_subject=2, max_subjects=2)
    for obj in ("a", "b", "c"):
        seen.add("t", "peer", "p1", obj)
    assert ("t", "peer", "p1", "a") not in seen and ("t", "peer", "p1", "c") in seen
    seen.add("t", "peer", "p2", "x")
    seen.add("t", "peer", "p3", "y")
    assert ("t", "peer", "p1", "c") not in seen and ("t", "peer", "p3", "y") in seen


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.5:51234", "10.0.0.5"),
        ("ipv6:[::1]:5555", "::1"),
        ("ipv6:%5B2001:db8::7%5D:443", "2001:db8::7"),
        ("unix:/tmp/sock", "unix:/tmp/sock"),
        ("", ""),
    ],
)
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


# -------------------------------------------------- the Monitor on a store


EXECUTOR = Principal("broker.local", "default", Role.EXECUTOR, "demo")
ADMIN = Principal("broker.local", "default", Role.ADMIN, "cli")


def call(principal: Principal = EXECUTOR, peer: str = "ipv4:10.0.0.5:4000") -> Call:
    return Call(principal, "req-1", peer)


def record(connection_id: str = "conn_1") -> ConnectionRecord:
    return ConnectionRecord(
        id=connection_id,
        tenant="default",
        name=connection_id,
        type="api_key",
        provider="",
        config={},
        secret_fields=(),
        labels={},
        status=ConnectionStatus.ACTIVE,
        version=1,
        secret_version=1,
        sealed=None,
        created_at=T0,
        updated_at=T0,
        created_by="test",
    )


async def rules(sqlite_store: SqliteStore, tenant: str = "default") -> list[tuple[str, str]]:
    events = await sqlite_store.list_security_events(tenant, SecurityEventFilter(), 100, None)
    return [(e.rule, e.action) for e in events]


async def test_denied_burst_blocks_for_the_cool_down(sqlite_store: SqliteStore) -> None:
    clock = FakeClock()
    settings = MonitorSettings(denied_resolves=3, denied_window_seconds=10, block_seconds=30)
    monitor = Monitor(sqlite_store, sqlite_store, sqlite_store, clock, settings)
    for _ in range(2):
        monitor.resolve_denied(call(), "conn_x", "no_grant", clock.advance(1))
    monitor.resolve_denied(call(), "conn_x", "principal_blocked", clock.advance(1))  # not probing
    await monitor.settle()
    assert await rules(sqlite_store) == []
    assert not monitor.blocked("default", EXECUTOR.spiffe_id, clock())
    monitor.resolve_denied(call(), "conn_x", "unknown_connection", clock.advance(1))
    await monitor.settle()
    assert await rules(sqlite_store) == [("denied_burst", "principal_blocked")]
    assert monitor.blocked("default", EXECUTOR.spiffe_id, clock.advance(29))
    assert not monitor.blocked("default", ADMIN.spiffe_id, clock())
    assert not monitor.blocked("default", EXECUTOR.spiffe_id, clock.advance(1))


async def test_failed_tests_suspend_with_compare_and_swap(sqlite_store: SqliteStore) -> None:
    clock = FakeClock()
    cache = ResolveCache(public_part=resolve_public_part)
    monitor = Monitor(
        sqlite_store,
        sqlite_store,
        sqlite_store,
        clock,
        MonitorSettings(failed_tests=2, failed_tests_window_seconds=60),
    )
    await sqlite_store.watch(
        ReplicaChanges(cache, monitor, Recorder())
    )  # as the server does: the feed invalidates
    stored = record()
    await sqlite_store.create_connection(
        stored, AuditEvent(T0, "default", "t", "connection.create", Outcome.SUCCEEDED)
    )
    cache.put_connection(stored, cache.generation)
    await monitor.test_finished(call(ADMIN), stored.id, False, "auth_failed")
    clock.advance(70)  # the first failure leaves the window
    await monitor.test_finished(call(ADMIN), stored.id, True, "ok")
    await monitor.test_finished(call(ADMIN), stored.id, False, "auth_failed")
    assert (await sqlite_store.get_connection("default", stored.id)).suspended_at is None  # type: ignore[union-attr]
    await monitor.test_finished(call(ADMIN), stored.id, False, "timeout")
    after = await sqlite_store.get_connection("default", stored.id)
    assert after is not None and after.suspended_at == clock() and after.version == 2
    assert after.presented_status is ConnectionStatus.SUSPENDED
    assert cache.connection("default", stored.id) is None  # invalidated
    (event,) = await sqlite_store.list_security_events("default", SecurityEventFilter(), 10, None)
    assert (event.rule, event.action, event.severity) == ("failed_tests", "connection_suspended", "critical")
    assert event.details == {"count": "2", "window_seconds": "60", "last_category": "timeout"}
    assert await sqlite_store.list_security_events("other", SecurityEventFilter(), 10, None) == []

    reinstated = await monitor.reinstate(call(ADMIN), stored.id, "false alarm")
    assert reinstated.suspended_at is None and reinstated.version == 3
    assert reinstated == await sqlite_store.get_connection("default", stored.id)


async def test_new_principal_peer_is_remembered_across_restarts(sqlite_store: SqliteStore) -> None:
    clock = FakeClock()
    monitor = Monitor(sqlite_store, sqlite_store, sqlite_store, clock)
    monitor.resolve_allowed(call(), "conn_a", clock())  # new principal, new peer: alert
    monitor.resolve_allowed(call(), "conn_b", clock())  # new principal for conn_b, known peer
    monitor.resolve_allowed(call(peer="ipv4:10.9.9.9:1"), "conn_a", clock())  # known pair, new peer
    await monitor.close()
    assert await rules(sqlite_store) == [("new_principal_peer", "alerted")]

    again = Monitor(sqlite_store, sqlite_store, sqlite_store, clock)
    await again.open()
    again.resolve_allowed(call(peer="ipv4:10.9.9.9:2"), "conn_b", clock())
    again.resolve_allowed(call(peer="ipv4:10.0.0.5:3"), "conn_c", clock())
    await again.close()
    assert len(await rules(sqlite_store)) == 1
    again.resolve_allowed(call(peer="ipv4:172.16.0.1:3"), "conn_d", clock())
    await again.settle()
    assert len(await rules(sqlite_store)) == 2


async def test_oauth_refresh_failures_alert_at_the_threshold(sqlite_store: SqliteStore) -> None:
    clock = FakeClock()
    monitor = Monitor(
        sqlite_store, sqlite_store, sqlite_store, clock, MonitorSettings(oauth_refresh_failures=2)
    )
    monitor.oauth_refresh_failed(record(), "invalid_client")
    await monitor.settle()
    assert await rules(sqlite_store) == []
    monitor.oauth_refresh_failed(record(), "server said: <b>no</b> token=abc")
    await monitor.settle()
    (event,) = await sqlite_store.list_security_events("default", SecurityEventFilter(), 10, None)
    assert event.rule == "oauth_refresh_failures" and event.connection_id == "conn_1"
    assert event.details["last_failure"] == "other"  # only a short, plain code is repeated


async def test_wrong_role_alerts_once_per_window_and_blocks_nothing(sqlite_store: SqliteStore) -> None:
    clock = FakeClock()
    settings = MonitorSettings(wrong_role=3, wrong_role_window_seconds=10)
    monitor = Monitor(sqlite_store, sqlite_store, sqlite_store, clock, settings)
    for _ in range(50):  # a flood within one window: one event
        monitor.wrong_role(call(), "ListConnections", clock.advance(0.1))
    monitor.wrong_role(call(ADMIN), "Resolve", clock())  # another principal: its own count
    await monitor.settle()
    (event,) = await sqlite_store.list_security_events("default", SecurityEventFilter(), 10, None)
    assert (event.rule, event.principal, event.details["last_method"]) == (
        "wrong_role_burst",
        EXECUTOR.spiffe_id,
        "ListConnections",
    )
    assert not monitor.blocked("default", EXECUTOR.spiffe_id, clock())
    clock.advance(10)
    for _ in range(3):
        monitor.wrong_role(call(), "GetConnection", clock.advance(0.1))
    await monitor.settle()
    assert await rules(sqlite_store) == [("wrong_role_burst", "alerted")] * 2


async def test_wrong_role_audit_keeps_one_window_per_principal_under_concurrency(
    sqlite_store: SqliteStore,
) -> None:
    clock = FakeClock()
    audit = AuditLog(sqlite_store, clock=clock)
    monitor = Monitor(sqlite_store, sqlite_store, sqlite_store, clock, MonitorSettings(wrong_role=0))
    refusals = DenialAudit(audit, monitor, clock, per_window=4)
    method = "/broker.v1.AdminService/ListConnections"
    await asyncio.gather(*(refusals.wrong_role(call(), method) for _ in range(30)))
    await refusals.wrong_role(call(ADMIN), "/broker.v1.ResolveService/Resolve")
    await refusals.flush()  # nothing has passed yet
    clock.advance(WINDOW_SECONDS)
    await refusals.flush()
    await audit.close()

    def actions(events: list[AuditEvent]) -> list[tuple[str, str, str]]:
        return [(e.action, e.actor.rpartition("/")[2], e.details.get("count", "")) for e in events]

    events = await sqlite_store.export_audit("default", AuditFilter(), 100, None)
    assert actions(events) == [
        *[("rpc.denied", "demo", "")] * 4,
        ("rpc.denied", "cli", ""),
        ("rpc.denied.suppressed", "demo", "26"),  # the admin's window counted nothing more
    ]
    assert events[-1].details["methods"] == "ListConnections" and events[-1].outcome is Outcome.DENIED
