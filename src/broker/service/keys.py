"""Master-key rotation: rotate (new active KEK), rewrap (every DEK under it), status, retire checks.

Rotation never re-encrypts data: `rewrap_all` unwraps each stored data key with
the master key that wrapped it and wraps it again under the active one, in
batches, one transaction per batch, compare-and-swap per row. A crash loses at
most the batch in flight; running it again continues with what is left.

Every AES-GCM encryption under a master key is counted (`Keyring.count_wrap`)
and the counts are persisted (the broker flushes them every few seconds, the
rewrap in the transaction of each batch). Random 96-bit nonces are safe for
2^32 encryptions per key; the broker warns from 2^30 on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from broker import crypto, keydir, metrics
from broker.crypto import Binding, DecryptionFailed, Keyring, Sealed
from broker.errors import ConfigError, FailedPrecondition, PermissionDenied
from broker.service.audit import AuditLog
from broker.service.context import Call
from broker.service.keycheck import canary_kek_id, rewrap_canary
from broker.service.sealing import row_binding, state_binding
from broker.store import KeyStore, SecretVersionStore, WrappedDek

log = structlog.get_logger("broker.keys")

NONCE_LIMIT = 1 << 32
WARN_WRAPS = 1 << 30
MAX_BATCH = 10_000


def dek_binding(dek: WrappedDek) -> Binding:
    """The binding a stored data key was wrapped with (the destination is not part of it)."""
    if dek.kind == "connection":
        return row_binding(dek.tenant, dek.key, dek.secret_version)
    return state_binding(dek.tenant, dek.key)


@dataclass
class RewrapReport:
    """What one `rewrap_all` run did."""

    total: int = 0
    rewrapped: int = 0
    skipped: int = 0  # changed by someone else meanwhile (re-sealed, purged, completed)
    failed: list[str] = field(default_factory=list)  # "kind tenant key" of keys that did not unwrap


async def rewrap_all(
    store: KeyStore,
    keyring: Keyring,
    *,
    batch: int = 500,
    progress: Callable[[int, int], None] | None = None,
    pause: float = 0.0,
) -> RewrapReport:
    """Re-wrap every stored data key not under the active KEK; `progress(done, total)` after each batch."""
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch must be between 1 and {MAX_BATCH}")
    active = keyring.active.id
    report = RewrapReport(
        total=sum(n for kek_id, n in (await store.deks_by_kek()).items() if kek_id != active)
    )
    await rewrap_canary(store, keyring)
    after: tuple[str, str, str] | None = None
    done = 0
    while True:
        rows = await store.list_deks_not_under(active, batch, after)
        if not rows:
            break
        pairs: list[tuple[WrappedDek, Sealed]] = []
        for row in rows:
            try:
                pairs.append((row, crypto.rewrap(keyring, row.sealed, dek_binding(row))))
            except DecryptionFailed:
                report.failed.append(f"{row.kind} {row.tenant} {row.key}")
        changed = await store.rewrap_deks(pairs, keyring.take_wrap_counts())
        report.rewrapped += changed
        report.skipped += len(pairs) - changed
        done += len(rows)
        after = (rows[-1].kind, rows[-1].tenant, rows[-1].key)
        if progress is not None:
            progress(done, max(done, report.total))
        if pause:
            await asyncio.sleep(pause)
    await store.add_kek_wraps(keyring.take_wrap_counts())
    return report


@dataclass(frozen=True)
class KeyStatus:
    active: str
    deks: dict[str, int]  # stored data keys per master key, the key-check canary included
    wraps: dict[str, int]  # persisted encryptions per master key
    available: frozenset[str]  # keys this process can use


async def key_status(store: KeyStore, keyring: Keyring) -> KeyStatus:
    """What uses each master key, for `broker keys status` and `retire`."""
    deks = await store.deks_by_kek()
    canary = await canary_kek_id(store)
    if canary is not None:
        deks[canary] = deks.get(canary, 0) + 1
    return KeyStatus(keyring.active.id, deks, await store.kek_wraps(), keyring.ids)


class MasterKeys:
    """The running broker's side: `RotateMasterKey`, persisted wrap counts, gauges, the key directory.

    In directory mode the broker also follows the `active` marker (checked every
    `interval` seconds), so `broker keys rotate` takes effect without a restart.
    """

    def __init__(
        self,
        key_store: KeyStore,
        versions: SecretVersionStore,
        keyring: Keyring,
        audit: AuditLog,
        clock: Callable[[], datetime],
        *,
        key_dir: Path | None = None,
        operators: tuple[str, ...] = (),
        superseded_grace_seconds: float = 3600.0,
        interval: float = 5.0,
        warn_wraps: int = WARN_WRAPS,
    ) -> None:
        self._key_store = key_store
        self._versions = versions
        self._keyring = keyring
        self._audit = audit
        self._clock = clock
        self._dir = key_dir
        self._operators = frozenset(operators)
        self._grace = timedelta(seconds=superseded_grace_seconds)
        self._interval = interval
        self._warn_wraps = warn_wraps
        self._warned: set[str] = set()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def rotate(self, call: Call) -> tuple[str, str, dict[str, int]]:
        """Add a new KEK to the key directory, make it active here and on disk; audited.

        Only the operators named in `master_key.operators` may: the key is broker-wide,
        and an admin of one tenant must not act for all of them.
        """
        if call.actor not in self._operators:
            raise PermissionDenied("rotating the master key needs a principal listed in master_key.operators")
        if self._dir is None:
            raise FailedPrecondition(
                "this broker reads a single master key (master_key.file or BROKER_MASTER_KEY); "
                "rotation needs master_key.dir"
            )
        async with self._lock:
            previous = self._keyring.active.id
            try:
                kek = await asyncio.to_thread(keydir.add_key, self._dir)
                await asyncio.to_thread(keydir.set_active, self._dir, kek.id)
            except (ConfigError, OSError) as exc:
                raise FailedPrecondition(
                    f"cannot write to the master key directory: {_reason(exc)}"
                ) from None
            self._keyring.activate(kek)
            event = call.audit_event(
                self._clock(),
                "master_key.rotate",
                "",
                details={"kek_id": kek.id, "previous_kek_id": previous},
            )
            await self._audit.append(event)
        log.info("master_key_rotated", kek_id=kek.id, previous_kek_id=previous)
        status = await key_status(self._key_store, self._keyring)
        self._publish(status)
        return kek.id, previous, status.deks

    # ------------------------------------------------------------ background

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.tick()
            except Exception as exc:
                log.warning("master_key_housekeeping_failed", error_type=type(exc).__name__)

    async def tick(self) -> None:
        """Follow the key directory, persist wrap counts, update gauges, forget old secret versions."""
        if self._dir is not None:
            async with self._lock:
                try:
                    changed = await asyncio.to_thread(keydir.refresh, self._dir, self._keyring)
                except ConfigError as exc:
                    log.warning("master_key_dir_unreadable", error=str(exc))
                    changed = False
            if changed:
                log.info("master_key_activated", kek_id=self._keyring.active.id)
        await self.flush()
        await self._versions.purge_superseded(self._clock() - self._grace)

    async def flush(self) -> None:
        """Persist the wraps counted since the last flush; warn about keys near the nonce limit."""
        counts = self._keyring.take_wrap_counts()
        try:
            await self._key_store.add_kek_wraps(counts)
        except BaseException:
            for kek_id, n in counts.items():  # kept for the next flush, never lost
                self._keyring.count_wrap(kek_id, n)
            raise
        self._publish(await key_status(self._key_store, self._keyring))

    def _publish(self, status: KeyStatus) -> None:
        for kek_id, wraps in status.wraps.items():
            metrics.KEK_WRAPS.labels(kek_id).set(wraps)
            if wraps >= self._warn_wraps and kek_id not in self._warned:
                self._warned.add(kek_id)
                log.warning(
                    "master_key_wrap_limit_near",
                    kek_id=kek_id,
                    wraps=wraps,
                    limit=NONCE_LIMIT,
                    advice="rotate the master key (broker keys rotate) and rewrap",
                )
        for kek_id in status.available | status.deks.keys():
            metrics.DEKS_BY_KEK.labels(kek_id).set(status.deks.get(kek_id, 0))
        for kek_id in status.available:
            metrics.KEK_ACTIVE.labels(kek_id).set(1 if kek_id == status.active else 0)

    async def close(self) -> None:
        """Stop the background task and persist the last wrap counts."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.flush()
        except Exception as exc:
            log.warning("master_key_wrap_count_flush_failed", error_type=type(exc).__name__)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
