"""The executor SDK's book of leases: which it holds, when each is due for renewal, and which
are still live when it closes. No I/O: `client.py` makes the RenewLease and RevokeLease calls.

A lease is renewed when RENEW_AFTER of its current life has passed, until a renewal reaches
its `max_expires_at`; then it runs out. Only the newest lease of a ref (and run) is renewed:
resolving again after the cache TTL makes a new database user, and renewing every older one
as well would keep one user per TTL window alive until max_ttl. An older lease runs to its
current end, or is revoked on close. Thread-safe: the sync client renews from a thread.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace

RENEW_AFTER = 2 / 3
MIN_RETRY = 1.0  # seconds before a failed renewal is tried again


@dataclass(frozen=True)
class Lease:
    """A database user the broker made for this executor. Never the password (that is in
    `Resolved.secrets`). `expires_at` is as of the answer it came with; renewals move it."""

    id: str
    connection_id: str
    username: str
    expires_at: dt.datetime
    max_expires_at: dt.datetime | None
    run_id: str = ""
    state: str = "active"


@dataclass
class _Held:
    lease: Lease
    renew_at: float  # seconds since the epoch
    renewing: bool


class HeldLeases:
    """The leases a client holds, keyed by lease id; `wall_clock` is seconds since the epoch."""

    def __init__(self, wall_clock: Callable[[], float]) -> None:
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._newest: dict[Hashable, str] = {}  # per ref (and run): the lease that is renewed

    def add(self, key: Hashable, lease: Lease) -> None:
        """Hold `lease`, the newest of `key`: an older lease of the same key is no longer renewed."""
        with self._lock:
            previous = self._newest.get(key)
            if previous is not None and previous != lease.id and previous in self._held:
                self._held[previous].renewing = False
            self._newest[key] = lease.id
            if lease.id not in self._held:
                self._held[lease.id] = self._schedule(lease, renewing=True)

    def due(self) -> list[Lease]:
        """The leases to renew now; leases past their end are forgotten."""
        now = self._wall_clock()
        with self._lock:
            self._forget_ended(now)
            return [h.lease for h in self._held.values() if h.renewing and h.renew_at <= now]

    def seconds_to_next(self) -> float | None:
        """Seconds until the next renewal is due (0 when one is), None when none will be."""
        now = self._wall_clock()
        with self._lock:
            times = [h.renew_at for h in self._held.values() if h.renewing]
        return max(0.0, min(times) - now) if times else None

    def renewed(self, lease: Lease) -> None:
        """A renewal's answer: the new end, and when to renew next (never once at max_expires_at)."""
        with self._lock:
            held = self._held.get(lease.id)
            if held is not None:
                merged = replace(held.lease, expires_at=lease.expires_at, state=lease.state)
                self._held[lease.id] = self._schedule(merged, renewing=held.renewing)

    def retry_later(self, lease_id: str) -> None:
        """A renewal failed for a reason that may pass: try again before the lease ends."""
        now = self._wall_clock()
        with self._lock:
            held = self._held.get(lease_id)
            if held is not None:
                remaining = held.lease.expires_at.timestamp() - now
                held.renew_at = now + max(MIN_RETRY, remaining / 2)

    def remove(self, lease_id: str) -> None:
        """Forget a lease: it ended, or was revoked."""
        with self._lock:
            self._held.pop(lease_id, None)

    def take_live(self) -> list[Lease]:
        """Every lease not past its end, forgotten here: what `close` revokes."""
        now = self._wall_clock()
        with self._lock:
            self._forget_ended(now)
            live = [h.lease for h in self._held.values()]
            self._held.clear()
            self._newest.clear()
        return live

    def _schedule(self, lease: Lease, *, renewing: bool) -> _Held:
        now = self._wall_clock()
        end = lease.expires_at.timestamp()
        at_max = lease.max_expires_at is not None and lease.expires_at >= lease.max_expires_at
        return _Held(lease, now + RENEW_AFTER * max(0.0, end - now), renewing and not at_max)

    def _forget_ended(self, now: float) -> None:
        for lease_id in [i for i, h in self._held.items() if h.lease.expires_at.timestamp() <= now]:
            del self._held[lease_id]
        # Bounded by the leases held, not by every ref and run ever resolved.
        for key in [k for k, lease_id in self._newest.items() if lease_id not in self._held]:
            del self._newest[key]
