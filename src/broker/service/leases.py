"""Leases: a fresh database user per Resolve on a dynamic connection, dropped when it ends
whatever happens in between.

A dynamic database connection stores an administrator's credentials, which are never
released: Resolve (`Resolver`, which checks the grant first) asks `issue` for a lease
instead. The lease row is written `creating` before the user exists and turned `active`
with the audit events of its release, so a crash in between leaves a row that the
revocation worker finds once `creation_grace` has passed and undoes.

Every end goes through the one queue in the lease table (`store.leases`): expiry, an
executor's RevokeLease, an admin's RevokeLeases, and what this service hears from the
change feed (a connection no longer live, a grant gone, a principal blocked). The
worker claims due leases in bounded batches, drops their users, and on failure tries
again with a capped backoff, forever. The reconciler lists the users carrying the
connection's prefix in each database and drops those no live lease accounts for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import structlog

from broker import metrics
from broker.config import LeaseSettings
from broker.crypto import Keyring
from broker.dbusers import AdminPool, LeaseDbError, UserAdmin, new_password, new_username
from broker.egress import EgressPolicy
from broker.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SecretUnavailable,
    Unavailable,
)
from broker.model import (
    AuditEvent,
    ConnectionRecord,
    Lease,
    LeaseFilter,
    LeaseState,
    Outcome,
    new_id,
)
from broker.sensitive import SecretFields
from broker.service import paging
from broker.service.audit import AuditLog
from broker.service.context import Call, system_event
from broker.service.fingerprint import Fingerprinter
from broker.service.inputs import require_printable
from broker.service.lookup import refusal
from broker.service.sealing import open_secrets
from broker.store import ConnectionStore, GrantStore, LeaseStore, RevocationQueue
from broker.testers.base import Target

log = structlog.get_logger("broker.leases")

ACTOR = "broker:leases"
# Revoked leases deleted per transaction.
_PRUNE_BATCH = 1000
DEFAULT_TTL = 3600
DEFAULT_MAX_TTL = 86400
DEFAULT_PREFIX = "brk_"
# From this try of a lease's drop on, a refusal of the connection's own revocation statements that
# follows another refusal runs the driver's default drop instead: a user must not outlive its lease
# for as long as a typo stays unfixed, and a refusal that was only a moment's (a lock, a deadlock)
# has had its retries.
OWN_REVOCATION_TRIES = 3
MAX_FILTER = 512  # a SPIFFE id, an id, a run id or a prefix is far shorter

# UserAdmin.open(target, egress, timeout=...): a seam for tests that need a database to fail.
OpenAdmin = Callable[..., Awaitable[UserAdmin]]


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    """How long a dynamic connection's leases last, and how their users are named."""

    default_ttl: timedelta
    max_ttl: timedelta
    prefix: str

    @classmethod
    def of(cls, record: ConnectionRecord) -> LeaseTerms:
        config = record.config
        max_ttl = int(config.get("max_ttl") or DEFAULT_MAX_TTL)
        default_ttl = min(int(config.get("default_ttl") or DEFAULT_TTL), max_ttl)
        prefix = str(config.get("username_prefix") or DEFAULT_PREFIX)
        return cls(timedelta(seconds=default_ttl), timedelta(seconds=max_ttl), prefix)

    def ours(self, username: str) -> bool:
        """Whether `username` is one the broker would have made: the prefix, then 16 of [a-z0-9]."""
        return re.fullmatch(re.escape(self.prefix) + "[a-z0-9]{16}", username) is not None


def _stop_if_cancelled() -> None:
    """Raise CancelledError once this task was asked to stop, even if the request was swallowed:
    aiomysql's connect awaits `asyncio.wait_for`, which on Python 3.11 can eat a cancellation that
    arrives as it finishes, and a worker loop that went on would keep `close()` waiting forever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class LeaseService:
    def __init__(
        self,
        store: LeaseStore,
        revocations: RevocationQueue,
        connections: ConnectionStore,
        grants: GrantStore,
        keyring: Keyring,
        audit: AuditLog,
        egress: EgressPolicy,
        clock: Callable[[], datetime],
        settings: LeaseSettings = LeaseSettings(),  # noqa: B008 (frozen)
        open_admin: OpenAdmin = UserAdmin.open,
    ) -> None:
        self._fingerprints = Fingerprinter(keyring)
        self._store = store
        self._revocations = revocations
        self._connections = connections
        self._grants = grants
        self._keyring = keyring
        self._audit = audit
        self._egress = egress
        self._clock = clock
        self._settings = settings
        self._open_admin = open_admin
        self._pool = AdminPool(settings.admin_sessions, settings.admin_idle_seconds)
        self._wake = asyncio.Event()
        self._pass_lock = asyncio.Lock()
        # What the change feed said, checked by the worker: (tenant, connection id, principal);
        # principal "" means every lease of the connection, connection "" every lease of the principal.
        self._to_check: set[tuple[str, str, str]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ issue

    async def issue(
        self,
        call: Call,
        record: ConnectionRecord,
        admin: SecretFields,
        now: datetime,
        run_id: str,
        released: AuditEvent,
        grant_ends: datetime,
    ) -> tuple[Lease, SecretFields]:
        """Make a database user for the caller; the lease and its credentials. `released` is the
        Resolve's audit event: written with the lease's activation, before the caller hears. A
        lease never outlives the grant it was made under (`grant_ends`), renewals included."""
        terms = LeaseTerms.of(record)
        max_expires_at = min(now + terms.max_ttl, grant_ends)
        lease = Lease(
            tenant=record.tenant,
            id=new_id("lease"),
            connection_id=record.id,
            principal=call.actor,
            username=new_username(terms.prefix),
            state=LeaseState.CREATING,
            created_at=now,
            expires_at=min(now + terms.default_ttl, max_expires_at),
            max_expires_at=max_expires_at,
            run_id=run_id,
        )
        await self._store.insert_lease(lease)
        password = new_password()
        started = asyncio.get_running_loop().time()
        details = {
            "lease_id": lease.id,
            "username": lease.username,
            "expires_at": lease.expires_at.isoformat(),
        }
        if run_id:
            details["run_id"] = run_id
        credentials = SecretFields({"password": password})
        released = replace(
            released, details=released.details | details | self._fingerprints.released(credentials)
        )
        created = call.audit_event(now, "lease.create", record.id, Outcome.SUCCEEDED, "", details)
        try:
            async with self._session(record, admin) as db:
                await db.create(lease.username, password, lease.expires_at)
                activated = await self._store.activate_lease(lease.tenant, lease.id, [released, created])
                if not activated:
                    # The lease was ended while its user was being created, and the worker may have
                    # dropped it before the creation committed (a DROP of a user not there yet
                    # succeeds): drop it now that it exists. The worker's drop follows, harmless.
                    with contextlib.suppress(LeaseDbError):
                        await db.drop(lease.username)
        except LeaseDbError as exc:
            metrics.LEASE_OPERATIONS.labels("create", exc.reason).inc()
            # The user may exist in part (a statement of several failed): the worker drops it.
            await self._store.revoke_leases(
                lease.tenant, LeaseFilter(lease_id=lease.id), "creation_failed", now, None
            )
            self._wake.set()
            await self._audit.append(
                call.audit_event(now, "lease.create", record.id, Outcome.FAILED, exc.reason, details)
            )
            # The reason and its code (an errno, a SQLSTATE, a placeholder): never server text.
            raise Unavailable(
                f"could not create a database user for connection {record.id} ({exc})"
            ) from None
        if not activated:
            if await self._grants.get_grant(lease.tenant, lease.connection_id, lease.principal) is None:
                await self._ungranted(call, lease, details)
            # Creating took longer than creation_grace, or the connection or the caller's standing
            # changed meanwhile (a revocation, a block): the lease was ended, its user dropped.
            raise Unavailable("the lease ended while its database user was being created; try again")
        metrics.LEASE_OPERATIONS.labels("create", "ok").inc()
        metrics.LEASE_CREATE_SECONDS.observe(asyncio.get_running_loop().time() - started)
        return replace(lease, state=LeaseState.ACTIVE), credentials

    async def _ungranted(self, call: Call, lease: Lease, details: dict[str, str]) -> None:
        """The grant went while the user was being created: the lease is never handed out, and
        its user is dropped now. PERMISSION_DENIED, as the Resolve would have been a moment later."""
        now = self._clock()
        metrics.LEASE_OPERATIONS.labels("create", "grant_revoked").inc()
        await self._store.revoke_leases(
            lease.tenant, LeaseFilter(lease_id=lease.id), "grant_revoked", now, None
        )
        self._wake.set()
        await self._audit.append(
            call.audit_event(
                now, "lease.create", lease.connection_id, Outcome.FAILED, "grant_revoked", details
            )
        )
        raise PermissionDenied("not permitted to resolve this connection: its grant was revoked meanwhile")

    # ------------------------------------------------------ executor: renew, revoke

    async def renew(self, call: Call, lease_id: str, increment_seconds: int) -> Lease:
        """Extend the caller's active lease by `increment_seconds` from now (0: the connection's
        default), never past its `max_expires_at`; the database user's validity moves first."""
        if increment_seconds < 0:
            raise InvalidArgument.field("increment_seconds", "must not be negative")
        lease = await self._own_lease(call, lease_id)
        now = self._clock()
        if lease.state is not LeaseState.ACTIVE or lease.expires_at <= now:
            raise FailedPrecondition(f"lease {lease.id} has ended ({_ended(lease)}); resolve again")
        record = await self._connections.get_connection(lease.tenant, lease.connection_id)
        grant = await self._grants.get_grant(lease.tenant, lease.connection_id, call.actor)
        if record is None or refusal(record) or grant is None or not grant.active_at(now):
            raise PermissionDenied(f"not permitted to renew lease {lease.id}")
        terms = LeaseTerms.of(record)
        increment = timedelta(seconds=increment_seconds) if increment_seconds else terms.default_ttl
        expires_at = min(now + increment, lease.max_expires_at)
        details = {"lease_id": lease.id, "expires_at": expires_at.isoformat()}
        try:
            # The database first: if the store write then fails, the user is valid longer than
            # the lease, and the worker still drops it at the lease's (old) end. The other way
            # round, a lease could outlive its user's validity.
            async with self._session(record) as db:
                await db.renew(lease.username, expires_at)
        except LeaseDbError as exc:
            reason = exc.reason
            metrics.LEASE_OPERATIONS.labels("renew", reason).inc()
            await self._audit.append(
                call.audit_event(now, "lease.renew", lease.connection_id, Outcome.FAILED, reason, details)
            )
            raise Unavailable(f"could not extend the database user of lease {lease.id} ({exc})") from None
        event = call.audit_event(now, "lease.renew", lease.connection_id, details=details)
        if not await self._store.renew_lease(lease.tenant, lease.id, expires_at, now, event):
            raise FailedPrecondition(f"lease {lease.id} has ended; resolve again")
        metrics.LEASE_OPERATIONS.labels("renew", "ok").inc()
        return replace(lease, expires_at=expires_at)

    async def revoke(self, call: Call, lease_id: str) -> Lease:
        """End the caller's lease now: queued, then dropped in this call unless the database
        cannot be reached (then the worker keeps trying; the answer says `revoking`)."""
        lease = await self._own_lease(call, lease_id)
        now = self._clock()
        event = call.audit_event(now, "lease.revoke", lease.connection_id, details={"lease_id": lease.id})
        await self._store.revoke_leases(lease.tenant, LeaseFilter(lease_id=lease.id), "revoked", now, event)
        await self.revoke_due(only=(lease.tenant, lease.id))
        found = await self._store.get_lease(lease.tenant, lease.id)
        return found if found is not None else lease

    async def _own_lease(self, call: Call, lease_id: str) -> Lease:
        if not lease_id:
            raise InvalidArgument.field("lease_id", "is required")
        require_printable(lease_id=lease_id)
        if len(lease_id) > 64:
            raise InvalidArgument.field("lease_id", "must be at most 64 characters")
        lease = await self._store.get_lease(call.tenant, lease_id)
        if lease is None or lease.principal != call.actor:
            # Another executor's lease looks exactly like an unknown one.
            raise NotFound(f"lease {lease_id} not found")
        return lease

    # ---------------------------------------------------------------- admin

    async def list(
        self, call: Call, filter: LeaseFilter, page_size: int, page_token: str
    ) -> tuple[list[Lease], str]:
        _check_filter(filter)
        limit = paging.page_size(page_size)
        after = paging.decode_token("leases", page_token, paging.text, filter)
        leases = await self._store.list_leases(call.tenant, filter, limit + 1, after)
        if len(leases) > limit:
            return leases[:limit], paging.encode_token("leases", leases[limit - 1].id, filter)
        return leases, ""

    async def revoke_matching(self, call: Call, filter: LeaseFilter, abandon: bool = False) -> int:
        """Queue every live lease that matches for revocation now; how many. With `abandon` (the
        database is gone for good), mark them revoked without dropping their users."""
        _check_filter(filter)
        if filter == LeaseFilter():
            raise InvalidArgument.field(
                "filter", "name at least one of connection_id, principal, username_prefix, run_id, lease_id"
            )
        now = self._clock()
        action, reason = ("lease.abandon", "abandoned") if abandon else ("lease.revoke", "revoked")
        event = call.audit_event(now, action, filter.connection_id, details=_filter_fields(filter))
        count = await self._store.revoke_leases(call.tenant, filter, reason, now, event, abandon=abandon)
        if count:
            self._wake.set()
        return count

    # ------------------------------------------------------ what the feed says

    def connection_changed(self, tenant: str, connection_id: str) -> None:
        self._to_check.add((tenant, connection_id, ""))
        self._wake.set()

    def grant_changed(self, tenant: str, connection_id: str, principal: str) -> None:
        self._to_check.add((tenant, connection_id, principal))
        self._wake.set()

    def principal_blocked(self, tenant: str, principal: str, until: float) -> None:
        self._to_check.add((tenant, "", principal))
        self._wake.set()

    async def _check_changes(self) -> None:
        """Queue the leases that a change ended (see `_end_reason`); a principal blocked ends all of its."""
        checks, self._to_check = self._to_check, set()
        now = self._clock()
        for tenant, connection_id, principal in checks:
            # Active or still being created: a user may exist already.
            selector = LeaseFilter(connection_id=connection_id, principal=principal, live=True)
            if not await self._store.list_leases(tenant, selector, 1, None):
                continue  # most changes are to connections without leases: no write for them
            if connection_id:
                reason = await self._end_reason(tenant, connection_id, principal, now)
            else:
                reason = "principal_blocked"
            if reason:
                await self._queue(tenant, selector, reason, now)

    async def _end_reason(self, tenant: str, connection_id: str, principal: str, now: datetime) -> str:
        """Why the connection's leases (of `principal`, or all when "") may not live on, or "":
        the connection deleted, revoked, suspended, purged or no longer dynamic; the grant gone."""
        record = await self._connections.get_connection(tenant, connection_id)
        if record is None:
            return "unknown_connection"
        reason = refusal(record) or ("" if record.dynamic else "connection_not_dynamic")
        if reason or not principal:
            return reason
        grant = await self._grants.get_grant(tenant, connection_id, principal)
        if grant is None:
            return "grant_revoked"
        return "" if grant.active_at(now) else "grant_expired"

    async def _queue(self, tenant: str, selector: LeaseFilter, reason: str, now: datetime) -> None:
        event = system_event(now, ACTOR, tenant, selector.connection_id, "lease.revoke", reason=reason)
        if await self._store.revoke_leases(tenant, selector, reason, now, event):
            self._wake.set()

    async def _sweep(self, tenant: str, connection_id: str, now: datetime) -> None:
        """What the change feed would have said, checked again: it may have been down, a grant may
        have expired by time alone, or a lease become active after its grant was revoked."""
        reason = await self._end_reason(tenant, connection_id, "", now)
        if reason:
            await self._queue(tenant, LeaseFilter(connection_id=connection_id), reason, now)
            return
        active: set[str] = set()
        after: str | None = None
        mine = LeaseFilter(connection_id=connection_id, state=LeaseState.ACTIVE)
        while page := await self._store.list_leases(tenant, mine, 500, after):
            active.update(lease.principal for lease in page)
            after = page[-1].id
        for principal in sorted(active):
            reason = await self._end_reason(tenant, connection_id, principal, now)
            if reason:
                await self._queue(
                    tenant, LeaseFilter(connection_id=connection_id, principal=principal), reason, now
                )

    # ---------------------------------------------------------------- worker

    def start(self) -> None:
        """Start the revocation worker and the reconciler (which runs once now)."""
        self._tasks = [asyncio.create_task(self._work()), asyncio.create_task(self._reconcile_periodically())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._pool.close()

    async def _work(self) -> None:
        while True:
            _stop_if_cancelled()
            self._wake.clear()
            try:
                if self._to_check:
                    await self._check_changes()
                done = await self.revoke_due()
                metrics.LEASE_REVOCATIONS_PENDING.set(
                    await self._revocations.pending_revocations(self._clock())
                )
                await self._pool.prune()
            except Exception as exc:
                log.error("lease_worker_failed", error_type=type(exc).__name__)
                done = 0
            if done >= self._settings.batch_size:
                await asyncio.sleep(0)  # more are due: go on, letting Resolve calls in between
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as the event is set (a change just before close), and the worker would
            # never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.poll_seconds):
                    await self._wake.wait()

    async def revoke_due(self, only: tuple[str, str] | None = None) -> int:
        """One batch: claim the leases owed a drop (or only the lease `only`: tenant, id), drop
        their users, record each outcome; how many were claimed."""
        async with self._pass_lock:
            now = self._clock()
            settings = self._settings
            claimed = await self._revocations.claim_due_leases(
                now,
                now - timedelta(seconds=settings.creation_grace_seconds),
                # Long enough to finish the batch; if this process dies, another takes over then.
                now + timedelta(seconds=settings.timeout_seconds * 2 + 30),
                settings.batch_size,
                only,
            )
            by_connection: dict[tuple[str, str], list[Lease]] = defaultdict(list)
            for lease in claimed:
                by_connection[(lease.tenant, lease.connection_id)].append(lease)
            for (tenant, connection_id), leases in by_connection.items():
                await self._drop(tenant, connection_id, leases)
            return len(claimed)

    async def _drop(self, tenant: str, connection_id: str, leases: Sequence[Lease]) -> None:
        record = await self._connections.get_connection(tenant, connection_id)
        if record is None or record.sealed is None:
            # Purged: the administrator's credentials are gone. Still never given up: it shows
            # in ListLeases with this reason, and an admin can restore nothing but knows.
            await self._failed(leases, "connection_purged")
            return
        try:
            async with self._session(record) as db:
                if db.revocation_replaced:
                    log.warning(
                        "lease_revocation_statements_unusable",
                        connection_id=connection_id,
                        placeholder=db.revocation_replaced,
                        using="default",
                    )
                for lease in leases:
                    try:
                        refused_before = lease.last_error == "statement_failed"
                        rejected = await _drop_user(
                            db,
                            lease.username,
                            fall_back=refused_before and lease.attempts + 1 >= OWN_REVOCATION_TRIES,
                            lease_id=lease.id,
                        )
                    except LeaseDbError as exc:
                        await self._failed([lease], exc.reason)
                        continue
                    now = self._clock()
                    details = {"lease_id": lease.id, "username": lease.username}
                    # What ran is not what the connection says: the operator must hear why.
                    if db.revocation_replaced:
                        details["revocation_statements"] = "default"
                        details["unusable_placeholder"] = db.revocation_replaced
                    elif rejected is not None:
                        details["revocation_statements"] = "default"
                        details["own_statements_failed"] = rejected.code or rejected.reason
                    event = system_event(
                        now,
                        ACTOR,
                        tenant,
                        connection_id,
                        "lease.revoked",
                        reason=lease.revoke_reason,
                        details=details,
                    )
                    if await self._revocations.lease_revoked(tenant, lease.id, now, event):
                        metrics.LEASE_OPERATIONS.labels("revoke", "ok").inc()  # once, like the event
        except LeaseDbError as exc:  # opening the session (or the credentials): nothing was dropped
            await self._failed(leases, exc.reason)

    async def _failed(self, leases: Sequence[Lease], reason: str) -> None:
        settings = self._settings
        for lease in leases:
            delay = min(settings.max_retry_seconds, settings.min_retry_seconds * 2 ** min(lease.attempts, 20))
            delay *= random.uniform(0.8, 1.0)  # noqa: S311 (spreads retries, not security)
            metrics.LEASE_REVOCATION_FAILURES.labels(reason).inc()
            log.warning(
                "lease_revocation_failed", lease_id=lease.id, reason=reason, attempts=lease.attempts + 1
            )
            await self._revocations.lease_revocation_failed(
                lease.tenant, lease.id, reason, self._clock() + timedelta(seconds=delay)
            )

    # ------------------------------------------------------------ reconciler

    async def _reconcile_periodically(self) -> None:
        while True:
            _stop_if_cancelled()
            for step in (self.reconcile, self.prune_revoked):
                try:
                    await step()
                except Exception as exc:
                    log.error(f"lease_{step.__name__}_failed", error_type=type(exc).__name__)
            await asyncio.sleep(self._settings.reconcile_seconds)

    async def prune_revoked(self) -> int:
        """Delete the leases revoked more than `keep_revoked_days` ago, in batches; how many."""
        before = self._clock() - timedelta(days=self._settings.keep_revoked_days)
        pruned = 0
        while True:
            deleted = await self._revocations.prune_revoked_leases(before, _PRUNE_BATCH)
            pruned += deleted
            if deleted < _PRUNE_BATCH:
                break
            await asyncio.sleep(0)  # more to delete: let Resolve calls in between batches
        if pruned:
            log.info("leases_pruned", leases=pruned, keep_revoked_days=self._settings.keep_revoked_days)
        return pruned

    async def reconcile(self) -> int:
        """Queue the leases that may not live on (`_sweep`), then drop every user named like the
        broker's in each dynamic database that no lease not yet revoked accounts for (a crash
        between creating a user and writing its end); how many users were dropped."""
        dropped = 0
        for tenant, connection_id in await self._revocations.lease_connections():
            await self._sweep(tenant, connection_id, self._clock())
            record = await self._connections.get_connection(tenant, connection_id)
            if record is None or record.sealed is None or not record.dynamic:
                continue
            terms = LeaseTerms.of(record)
            try:
                async with self._session(record) as db:
                    # Listed before the leases are read: a lease row always exists before its user.
                    names = [name for name in await db.prefixed_users(terms.prefix) if terms.ours(name)]
                    orphans = set(names) - await self._revocations.live_lease_usernames(names)
                    for name in sorted(orphans):
                        # No lease to retry through: a refusal gives way to the default at once.
                        await _drop_user(db, name, fall_back=True, connection_id=connection_id)
                        dropped += 1
                        log.warning("lease_orphan_dropped", connection_id=connection_id, username=name)
                        metrics.LEASE_OPERATIONS.labels("orphan_drop", "ok").inc()
            except LeaseDbError as exc:
                log.warning("lease_reconcile_skipped", connection_id=connection_id, reason=exc.reason)
        return dropped

    # ---------------------------------------------------------------- helpers

    @contextlib.asynccontextmanager
    async def _session(
        self, record: ConnectionRecord, admin: SecretFields | None = None
    ) -> AsyncIterator[UserAdmin]:
        """An administrative session to `record`'s database: a kept one (`AdminPool`), or one opened
        through the egress policy with its stored credentials (`admin`, when the caller opened
        them already). Every failure to get one is a LeaseDbError: an unusable configuration,
        credentials that do not open, the database."""

        async def open_admin() -> UserAdmin:
            credentials = admin
            if credentials is None:
                try:
                    credentials = open_secrets(self._keyring, record)
                except SecretUnavailable:
                    raise LeaseDbError("decrypt_failed") from None
            target = Target(record.type, record.provider, record.config, credentials)
            try:
                return await self._open_admin(target, self._egress, timeout=self._settings.timeout_seconds)
            except ValueError:  # the statements (checked before connecting) cannot be used
                raise LeaseDbError("invalid_config") from None

        async with self._pool.session((record.tenant, record.id), record.version, open_admin) as db:
            yield db


def _ended(lease: Lease) -> str:
    """Why a lease that cannot be renewed has ended, for the caller."""
    if lease.state is LeaseState.ACTIVE:
        return "expired"  # past its end, not yet dropped
    return lease.revoke_reason or lease.state.value


def _check_filter(filter: LeaseFilter) -> None:
    """INVALID_ARGUMENT for a filter field no lease could match: control characters, or too long."""
    fields = {name: value for name, value in _filter_fields(filter).items() if name != "state"}
    require_printable(**fields)
    for name, value in fields.items():
        if len(value) > MAX_FILTER:
            raise InvalidArgument.field(name, f"must be at most {MAX_FILTER} characters")


def _filter_fields(filter: LeaseFilter) -> dict[str, str]:
    """The filter's set fields, as an audit event's details."""
    return {name: str(value) for name, value in dataclasses.asdict(filter).items() if value}


async def _drop_user(db: UserAdmin, name: str, *, fall_back: bool, **context: str) -> LeaseDbError | None:
    """Drop user `name` with the connection's revocation statements; when the server refuses them
    (not only for now: a lock, a deadlock) and `fall_back`, with the driver's default instead. The
    refusal given way to, else None."""
    try:
        await db.drop(name)
        return None
    except LeaseDbError as exc:
        if not (
            fall_back and exc.reason == "statement_failed" and not exc.refused_for_now and db.own_revocation
        ):
            raise
        log.warning(
            "lease_revocation_statements_rejected", username=name, code=exc.code, using="default", **context
        )
        await db.drop(name, driver_default=True)
        return exc
