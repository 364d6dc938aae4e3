"""Refused calls: audited in full up to a limit per principal, then counted and summarised.

Two kinds of refusal can come in floods that would otherwise write an audit row per
call (1,500 rows in 3 s) and bury what else the audit holds:
* a valid certificate of this trust domain with the wrong role for the listener (an
  executor on the admin listener, an admin on the Resolve listener): PERMISSION_DENIED,
  audited as `rpc.denied` with reason `wrong_role` and the method;
* a call over its rate limit: RESOURCE_EXHAUSTED, audited as `rate_limited` with the
  class of call as the reason (`broker.service.ratelimit`).

Each (principal, action, reason) has fixed windows of `WINDOW_SECONDS`, from its first
refusal: the first `per_window` refusals of a window are audited one by one; the rest
are only counted, and one `<action>.suppressed` record per window says how many there
were (and, for wrong-role calls, which methods they tried). The summary is written once
the window has passed: by the next such refusal, by the periodic `flush`, or at `close`
(shutdown). Every wrong-role refusal, audited or counted, also feeds the monitor's
`wrong_role` rule, which raises a security event for a burst.

Callers whose certificate carries no accepted identity are refused UNAUTHENTICATED
before any of this: they have no tenant to audit for, and are not audited (only
logged and counted in the RPC metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from broker import metrics
from broker.model import Outcome
from broker.service.audit import AuditLog
from broker.service.context import Call
from broker.service.monitor import Monitor

log = structlog.get_logger("broker.denials")

WINDOW_SECONDS = 60.0
WRONG_ROLE = "wrong_role"
MAX_TRACKED = 100_000  # principals with an open window; the oldest is summarised early beyond it


@dataclass
class _Window:
    action: str
    reason: str
    started: float
    audited: int = 0
    suppressed: int = 0
    methods: set[str] = field(default_factory=set)  # the listener's own method names: a small, fixed set
    last: Call | None = None  # the latest suppressed call: its request id and peer go in the summary


class DenialAudit:
    """The bounded audit of refused calls; `wrong_role` is the interceptor's wrong-role hook."""

    def __init__(
        self,
        audit: AuditLog,
        monitor: Monitor,
        clock: Callable[[], datetime],
        per_window: int,
        flush_seconds: float = 5.0,
    ) -> None:
        self._audit = audit
        self._monitor = monitor
        self._clock = clock
        self._per_window = per_window
        self._flush_seconds = flush_seconds
        # (tenant, principal, action, reason) -> its window, oldest first: a window that passed
        # is removed and a new one appended, so the ones that have passed are always at the front.
        self._windows: dict[tuple[str, str, str, str], _Window] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def wrong_role(self, call: Call, method: str) -> None:
        """A call refused for its role (`method` is the full gRPC method): watched and audited."""
        now = self._clock()
        name = method.rpartition("/")[2]
        self._monitor.wrong_role(call, name, now)
        await self.refused(call, "rpc.denied", WRONG_ROLE, name, now)

    async def refused(
        self, call: Call, action: str, reason: str, method: str = "", now: datetime | None = None
    ) -> None:
        """A refused call: audited in full, or counted towards its window's summary."""
        now = self._clock() if now is None else now
        t = now.timestamp()
        key = (call.tenant, call.actor, action, reason)
        # The bookkeeping first, with no await in it: concurrent refusals of one principal must
        # see one window. The writes come after.
        passed: list[_Window] = []
        window = self._windows.get(key)
        if window is not None and t - window.started >= WINDOW_SECONDS:
            passed.append(self._windows.pop(key))
            window = None
        if window is None:
            if len(self._windows) >= MAX_TRACKED:
                passed.append(self._windows.pop(next(iter(self._windows))))
            window = self._windows[key] = _Window(action, reason, started=t)
        in_full = window.audited < self._per_window
        if in_full:
            window.audited += 1
        else:
            window.suppressed += 1
            if method:
                window.methods.add(method)
            window.last = call
            metrics.DENIALS_NOT_AUDITED.labels(reason).inc()
        for done in passed:
            await self._summarise(done)
        if in_full:
            details = {"method": method} if method else {}
            await self._audit.append(call.audit_event(now, action, "", Outcome.DENIED, reason, details))

    async def _summarise(self, window: _Window) -> None:
        """One audit record for what a window only counted; nothing when it counted nothing."""
        if window.last is None:
            return
        details = {"count": str(window.suppressed), "window_seconds": f"{WINDOW_SECONDS:g}"}
        if window.methods:
            details["methods"] = ",".join(sorted(window.methods))
        event = window.last.audit_event(
            self._clock(), f"{window.action}.suppressed", "", Outcome.DENIED, window.reason, details
        )
        try:
            await self._audit.append(event)
        except Exception as exc:  # the count is lost, not the refusals: those stood
            log.warning("denied_summary_not_audited", error_type=type(exc).__name__, count=window.suppressed)

    async def flush(self, everything: bool = False) -> None:
        """Summarise the windows that have passed (with `everything`: all of them, at shutdown)."""
        t = self._clock().timestamp()
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if not everything and t - window.started < WINDOW_SECONDS:
                return
            del self._windows[key]
            await self._summarise(window)

    def start(self) -> None:
        """Summarise passed windows in the background, so a flood that stops is still reported."""
        self._flusher = asyncio.create_task(self._flush_periodically())

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            await self.flush()

    async def close(self) -> None:
        """Stop the background flush and summarise every open window (before the audit closes)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush(everything=True)
