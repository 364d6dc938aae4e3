"""The change feed across replicas on PostgreSQL: writes NOTIFY, every replica LISTENs.

Each change message (`broker.store.changes`) of a transaction is also sent with
`notify()` in that transaction (so is a principal blocked by a replica's monitor,
which is not a row); PostgreSQL delivers it to every listening session when, and
only if, the transaction commits. `Listener` keeps one dedicated connection per
replica LISTENing and hands each message to the `ChangeSink` (the Resolve cache);
the writing replica's own listener hears its messages again, which only forgets
what was forgotten already.

A replica that is not listening would miss other replicas' changes, so the sink
is told at once (`changes_unseen`: forget everything, cache nothing) when:
  * the connection reports it was lost (a terminated backend, a closed socket), or
  * a heartbeat query on it does not answer within `heartbeat_seconds` (a silent
    network partition: no error ever arrives, only silence).
The listener then reconnects with backoff and, once LISTEN is in effect again,
tells the sink `changes_seen` (forget what may have been missed, cache again).
Any commit after LISTEN took effect is notified; any commit before it is read
from the database after the sink forgot everything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import structlog

from broker.store.changes import deliver
from broker.store.protocols import ChangeSink

log = structlog.get_logger("broker.store.changes")

CHANNEL = "broker_changes"


async def notify(conn: asyncpg.Connection, message: str) -> None:
    """Queue a message (`broker.store.changes`) for every listener; sent when this transaction commits."""
    # Messages are a few hundred bytes at most (ids and principals are bounded), far
    # below PostgreSQL's 8,000-byte limit.
    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, message)


class Listener:
    """One LISTENing connection, kept alive; see the module docstring."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        sink: ChangeSink,
        *,
        heartbeat_seconds: float = 1.0,
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self._connect = connect
        self._sink = sink
        self._heartbeat = heartbeat_seconds
        self._max_backoff = max_backoff_seconds
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._conn: asyncpg.Connection | None = None  # the session being listened on
        self.listening = False
        self.server_pid: int | None = None  # the listening session's backend, for operators and tests

    async def start(self, first_attempt_timeout: float) -> None:
        """Begin listening; wait up to `first_attempt_timeout` for the first LISTEN to be in effect."""
        self._set_unseen()
        connected = asyncio.Event()
        self._task = asyncio.create_task(self._run(connected))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connected.wait(), first_attempt_timeout)
        if not self.listening:
            log.warning("change_listener_not_connected_yet", detail="serving Resolve from the database")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, connected: asyncio.Event) -> None:
        backoff = 0.1
        while True:
            conn = None
            listened = False
            try:
                conn = await asyncio.wait_for(self._connect(), timeout=max(self._heartbeat * 5, 5.0))
                self._conn = conn
                self._lost.clear()
                self.server_pid = conn.get_server_pid()
                conn.add_termination_listener(self._on_terminated)
                await conn.add_listener(CHANNEL, self._on_message)
                # LISTEN is in effect: from here on every commit is notified to us.
                self.listening = listened = True
                self._sink.changes_seen()
                log.info("change_listener_connected")
                connected.set()
                backoff = 0.1
                await self._watch(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure to connect or to keep listening
                # Once per attempt, so at most every `max_backoff_seconds` while it lasts.
                event = "change_listener_lost" if listened else "change_listener_connect_failed"
                log.warning(event, error_type=type(exc).__name__, retry_in_seconds=backoff)
            finally:
                self._set_unseen()
                if conn is not None:
                    conn.terminate()  # no graceful close: the connection may be half dead
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Return (by raising) when the connection is lost or stops answering the heartbeat."""
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # (close) that comes as the connection is lost, and the listener would not stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._heartbeat):
                    await self._lost.wait()
            if self._lost.is_set():
                raise ConnectionError("the listening connection was closed")
            # Raises TimeoutError when the server stopped answering (nothing else would tell us).
            await asyncio.wait_for(conn.fetchval("SELECT 1"), self._heartbeat)

    def _set_unseen(self) -> None:
        self.listening = False
        self._sink.changes_unseen()

    def _on_terminated(self, conn: Any) -> None:
        # Called by asyncpg on the event loop as soon as the connection is lost: stop trusting
        # the cache now, not at the next heartbeat. (Not for a session already given up.)
        if conn is self._conn:
            self._set_unseen()
            self._lost.set()

    def _on_message(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        deliver(self._sink, payload)
