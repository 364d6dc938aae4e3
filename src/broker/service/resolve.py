"""Resolve: release a connection's secrets to an executor holding a live grant.

The hot path. Connections (compact entries) and grants come from an in-memory
cache that writes invalidate; the secret is opened per call (microseconds) and
never cached in clear. The non-secret part of the answer comes serialised from the
cache entry, built once per record version. Every outcome is audited, durably, before the caller hears it:
a denial for any reason looks the same to the executor, the audit event records
the true reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

import structlog

from broker import metrics
from broker.crypto import Keyring
from broker.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    SecretUnavailable,
    Unavailable,
)
from broker.model import ConnectionRecord, GrantMode, Lease, Outcome
from broker.sensitive import SecretFields
from broker.service.audit import AuditLog
from broker.service.cache import MISSING, CachedConnection, GrantTerms, ResolveCache, grant_terms
from broker.service.context import Call
from broker.service.fingerprint import Fingerprinter
from broker.service.leases import LeaseService
from broker.service.monitor import Monitor
from broker.service.sealing import DECRYPT_FAILED, open_secrets
from broker.service.tokens import TokenRefresher
from broker.store import ConnectionStore, GrantStore, SecretVersionStore

log = structlog.get_logger("broker.resolve")

DENIED_MESSAGE = "not permitted to resolve this connection"
RESOLVE = "connection.resolve"
MAX_PURPOSE = 256
MAX_RUN_ID = 128
# Labelled children of the per-call outcomes, looked up once rather than on every Resolve.
_ALLOWED = metrics.RESOLVES.labels("allowed", "")
_CACHE_HIT = metrics.RESOLVE_CACHE.labels("hit")
_CACHE_MISS = metrics.RESOLVE_CACHE.labels("miss")


@dataclass(frozen=True, slots=True)
class Released:
    """What Resolve hands back: the answer's non-secret part (serialised) and the opened secrets."""

    # `ResolveCache.public_part` of the record released: ids, name, type, config, secret version.
    public: bytes
    secrets: SecretFields
    expires_at: datetime | None
    cache_ttl_seconds: int
    # When the secret version the executor said it holds was replaced (see ResolveRequest).
    superseded_at: datetime | None = None
    # A dynamic database connection's fresh user: `secrets` holds its password, and the answer
    # names its user instead of the stored administrator.
    lease: Lease | None = None


class Resolver:
    def __init__(
        self,
        connections: ConnectionStore,
        grants: GrantStore,
        versions: SecretVersionStore,
        keyring: Keyring,
        cache: ResolveCache,
        audit: AuditLog,
        clock: Callable[[], datetime],
        cache_ttl_seconds: int = 60,
        last_used_flush_seconds: float = 5.0,
        tokens: TokenRefresher | None = None,
        monitor: Monitor | None = None,
        superseded_grace: timedelta = timedelta(hours=1),
        leases: LeaseService | None = None,
    ) -> None:
        self._leases = leases
        self._monitor = monitor
        self._superseded_grace = superseded_grace
        self._fingerprints = Fingerprinter(keyring)
        self._tokens = tokens
        self._connections = connections
        self._grants = grants
        self._versions = versions
        self._keyring = keyring
        self._cache = cache
        self._audit = audit
        self._clock = clock
        self._cache_ttl = cache_ttl_seconds
        self._flush_every = last_used_flush_seconds
        self._last_used: dict[tuple[str, str], datetime] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def resolve(
        self,
        call: Call,
        *,
        connection_id: str = "",
        name: str = "",
        purpose: str = "",
        known_secret_version: int = 0,
        run_id: str = "",
    ) -> Released:
        """Check the grant, audit, return the opened secrets. Every denial looks the same to the caller."""
        if known_secret_version < 0:
            raise InvalidArgument.field("known_secret_version", "must not be negative")
        if bool(connection_id) == bool(name):
            raise InvalidArgument.field("ref", "exactly one of connection_id or name is required")
        if len(purpose) > MAX_PURPOSE:
            raise InvalidArgument.field("purpose", f"must be at most {MAX_PURPOSE} characters")
        if len(run_id) > MAX_RUN_ID:
            raise InvalidArgument.field("run_id", f"must be at most {MAX_RUN_ID} characters")
        for field_name, text in (
            ("name", name),
            ("connection_id", connection_id),
            ("purpose", purpose),
            ("run_id", run_id),
        ):
            if not text.isprintable():
                raise InvalidArgument.field(field_name, "must not contain control characters")
        now = self._clock()
        entry = await self._lookup(call.tenant, connection_id, name, call.actor)
        reason, grant_ends = await self._denial_reason(call, entry, now)
        ref_id = entry.id if entry is not None else connection_id
        details = {"purpose": purpose} if purpose else {}
        if name and entry is None:
            details["name"] = name[:128]
        if reason:
            metrics.RESOLVES.labels("denied", reason).inc()
            await self._audit.append(call.audit_event(now, RESOLVE, ref_id, Outcome.DENIED, reason, details))
            if self._monitor is not None:
                self._monitor.resolve_denied(call, ref_id, reason, now)
            raise PermissionDenied(DENIED_MESSAGE)
        assert entry is not None
        public, secret_version, expires_at, lease = entry.public, entry.secret_version, None, None
        try:
            secrets = open_secrets(self._keyring, entry)
            record = entry.oauth  # None unless OAuth2
            if entry.dynamic is not None:
                # The stored secret is the administrator's: it makes a user and is never released.
                lease, secrets = await self._lease(call, entry.dynamic, secrets, now, ref_id, details, run_id)
                expires_at = lease.expires_at
            if record is not None:
                if self._tokens is not None:
                    # A refresh re-reads the row: it too may fail to open.
                    record, secrets = await self._fresh_token(call, now, ref_id, details, record, secrets)
                if record is not entry.oauth:  # refreshed: a new version, not (yet) the cached one
                    public, secret_version = self._cache.public_part(record), record.secret_version
                expires_at = record.token_expires_at
        except SecretUnavailable:
            metrics.RESOLVES.labels("failed", DECRYPT_FAILED).inc()
            await self._audit.append(
                call.audit_event(now, RESOLVE, ref_id, Outcome.FAILED, DECRYPT_FAILED, details)
            )
            raise
        if entry.withheld:
            secrets = secrets.without(entry.withheld)
        if lease is None:  # a lease's release was audited with its activation
            # Which values went out, without the values: after a leak, `broker audit fingerprint
            # --search` finds every executor that received the leaked one.
            details.update(self._fingerprints.released(secrets))
            await self._audit.append(call.audit_event(now, RESOLVE, ref_id, Outcome.ALLOWED, "", details))
        if self._monitor is not None:
            self._monitor.resolve_allowed(call, entry.id, now)
        _ALLOWED.inc()
        self.note_used(entry.tenant, entry.id, now)
        ttl = self._cache_ttl
        # Never let an executor cache a token or a lease past its expiry, nor anything past its grant.
        for end in (expires_at, grant_ends):
            if end is not None:  # a grant without an end ends at FOREVER: far past any TTL
                ttl = max(0, min(ttl, int((end - now).total_seconds())))
        superseded_at = None
        if 0 < known_secret_version < secret_version:
            # Only for an executor holding an old version: no extra read on the common path. The
            # store's copy is purged periodically, so the documented grace is applied here.
            superseded_at = await self._versions.superseded_at(entry.tenant, entry.id, known_secret_version)
            if superseded_at is not None and now - superseded_at > self._superseded_grace:
                superseded_at = None
        return Released(
            public,
            secrets,
            expires_at=expires_at,
            cache_ttl_seconds=ttl,
            superseded_at=superseded_at,
            lease=lease,
        )

    async def _lease(
        self,
        call: Call,
        record: ConnectionRecord,
        admin: SecretFields,
        now: datetime,
        ref_id: str,
        details: dict[str, str],
        run_id: str,
    ) -> tuple[Lease, SecretFields]:
        """A fresh database user for the caller; its release is audited with the lease's activation."""
        if self._leases is None:
            raise FailedPrecondition(f"connection {record.id} is dynamic, and leases are not enabled here")
        released = call.audit_event(now, RESOLVE, ref_id, Outcome.ALLOWED, "", details)
        terms = await self._grant_terms(call.tenant, record.id, call.actor)  # cached by the denial check
        grant_ends = terms.ends if terms is not None else now
        try:
            return await self._leases.issue(call, record, admin, now, run_id, released, grant_ends)
        except Unavailable:
            metrics.RESOLVES.labels("failed", "lease_failed").inc()
            raise

    async def _fresh_token(
        self,
        call: Call,
        now: datetime,
        ref_id: str,
        details: dict[str, str],
        record: ConnectionRecord,
        secrets: SecretFields,
    ) -> tuple[ConnectionRecord, SecretFields]:
        """The record and secrets with a fresh token; a refusal or outage is audited and raised."""
        assert self._tokens is not None
        try:
            return await self._tokens.fresh(record, secrets)
        except FailedPrecondition:
            metrics.RESOLVES.labels("denied", "reauthorization_required").inc()
            event = call.audit_event(
                now, RESOLVE, ref_id, Outcome.DENIED, "reauthorization_required", details
            )
            await self._audit.append(event)
            raise
        except Unavailable:
            metrics.RESOLVES.labels("failed", "token_unavailable").inc()
            event = call.audit_event(now, RESOLVE, ref_id, Outcome.FAILED, "token_unavailable", details)
            await self._audit.append(event)
            raise

    async def _lookup(
        self, tenant: str, connection_id: str, name: str, principal: str
    ) -> CachedConnection | None:
        cache = self._cache
        if name:
            cached_id = cache.connection_id_by_name(tenant, name)
            entry = cache.connection(tenant, cached_id) if cached_id else None
            if entry is not None and entry.name == name and entry.live:
                _CACHE_HIT.inc()
                return entry
            generation = cache.generation
            record = await self._connections.find_connection_by_name(tenant, name)
        else:
            entry = cache.connection(tenant, connection_id)
            if entry is not None:
                _CACHE_HIT.inc()
                return entry
            generation = cache.generation
            # A record not cached has no cached grant either: the caller's is read with it, in one
            # statement, so a miss waits for one turn of the store, not two in a row.
            record, grant = await self._connections.get_connection_with_grant(
                tenant, connection_id, principal
            )
            _CACHE_MISS.inc()
            if record is None:
                return None
            entry = cache.put_connection(record, generation)
            # On the entry itself: what `ResolveCache.put_grant` does when the cache kept it (nothing
            # was awaited since), and an entry it did not keep serves this call alone.
            entry.put_grant(principal, grant_terms(grant))
            return entry
        _CACHE_MISS.inc()
        return None if record is None else cache.put_connection(record, generation)

    async def _grant_terms(self, tenant: str, connection_id: str, principal: str) -> GrantTerms | None:
        """The principal's grant as Resolve judges it; None when it has none."""
        cached = self._cache.grant(tenant, connection_id, principal)
        if cached is not MISSING:
            return cached  # type: ignore[return-value]
        generation = self._cache.generation
        grant = await self._grants.get_grant(tenant, connection_id, principal)
        self._cache.put_grant(tenant, connection_id, principal, grant, generation)
        return grant_terms(grant)

    async def _denial_reason(
        self, call: Call, entry: CachedConnection | None, now: datetime
    ) -> tuple[str, datetime]:
        """Why the caller gets nothing ("" if it may have the secret), and when its grant ends."""
        if self._monitor is not None and self._monitor.blocked(call.tenant, call.actor, now):
            return "principal_blocked", now
        if entry is None:
            return "unknown_connection", now
        if entry.refusal:  # deleted, revoked, suspended (`lookup.refusal`, kept on the entry)
            return entry.refusal, now
        cached = entry.grant(call.actor)  # `_lookup` just returned the entry: nothing changed it since
        if cached is MISSING:
            terms = await self._grant_terms(call.tenant, entry.id, call.actor)
        else:
            terms = cast(GrantTerms | None, cached)
        if terms is None:
            return "no_grant", now
        if now >= terms.ends:
            return "grant_expired", now
        if terms.mode is GrantMode.PROXY:
            return "proxy_only", now  # the broker may make calls with it; the executor never holds it
        return "", terms.ends

    # ------------------------------------------------------------- last used

    def note_used(self, tenant: str, connection_id: str, now: datetime) -> None:
        """A use of the connection by an executor (a proxied call): written with the next batch."""
        self._last_used[(tenant, connection_id)] = now

    def start(self) -> None:
        """Start flushing last-used times in the background (batched, not per call)."""
        self._flusher = asyncio.create_task(self._flush_periodically())

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_every)
            await self.flush_last_used()

    async def flush_last_used(self) -> None:
        """Write the accumulated last-used times in one transaction."""
        if not self._last_used:
            return
        batch, self._last_used = self._last_used, {}
        try:
            await self._connections.record_last_used([(t, c, at) for (t, c), at in batch.items()])
        except Exception as exc:
            # Not worth failing anything for: keep the newest times for the next flush.
            log.warning("last_used_flush_failed", error_type=type(exc).__name__, count=len(batch))
            for key, at in batch.items():
                self._last_used[key] = max(at, self._last_used.get(key, at))

    async def close(self) -> None:
        """Stop the background flusher and write what is left."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush_last_used()
