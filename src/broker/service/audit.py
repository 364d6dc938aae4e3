"""The audit trail's write path for Resolve: durable group commit.

A Resolve's event must be on disk before its response is sent, and if it cannot
be written the Resolve fails. One fsync per call would cap throughput at the
disk's sync rate, so concurrent callers share a transaction: each `append`
joins the pending batch and waits; one writer task commits whatever has
accumulated while the previous commit was in flight, then wakes every waiter
of that batch with the outcome.

Admin mutations do not come through here: the store writes their events in the
same transaction as the change itself.

A failed or stuck write fails its batch (the callers get UNAVAILABLE, nothing is
released) and the writer goes on with the next batch; it never stops taking work.

The store chains every event into one hash chain (`broker.store._chain`); this
module verifies it, exports events for long-term storage, and prunes events older
than the retention period behind a checkpoint that keeps the rest verifiable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import structlog

from broker import metrics
from broker.crypto import Keyring
from broker.errors import BrokerError, InvalidArgument, Unavailable
from broker.model import AuditAnchors, AuditChainReport, AuditCheckpoint, AuditEvent, AuditFilter, AuditSeal
from broker.service import auditseal, paging
from broker.service.context import Call
from broker.service.inputs import require_printable
from broker.store import AuditLogStore

log = structlog.get_logger("broker.audit")

MAX_BATCH = 512
SEAL_INTERVAL_SECONDS = 60.0
# A write that takes longer fails its batch rather than holding every Resolve behind it.
WRITE_TIMEOUT_SECONDS = 10.0
DEFAULT_RETENTION = timedelta(days=365)
MIN_RETENTION = timedelta(days=90)
PRUNE_INTERVAL_SECONDS = 86400.0
_EXPORT_PAGE = 500
PROBLEM_SEEN_CHANGED = "an event this broker saw sealed was rewritten or cut off, with the seals after it"


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _check_filter(filter: AuditFilter) -> None:
    require_printable(connection_id=filter.connection_id, actor=filter.actor, action=filter.action)


class AuditLog:
    def __init__(
        self,
        store: AuditLogStore,
        max_batch: int = MAX_BATCH,
        *,
        clock: Callable[[], datetime] = _utc_now,
        retention: timedelta = DEFAULT_RETENTION,
        write_timeout: float = WRITE_TIMEOUT_SECONDS,
        keyring: Keyring | None = None,
        seal_interval: float = SEAL_INTERVAL_SECONDS,
        watch: Callable[[AuditEvent], None] | None = None,
    ) -> None:
        if retention < MIN_RETENTION:
            raise ValueError(f"audit retention must be at least {MIN_RETENTION.days} days")
        self._store = store
        self._max_batch = max_batch
        self._clock = clock
        self.retention = retention
        self._write_timeout = write_timeout
        self._pending: list[tuple[AuditEvent, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._pruner: asyncio.Task[None] | None = None
        # Seals (service/auditseal.py) need the master key; without a keyring there are none.
        self._keyring = keyring
        self._seal_interval = seal_interval
        self._sealer: asyncio.Task[None] | None = None
        self._anchors = auditseal.Anchors(keyring, MIN_RETENTION)
        # The (id, hash) of the highest event a verified seal covered that this process made or read.
        # The chain must still hold it (or a verified checkpoint behind which it was pruned): else
        # events were rewritten or cut off with their seals, and sealing on would vouch for that.
        self._seen: tuple[int, str] | None = None
        # Told of each event as it is appended (the security monitor); must not block.
        self._watch = watch
        # One walk of the chain at a time; callers that asked while one ran share the next one.
        self._walk_lock = asyncio.Lock()
        self._walks_asked = 0
        self._last_walk: tuple[int, AuditChainReport] | None = None  # (walks asked when it began, report)

    async def append(self, event: AuditEvent) -> None:
        """Return once `event` is durably stored; raise `Unavailable` if it could not be."""
        if self._watch is not None:
            self._watch(event)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        # No shield needed: the future is this caller's own and the commit runs in the writer
        # task, so a caller that gives up cancels only its future; its event stays in the batch,
        # which is written once, like every other (the writer skips answering a cancelled future).
        await future

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self._write_timeout):  # no task per batch, unlike wait_for
                    await self._store.append_audit([event for event, _ in batch])
                metrics.AUDIT_WRITE_SECONDS.observe(time.perf_counter() - started)
                metrics.AUDIT_BATCH_SIZE.observe(len(batch))
            except BaseException as exc:
                log.error("audit_write_failed", batch_size=len(batch), error_type=type(exc).__name__)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(
                            Unavailable(
                                "the audit log cannot be written, so nothing was released; "
                                "retry once the broker's storage is writable again"
                            )
                        )
                if not isinstance(exc, Exception):
                    raise  # cancelled: the waiters of this batch were answered; the next append restarts
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def close(self) -> None:
        """Stop pruning and sealing, wait for every accepted event to be written, seal the tail."""
        for task in (self._pruner, self._sealer):
            if task is not None:
                task.cancel()
                await asyncio.wait([task])
        self._pruner = self._sealer = None
        while self._writer is not None and not self._writer.done():
            await asyncio.wait([self._writer])
        await self._seal_logging_failure()

    # ----------------------------------------------------------------- seals

    async def seal(self) -> AuditSeal | None:
        """Anchor the chain (see service/auditseal.py): seal its tail if it moved, else re-sign
        the newest seal (its time, under the active key); re-sign the newest checkpoint if
        another master key signed it. Returns the seal made or re-signed, else None.

        An anchor that does not verify is never extended or re-signed: that would vouch for
        a chain rewritten by someone else. It is logged (`audit_seal_refused`) and left for
        verification to report.
        """
        if self._keyring is None:
            return None
        active = self._keyring.active
        found = await self._store.audit_anchors([self._seen[0]] if self._seen else [])
        refusal = self._refusal(found)
        if refusal:
            newest_id = found.seal.last_id if found.seal else 0
            log.error("audit_seal_refused", newest_seal_id=newest_id, reason=refusal)
            return None
        checkpoint, newest = found.checkpoint, found.seal
        if newest is not None:
            self._saw(newest)
        if checkpoint is not None and checkpoint.mac is not None and checkpoint.kek_id != active.id:
            resigned = self._anchors.sign_checkpoint(checkpoint)
            await self._store.replace_audit_checkpoint(checkpoint.mac, resigned)
        if newest is None and found.tail_id:
            # Legitimate at a first start on events written without a broker or before seals existed;
            # otherwise seals were deleted while no broker ran, and the log is the only witness.
            log.warning("audit_seal_first", last_id=found.tail_id, reason="no seal covered the chain")
        made = auditseal.make_seal(active, found.tail_id, found.tail_hash, self._clock())
        if newest is not None and newest.last_id == found.tail_id:
            # Nothing new to seal: keep the newest seal recent, under the active key.
            replaced = await self._store.replace_audit_seal(newest.mac, made)
            self._saw(made)
            return made if replaced else None
        stored = await self._store.add_audit_seal(made)
        if stored.last_hash != made.last_hash or self._anchors.seal(stored) is not True:
            # Not another replica's seal of the same tail: one written into the table by someone
            # without the master key, where it takes this seal's place.
            log.error(
                "audit_seal_conflict",
                last_id=made.last_id,
                last_hash=made.last_hash,
                found_kek_id=stored.kek_id,
            )
            return None
        self._saw(made)
        # The log's copy is the one the database cannot take back (see service/auditseal.py).
        log.info(
            "audit_sealed", last_id=made.last_id, last_hash=made.last_hash, kek_id=made.kek_id, mac=made.mac
        )
        return made

    def _saw(self, seal: AuditSeal) -> None:
        if self._seen is None or seal.last_id >= self._seen[0]:
            self._seen = (seal.last_id, seal.last_hash)

    def _refusal(self, found: AuditAnchors) -> str:
        """Why the chain's anchors must not be extended or re-signed ("" when they may be)."""
        checkpoint = found.checkpoint
        problem = self._anchors.checkpoint(checkpoint) if checkpoint else ""
        if problem:
            return f"the newest checkpoint: {problem}"
        if self._seen_lost(found):
            return PROBLEM_SEEN_CHANGED
        newest = found.seal
        if newest is None:
            return ""
        verdict = self._anchors.seal(newest)
        if verdict is None:
            return f"the newest seal's master key {newest.kek_id!r} is not configured"
        if not verdict:
            return "the newest seal does not verify: it was forged or edited"
        if found.hashes.get(newest.last_id) != newest.last_hash:
            return "the chain no longer holds the event the newest seal sealed"
        return ""

    async def start_sealing(self) -> None:
        """Seal now (a chain is never without a recent seal while a broker runs), then every
        `seal_interval` seconds in the background."""
        await self._seal_logging_failure()
        self._sealer = asyncio.create_task(self._seal_periodically())

    async def _seal_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._seal_interval)
            await self._seal_logging_failure()

    async def _seal_logging_failure(self) -> None:
        try:
            await self.seal()
        except Exception as exc:  # the next interval tries again
            log.error("audit_seal_failed", error_type=type(exc).__name__)

    async def list(
        self, call: Call, filter: AuditFilter, page_size: int, page_token: str
    ) -> tuple[list[AuditEvent], str]:
        """One page of the caller's tenant's events, newest first."""

        def fetch(limit: int, before: int | None) -> Awaitable[list[AuditEvent]]:
            return self._store.list_audit(call.tenant, filter, limit, before)

        _check_filter(filter)
        return await paging.newest_first("audit", filter, page_size, page_token, fetch)

    async def verify(self, call: Call) -> AuditChainReport:
        """Walk the whole (global) chain; the report holds ids and a generic problem only.

        A walk reads every event, so any tenant's admins asking at once must not start one each:
        walks run one at a time, and a caller gets the report of a walk that began after it asked.
        """
        self._walks_asked += 1
        asked = self._walks_asked
        async with self._walk_lock:
            if self._last_walk is not None and self._last_walk[0] >= asked:
                return self._last_walk[1]
            began = self._walks_asked
            now = self._clock()  # before the walk: the newest seal it reports is as of its start
            report = await self._store.verify_audit_chain(self._anchors)
            if report.ok:
                report = await self._judge_anchors(report, now)
            self._last_walk = (began, report)
        if not report.ok:
            log.warning("audit_chain_broken", first_broken_id=report.first_broken_id, problem=report.problem)
        return report

    async def _judge_anchors(self, report: AuditChainReport, now: datetime) -> AuditChainReport:
        """`report` broken where what only this service knows says so: a newest seal that is
        missing, does not verify or is not recent, or an event this broker saw sealed and the
        chain no longer holds."""
        newest = report.newest_seal
        if report.events_checked:
            problem = self._anchors.stale_seal_problem(newest, now, self._seal_interval)
            if problem:
                broken_id = newest.last_id if newest else 0
                return replace(report, ok=False, first_broken_id=broken_id, problem=problem)
        if self._seen is not None and self._seen_lost(await self._store.audit_anchors([self._seen[0]])):
            return replace(report, ok=False, first_broken_id=self._seen[0], problem=PROBLEM_SEEN_CHANGED)
        return report

    def _seen_lost(self, found: AuditAnchors) -> bool:
        """Whether the chain no longer holds the event this broker saw sealed (nor was it pruned)."""
        if self._seen is None:
            return False
        seen_id, seen_hash = self._seen
        checkpoint = found.checkpoint
        pruned = (
            checkpoint is not None
            and checkpoint.last_id >= seen_id
            and not self._anchors.checkpoint(checkpoint)
        )
        return not pruned and found.hashes.get(seen_id) != seen_hash

    async def export(self, call: Call, filter: AuditFilter) -> AsyncIterator[AuditEvent]:
        """Every event of the caller's tenant matching `filter`, oldest first, read page by page."""
        _check_filter(filter)
        if filter.start_time and filter.end_time and filter.start_time >= filter.end_time:
            raise InvalidArgument.field("end_time", "must be after start_time")
        after: int | None = None
        while True:
            events = await self._store.export_audit(call.tenant, filter, _EXPORT_PAGE, after)
            for event in events:
                yield event
            if len(events) < _EXPORT_PAGE:
                return
            after = events[-1].id

    async def prune(self) -> int:
        """Delete events older than the retention period (in batches, behind a checkpoint)."""
        now = self._clock()
        pruned = await self._store.prune_audit(now - self.retention, now, self._anchors)
        if pruned:
            log.info("audit_pruned", events=pruned, retention_days=self.retention.days)
        return pruned

    def start_pruning(self, interval_seconds: float = PRUNE_INTERVAL_SECONDS) -> None:
        """Prune now and then every `interval_seconds`, in the background."""
        self._pruner = asyncio.create_task(self._prune_periodically(interval_seconds))

    async def _prune_periodically(self, interval_seconds: float) -> None:
        while True:
            try:
                await self.prune()
            except Exception as exc:  # a failed run is retried at the next interval
                message = exc.message if isinstance(exc, BrokerError) else ""
                log.error("audit_prune_failed", error_type=type(exc).__name__, error=message)
            await asyncio.sleep(interval_seconds)


async def unsigned_checkpoint(store: AuditLogStore) -> AuditCheckpoint | None:
    """The newest checkpoint if it is unsigned (written before checkpoints were signed, or
    without the broker), for an operator to check before vouching for it."""
    checkpoint = (await store.audit_anchors()).checkpoint
    return checkpoint if checkpoint is not None and checkpoint.mac is None else None


async def sign_checkpoint(
    store: AuditLogStore, keyring: Keyring, checkpoint: AuditCheckpoint
) -> AuditCheckpoint | None:
    """What `broker audit sign-checkpoint --last-id` does when an operator vouches for the unsigned
    `checkpoint` (`unsigned_checkpoint`): sign it. The time of the newest event it pruned was not
    recorded then; the retention floor before it is assumed. The checkpoint signed, else None (it
    changed meanwhile)."""
    vouched = replace(checkpoint, newest_pruned_at=checkpoint.created_at - MIN_RETENTION)
    signed = auditseal.Anchors(keyring, MIN_RETENTION).sign_checkpoint(vouched)
    return signed if await store.replace_audit_checkpoint(None, signed) else None
