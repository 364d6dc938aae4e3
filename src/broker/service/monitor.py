"""The security monitor: rules over what the broker serves, security events, suspension.

Rules (each set in `[monitor]`; a threshold of 0 turns its rule off):

- failed_tests: N failed tests of one stored connection within a window suspend it;
- denied_burst: N probing denials (unknown connection, no or expired grant, deleted or
  revoked connection) of one principal within a window flag it, and with
  `block_seconds` > 0 deny its Resolves for that long;
- volume_spike: a principal x connection's Resolves in the current window above
  max(min_count, factor x the exponentially weighted average of its earlier windows)
  alert, and suspend the connection with `suspend_on_spike`;
- new_principal_peer: a principal's first Resolve of a connection, from a peer host
  never seen for that principal, alerts (what was seen is persisted, bounded);
- oauth_refresh_failures: N failed refreshes of one connection within a window alert;
- decrypt_failed: a stored secret that does not open (tampered with, re-pointed in the
  database without re-sealing, or its master key gone) is a critical event, once per
  connection and hour; the monitor sees it in the audit stream (`audited`);
- wrong_role: N calls of one principal refused for its role (an executor on the admin
  listener, an admin on the Resolve listener) within a window alert, once per window:
  a valid certificate probing the other listener. It blocks nothing; the refusals are
  audited (bounded, `broker.service.denials`).

The Resolve path feeds the monitor in memory (a few dict and deque operations, no
store read); the store is written only when a rule fires, and in the background.
Counters are per process: with several replicas, each counts what it serves. A block
is shared: the replica that blocks announces it (`Coordination.announce_block`) and every
replica's monitor denies the principal until the same time.
A security event never holds a secret: rule, principal, connection id, peer, what
was done, and a few counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import structlog

from broker import metrics
from broker.config import MonitorSettings
from broker.errors import Aborted, InvalidArgument
from broker.model import (
    AuditEvent,
    ConnectionRecord,
    ConnectionStatus,
    SecurityEvent,
    SecurityEventFilter,
    SeenFact,
)
from broker.service import paging
from broker.service.alerts import AlertSender
from broker.service.context import Call, system_event
from broker.service.inputs import require_printable
from broker.service.lookup import existing_connection
from broker.service.sealing import DECRYPT_FAILED
from broker.store import ConnectionStore, Coordination, SecurityEventStore

log = structlog.get_logger("broker.monitor")

SYSTEM_ACTOR = "broker:monitor"
WARNING = "warning"
DECRYPT_FAILED_ALERT_SECONDS = 3600.0
CRITICAL = "critical"
ALERTED = "alerted"
SUSPENDED = "connection_suspended"
BLOCKED = "principal_blocked"
# Denials that look like probing (proxy_only: an executor trusted only with proxied calls asking
# for the secret itself); a blocked principal's or a suspended connection's own denials do not
# count again.
PROBING_REASONS = frozenset(
    {
        "unknown_connection",
        "connection_deleted",
        "connection_revoked",
        "no_grant",
        "grant_expired",
        "proxy_only",
    }
)
MAX_REASON = 512
_CODE = re.compile(r"[A-Za-z0-9._-]{1,64}")


# ------------------------------------------------------------------ arithmetic


class Burst:
    """Fires when `threshold` hits of one key fall within `window` seconds, then starts over
    (with `once_per_window`: after `window` seconds, so a sustained flood fires once a window).

    Only the last `threshold` times per key are kept: the burst is there exactly
    when the oldest of them is less than `window` before the newest.
    """

    def __init__(
        self, threshold: int, window: float, max_keys: int = 100_000, *, once_per_window: bool = False
    ) -> None:
        self.threshold = threshold
        self.window = window
        self._max_keys = max_keys
        self._times: dict[Hashable, deque[float]] = {}
        self._once_per_window = once_per_window
        self._fired: dict[Hashable, float] = {}  # key -> when it last fired (once_per_window)

    def hit(self, key: Hashable, t: float) -> bool:
        if self.threshold < 1:
            return False
        fired = self._fired.get(key)
        if fired is not None:
            if t - fired < self.window:
                return False
            del self._fired[key]
        times = self._times.get(key)
        if times is None:
            if len(self._times) >= self._max_keys:
                del self._times[next(iter(self._times))]
            times = self._times[key] = deque(maxlen=self.threshold)
        times.append(t)
        if len(times) == self.threshold and t - times[0] < self.window:
            del self._times[key]
            if self._once_per_window:
                if len(self._fired) >= self._max_keys:
                    del self._fired[next(iter(self._fired))]
                self._fired[key] = t
            return True
        return False

    def forget(self, key: Hashable) -> None:
        self._times.pop(key, None)
        self._fired.pop(key, None)


@dataclass
class _Rate:
    origin: float
    window: int = 0
    count: int = 0
    average: float | None = None
    fired: bool = False


class Spike:
    """Counts per key in consecutive windows (from the key's first hit) against an EWMA baseline.

    `hit` returns (count, baseline) the first time in a window that the count goes
    above max(min_count, factor x baseline); the baseline is the exponentially
    weighted average of the earlier windows (empty ones count as 0), 0 before any.
    """

    def __init__(
        self, factor: float, min_count: int, window: float, smoothing: float, max_keys: int = 100_000
    ) -> None:
        self.factor = factor
        self.min_count = min_count
        self.window = window
        self.smoothing = smoothing
        self._max_keys = max_keys
        self._rates: dict[Hashable, _Rate] = {}

    def hit(self, key: Hashable, t: float) -> tuple[int, float] | None:
        if self.min_count < 1:
            return None
        rate = self._rates.get(key)
        if rate is None:
            if len(self._rates) >= self._max_keys:
                del self._rates[next(iter(self._rates))]
            rate = self._rates[key] = _Rate(origin=t)
        index = int((t - rate.origin) // self.window)
        if index > rate.window:
            self._roll(rate, index)
        rate.count += 1
        baseline = rate.average or 0.0
        if not rate.fired and rate.count > max(self.min_count, self.factor * baseline):
            rate.fired = True
            return rate.count, baseline
        return None

    def _roll(self, rate: _Rate, index: int) -> None:
        a = self.smoothing
        average = float(rate.count) if rate.average is None else a * rate.count + (1 - a) * rate.average
        empty = min(index - rate.window - 1, 10_000)
        rate.average = average * (1 - a) ** empty
        rate.window, rate.count, rate.fired = index, 0, False


class Seen:
    """Objects seen per (tenant, kind, subject), newest last, at most `per_subject` each."""

    def __init__(self, per_subject: int, max_subjects: int) -> None:
        self._per_subject = per_subject
        self._max_subjects = max_subjects
        self._objects: dict[tuple[str, str, str], dict[str, None]] = {}

    def __contains__(self, fact: tuple[str, str, str, str]) -> bool:
        objects = self._objects.get(fact[:3])
        return objects is not None and fact[3] in objects

    def add(self, tenant: str, kind: str, subject: str, obj: str) -> None:
        key = (tenant, kind, subject)
        objects = self._objects.get(key)
        if objects is None:
            if len(self._objects) >= self._max_subjects:
                del self._objects[next(iter(self._objects))]
            objects = self._objects[key] = {}
        objects[obj] = None
        if len(objects) > self._per_subject:
            del objects[next(iter(objects))]


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string (`ipv4:10.0.0.5:51234`, `ipv6:%5B::1%5D:5555`)."""
    kind, sep, rest = unquote(peer).partition(":")
    if sep and kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0].strip("[]")
        return host or rest
    return peer


def _seconds(when: datetime) -> float:
    return when.timestamp()


def _code(text: str) -> str:
    """A short code from outside (an OAuth error code) as is; anything else is not repeated."""
    return text if _CODE.fullmatch(text) else "other"


# --------------------------------------------------------------------- monitor


class Monitor:
    """The rules, their state, and what happens when one fires. See the module docstring."""

    def __init__(
        self,
        events: SecurityEventStore,
        connections: ConnectionStore,
        coordination: Coordination,
        clock: Callable[[], datetime],
        settings: MonitorSettings = MonitorSettings(),  # noqa: B008 (frozen)
        alerts: AlertSender | None = None,
    ) -> None:
        self._events = events
        self._connections = connections
        self._coordination = coordination
        self._clock = clock
        self.settings = s = settings
        self._alerts = alerts
        self._failed_tests = Burst(s.failed_tests, s.failed_tests_window_seconds, s.max_tracked)
        self._denied = Burst(s.denied_resolves, s.denied_window_seconds, s.max_tracked)
        self._oauth = Burst(s.oauth_refresh_failures, s.oauth_refresh_window_seconds, s.max_tracked)
        self._wrong_role = Burst(
            s.wrong_role, s.wrong_role_window_seconds, s.max_tracked, once_per_window=True
        )
        self._decrypt_failed = Burst(1, DECRYPT_FAILED_ALERT_SECONDS, s.max_tracked, once_per_window=True)
        smoothing = s.spike_smoothing
        self._spike = Spike(
            s.spike_factor, s.spike_min_count, s.spike_window_seconds, smoothing, s.max_tracked
        )
        self._seen = Seen(s.seen_per_subject, s.max_tracked)
        self._new_facts: list[SeenFact] = []
        self._blocked: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None

    # ------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Load what new_principal_peer remembers."""
        facts = await self._events.load_seen(self.settings.max_tracked)
        for fact in reversed(facts):  # oldest first, so the newest stay when a subject is full
            self._seen.add(fact.tenant, fact.kind, fact.subject, fact.object)

    def start(self) -> None:
        """Flush what is seen in the background, and start sending alerts."""
        self._flusher = asyncio.create_task(self._flush_periodically())
        if self._alerts is not None:
            self._alerts.start()

    async def settle(self) -> None:
        """Wait until every event raised so far is stored and what was seen is flushed."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))
        await self.flush_seen()

    async def close(self) -> None:
        """Stop the flusher, finish pending events, write what is left, let queued alerts go."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.settle()
        if self._alerts is not None:
            await self._alerts.close()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.seen_flush_seconds)
            await self.flush_seen()

    async def flush_seen(self) -> None:
        """Persist newly seen facts in one transaction; on failure they are kept for the next try."""
        if not self._new_facts:
            return
        batch, self._new_facts = self._new_facts, []
        try:
            await self._events.remember_seen(batch, self.settings.seen_per_subject)
        except Exception as exc:
            log.warning("monitor_seen_flush_failed", error_type=type(exc).__name__, count=len(batch))
            self._new_facts = batch[-self.settings.max_tracked :] + self._new_facts

    # ------------------------------------------------- the Resolve path

    def block(self, tenant: str, principal: str, until: float) -> None:
        """Deny the principal's Resolves until `until` (seconds since the epoch); here, or told
        by another replica's monitor through the store's change feed."""
        key = (tenant, principal)
        self._blocked[key] = max(until, self._blocked.get(key, until))
        if len(self._blocked) > self.settings.max_tracked:
            del self._blocked[next(iter(self._blocked))]

    def blocked(self, tenant: str, principal: str, now: datetime) -> bool:
        """Whether the principal is in a cool-down after a denied burst."""
        until = self._blocked.get((tenant, principal))
        if until is None:
            return False
        if _seconds(now) < until:
            return True
        del self._blocked[(tenant, principal)]
        return False

    def resolve_denied(self, call: Call, connection_id: str, reason: str, now: datetime) -> None:
        """A denied Resolve; probing reasons count towards denied_burst."""
        if reason not in PROBING_REASONS:
            return
        key = (call.tenant, call.actor)
        if not self._denied.hit(key, _seconds(now)):
            return
        s = self.settings
        details = {"count": str(s.denied_resolves), "window_seconds": f"{s.denied_window_seconds:g}"}
        details["last_reason"] = reason
        action, severity = ALERTED, WARNING
        if s.block_seconds > 0:
            until = _seconds(now) + s.block_seconds
            self.block(call.tenant, call.actor, until)
            self._spawn(self._announce_block(call.tenant, call.actor, until))
            action, severity = BLOCKED, CRITICAL
            details["block_seconds"] = f"{s.block_seconds:g}"
        event = self._event(now, call, "denied_burst", severity, action, connection_id, details)
        self._spawn(self._record(event, suspend=False))

    def resolve_allowed(self, call: Call, connection_id: str, now: datetime) -> None:
        """A released secret: volume_spike and new_principal_peer."""
        s = self.settings
        spike = self._spike.hit((call.tenant, call.actor, connection_id), _seconds(now))
        if spike is not None:
            count, baseline = spike
            suspend = s.suspend_on_spike
            details = {
                "count": str(count),
                "baseline": f"{baseline:.1f}",
                "window_seconds": f"{s.spike_window_seconds:g}",
            }
            severity = CRITICAL if suspend else WARNING
            event = self._event(now, call, "volume_spike", severity, ALERTED, connection_id, details)
            self._spawn(self._record(event, suspend=suspend))
        self._saw(call, connection_id, now)

    def _saw(self, call: Call, connection_id: str, now: datetime) -> None:
        tenant, actor = call.tenant, call.actor
        new_pair = (tenant, "principal", connection_id, actor) not in self._seen
        host = peer_host(call.peer)
        new_peer = bool(host) and (tenant, "peer", actor, host) not in self._seen
        if not (new_pair or new_peer):
            return
        if new_pair:
            self._remember(SeenFact(tenant, "principal", connection_id, actor, now))
        if new_peer:
            self._remember(SeenFact(tenant, "peer", actor, host, now))
        if new_pair and new_peer and self.settings.new_principal_peer:
            details = {"peer_host": host}
            event = self._event(now, call, "new_principal_peer", WARNING, ALERTED, connection_id, details)
            self._spawn(self._record(event, suspend=False))

    def _remember(self, fact: SeenFact) -> None:
        self._seen.add(fact.tenant, fact.kind, fact.subject, fact.object)
        if len(self._new_facts) < self.settings.max_tracked:
            self._new_facts.append(fact)

    # ------------------------------------------------------ other feeds

    async def test_finished(self, call: Call, connection_id: str, success: bool, category: str) -> None:
        """A stored connection's test; enough failures in the window suspend it (before this returns)."""
        if success:
            return
        now = self._clock()
        if not self._failed_tests.hit((call.tenant, connection_id), _seconds(now)):
            return
        s = self.settings
        details = {
            "count": str(s.failed_tests),
            "window_seconds": f"{s.failed_tests_window_seconds:g}",
            "last_category": category,
        }
        event = self._event(now, call, "failed_tests", CRITICAL, ALERTED, connection_id, details)
        await self._record(event, suspend=True)

    def oauth_refresh_failed(self, record: ConnectionRecord, failure: str) -> None:
        """A refresh that could not complete; enough of them in the window alert."""
        now = self._clock()
        if not self._oauth.hit((record.tenant, record.id), _seconds(now)):
            return
        s = self.settings
        details = {
            "count": str(s.oauth_refresh_failures),
            "window_seconds": f"{s.oauth_refresh_window_seconds:g}",
            "last_failure": _code(failure),
        }
        event = SecurityEvent(
            time=now,
            tenant=record.tenant,
            rule="oauth_refresh_failures",
            severity=WARNING,
            action=ALERTED,
            connection_id=record.id,
            details=details,
        )
        self._spawn(self._record(event, suspend=False))

    def audited(self, event: AuditEvent) -> None:
        """Every event the audit log appends, in memory (no await: Resolve appends one per call)."""
        if event.reason != DECRYPT_FAILED:
            return
        if not self._decrypt_failed.hit((event.tenant, event.connection_id), _seconds(event.time)):
            return
        details = {"action": event.action, "window_seconds": f"{DECRYPT_FAILED_ALERT_SECONDS:g}"}
        security = SecurityEvent(
            time=event.time,
            tenant=event.tenant,
            rule="decrypt_failed",
            severity=CRITICAL,
            action=ALERTED,
            connection_id=event.connection_id,
            principal=event.actor,
            peer=event.peer,
            details=details,
        )
        self._spawn(self._record(security, suspend=False))

    def wrong_role(self, call: Call, method: str, now: datetime) -> None:
        """A call refused because the caller's role does not match the listener's service."""
        if not self._wrong_role.hit((call.tenant, call.actor), _seconds(now)):
            return
        s = self.settings
        details = {
            "count": str(s.wrong_role),
            "window_seconds": f"{s.wrong_role_window_seconds:g}",
            "last_method": method,
        }
        event = self._event(now, call, "wrong_role_burst", WARNING, ALERTED, "", details)
        self._spawn(self._record(event, suspend=False))

    def tool_changed(self, call: Call, connection_id: str, tool: str, gone: bool, now: datetime) -> None:
        """An MCP server describes an approved tool differently (or no longer lists it): a tool
        call was refused. Every one is an event: a changed tool is how a server turns on an agent."""
        details = {"tool": tool[:128], "change": "removed" if gone else "definition_changed"}
        event = self._event(now, call, "mcp_tool_changed", CRITICAL, ALERTED, connection_id, details)
        self._spawn(self._record(event, suspend=False))

    # ------------------------------------------------------ when a rule fires

    @staticmethod
    def _event(
        now: datetime,
        call: Call,
        rule: str,
        severity: str,
        action: str,
        connection_id: str,
        details: dict[str, str],
    ) -> SecurityEvent:
        return SecurityEvent(
            time=now,
            tenant=call.tenant,
            rule=rule,
            severity=severity,
            action=action,
            principal=call.actor,
            connection_id=connection_id,
            peer=call.peer,
            details=details,
        )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce_block(self, tenant: str, principal: str, until: float) -> None:
        """Other replicas block the principal too; a failure leaves the block to this replica."""
        try:
            await self._coordination.announce_block(tenant, principal, until)
        except Exception as exc:
            log.error("block_not_announced", error_type=type(exc).__name__)

    async def _record(self, event: SecurityEvent, *, suspend: bool) -> None:
        """Suspend when asked, store the event, count, log, alert. Never raises."""
        try:
            if suspend and event.connection_id and await self._suspend(event):
                event = replace(event, action=SUSPENDED, severity=CRITICAL)
            stored = await self._events.add_security_event(event)
        except Exception as exc:
            log.error("security_event_not_stored", rule=event.rule, error_type=type(exc).__name__)
            stored = event
        metrics.SECURITY_EVENTS.labels(event.rule).inc()
        log.warning(
            "security_event",
            rule=stored.rule,
            action=stored.action,
            tenant=stored.tenant,
            principal=stored.principal,
            connection_id=stored.connection_id,
            **stored.details,
        )
        if self._alerts is not None:
            self._alerts.send(stored)

    async def _suspend(self, event: SecurityEvent) -> bool:
        """Set suspended_at with a compare-and-swap; False when there was nothing to suspend."""
        tenant, connection_id = event.tenant, event.connection_id
        for _ in range(3):
            record = await self._connections.get_connection(tenant, connection_id)
            if (
                record is None
                or not record.live
                or record.status is ConnectionStatus.REVOKED
                or record.suspended_at is not None
            ):
                return False
            now = self._clock()
            suspended = replace(record, suspended_at=now, version=record.version + 1, updated_at=now)
            details = {"principal": event.principal} if event.principal else {}
            audit = system_event(
                now,
                SYSTEM_ACTOR,
                tenant,
                connection_id,
                "connection.suspend",
                reason=event.rule,
                details=details,
            )
            try:
                await self._connections.replace_connection(suspended, record.version, audit)
            except Aborted:
                continue  # changed under us: read again
            return True
        return False

    # ------------------------------------------------------------- admin

    async def reinstate(self, call: Call, connection_id: str, reason: str) -> ConnectionRecord:
        """Clear a suspension (audited); a connection that is not suspended is returned unchanged."""
        if len(reason) > MAX_REASON:
            raise InvalidArgument.field("reason", f"must be at most {MAX_REASON} characters")
        require_printable(reason=reason)
        current = await existing_connection(self._connections, call.tenant, connection_id)
        if current.suspended_at is None:
            return current
        now = self._clock()
        record = replace(current, suspended_at=None, version=current.version + 1, updated_at=now)
        details = {"suspended_at": current.suspended_at.isoformat()}
        event = call.audit_event(now, "connection.reinstate", current.id, reason=reason, details=details)
        await self._connections.replace_connection(record, current.version, event)
        self._failed_tests.forget((current.tenant, current.id))
        return record

    async def list(
        self, call: Call, filter: SecurityEventFilter, page_size: int, page_token: str
    ) -> tuple[list[SecurityEvent], str]:
        """One page of the caller's tenant's security events, newest first."""

        def fetch(limit: int, before: int | None) -> Awaitable[list[SecurityEvent]]:
            return self._events.list_security_events(call.tenant, filter, limit, before)

        require_printable(rule=filter.rule, connection_id=filter.connection_id, principal=filter.principal)
        return await paging.newest_first("security", filter, page_size, page_token, fetch)
