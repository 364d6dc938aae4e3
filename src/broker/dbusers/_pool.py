"""`AdminPool`: administrative sessions kept open per connection and reused.

Opening a session is most of what a lease costs (a TCP and TLS handshake, authentication, a
server process forked on PostgreSQL), and a burst of Resolves on one dynamic connection would
otherwise open a database connection each. So per connection:

* at most `size` sessions exist at once; a caller beyond that waits for one (Resolve's wait is
  bounded by the caller's deadline);
* a session is handed back after use and kept for `idle_seconds`, then closed (`prune`);
* a kept session is pinged before reuse, and one that no longer answers (the server restarted,
  or ended it while idle) is closed and another taken or opened: a stale session never fails a
  lease;
* a session whose use raised is closed, never kept: its state is unknown;
* a newer version of the connection's record (new credentials or settings) retires every kept
  session of the older one; a caller still holding an older record gets a session of its own,
  closed after use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from broker.dbusers._admin import UserAdmin
from broker.dbusers._errors import LeaseDbError

Key = tuple[str, str]  # (tenant, connection id)


@dataclass(eq=False)
class _Slots:
    version: int
    limit: asyncio.Semaphore
    idle: list[tuple[UserAdmin, float]] = field(default_factory=list)  # newest last
    in_use: int = 0
    retired: bool = False


class AdminPool:
    """See the module docstring. `size` 1+, `idle_seconds` 0 keeps nothing (a session per use)."""

    def __init__(self, size: int, idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if size < 1:
            raise ValueError("an admin pool holds at least one session per connection")
        self._size = size
        self._idle_seconds = idle_seconds
        self._clock = clock
        self._slots: dict[Key, _Slots] = {}

    @contextlib.asynccontextmanager
    async def session(
        self, key: Key, version: int, open_admin: Callable[[], Awaitable[UserAdmin]]
    ) -> AsyncIterator[UserAdmin]:
        """A session to the connection `key` at record `version`, opened with `open_admin` when no
        kept one answers. LeaseDbError from opening it; whatever the block raises, after the
        session was closed."""
        slots = self._slots.get(key)
        if slots is not None and slots.version > version:
            async with await open_admin() as own:  # an older record: not pooled
                yield own
            return
        if slots is None or slots.version < version:
            # In place before the first await, so concurrent callers share the new slots.
            older, slots = slots, _Slots(version, asyncio.Semaphore(self._size))
            self._slots[key] = slots
            if older is not None:
                await self._retire(older)
        async with slots.limit:
            slots.in_use += 1
            try:
                admin = await self._kept(slots) or await open_admin()
                kept = False
                try:
                    yield admin
                    kept = not slots.retired and self._idle_seconds > 0
                finally:
                    if kept:
                        slots.idle.append((admin, self._clock()))
                    else:
                        await admin.close()
            finally:
                slots.in_use -= 1

    async def _kept(self, slots: _Slots) -> UserAdmin | None:
        """The newest kept session that still answers; the others that do not are closed."""
        while slots.idle:
            admin, _ = slots.idle.pop()
            try:
                await admin.ping()
            except LeaseDbError:
                await admin.close()
                continue
            return admin
        return None

    async def prune(self) -> None:
        """Close the sessions kept longer than `idle_seconds`, and forget connections with none."""
        oldest = self._clock() - self._idle_seconds
        for key, slots in list(self._slots.items()):
            stale = [admin for admin, since in slots.idle if since <= oldest]
            slots.idle = [(admin, since) for admin, since in slots.idle if since > oldest]
            for admin in stale:
                await admin.close()
            if not slots.idle and not slots.in_use and self._slots.get(key) is slots:
                del self._slots[key]

    async def close(self) -> None:
        """Close every kept session; those in use are closed when handed back."""
        slots, self._slots = list(self._slots.values()), {}
        for each in slots:
            await self._retire(each)

    @staticmethod
    async def _retire(slots: _Slots) -> None:
        slots.retired = True
        idle, slots.idle = slots.idle, []
        for admin, _ in idle:
            await admin.close()
