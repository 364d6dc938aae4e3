"""What the services need from persistence, one protocol per role.

A service names the roles it uses (`Resolver` takes a `ConnectionStore`, a
`GrantStore` and a `SecretVersionStore`), so what it can touch is in its
signature; one store object (`sql.SqlStore`, on SQLite or PostgreSQL) plays every
role, and `Store` is all of them at once. No role has more than 12 methods
(`tests/unit/test_store_protocols.py`); the contract suite is
`tests/integration/test_store.py`, run on both engines.

Every method is scoped by tenant; a row of another tenant is indistinguishable
from a missing one. Each write that changes state takes the `AuditEvent` that
describes it and commits both in one transaction, so there is never a change
without its audit record nor a record of a change that did not happen. A listing
applies every filter in SQL, so paging stays exact; a filter's `start_time` is
inclusive and its `end_time` exclusive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from broker.crypto import Sealed
from broker.model import (
    AnchorKeys,
    AuditAnchors,
    AuditChainReport,
    AuditCheckpoint,
    AuditEvent,
    AuditFilter,
    AuditSeal,
    ConnectionFilter,
    ConnectionRecord,
    Grant,
    GrantFilter,
    Lease,
    LeaseFilter,
    McpTool,
    PendingAuthorization,
    SecurityEvent,
    SecurityEventFilter,
    SeenFact,
    TestResult,
)


@dataclass(frozen=True, slots=True)
class WrappedDek:
    """A stored data key, for master-key rotation: where it is and how it is bound.

    `kind` "connection": `key` is the connection id, bound with its secret version.
    `kind` "oauth_state": `key` is the pending flow's state hash (secret version 0).
    """

    kind: Literal["connection", "oauth_state"]
    tenant: str
    key: str
    secret_version: int
    sealed: Sealed


class ChangeSink(Protocol):
    """What hears of committed changes, whoever wrote them: the Resolve cache and the monitor."""

    def connection_changed(self, tenant: str, connection_id: str) -> None:
        """The connection row changed (its grants may have too)."""

    def grant_changed(self, tenant: str, connection_id: str, principal: str) -> None:
        """One grant changed."""

    def changes_unseen(self) -> None:
        """Other writers' changes may go unseen from now on: forget everything, keep nothing."""

    def changes_seen(self) -> None:
        """Changes are seen again (or too many to name): forget everything, then keep again."""

    def principal_blocked(self, tenant: str, principal: str, until: float) -> None:
        """Another replica's monitor blocked a principal until `until` (seconds since the epoch)."""


class Lifecycle(Protocol):
    """Opening, closing and probing the store: for the process that owns it (`server.py`, the CLI)."""

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None:
        """Finish pending work and release connections."""

    async def ping(self) -> None:
        """Raise if the store cannot answer a trivial query."""


class ConnectionStore(Protocol):
    """Connection rows and what is recorded on them: tests, MCP tools, use, token expiry."""

    async def create_connection(self, record: ConnectionRecord, event: AuditEvent) -> None:
        """Insert a new connection and its audit event.

        Raises `AlreadyExists` when a live (not soft-deleted) connection of the same
        tenant has the same name; nothing is written then.
        """

    async def get_connection(self, tenant: str, connection_id: str) -> ConnectionRecord | None:
        """The connection in any state (active, revoked, deleted, purged), or None."""

    async def get_connection_with_grant(
        self, tenant: str, connection_id: str, principal: str
    ) -> tuple[ConnectionRecord | None, Grant | None]:
        """`get_connection` and the principal's grant on it (`GrantStore.get_grant`), read together
        (a Resolve cache miss needs both); (None, None) when there is no such connection."""

    async def find_connection_by_name(self, tenant: str, name: str) -> ConnectionRecord | None:
        """The live (not soft-deleted) connection with this name, or None."""

    async def list_connections(
        self, tenant: str, filter: ConnectionFilter, limit: int, after_id: str | None
    ) -> list[ConnectionRecord]:
        """Up to `limit` connections ordered by id, with id > after_id when given.

        `filter.status` None lists live ones (active and revoked); DELETED lists
        soft-deleted, not purged ones; ACTIVE or REVOKED list only that status.
        Every label in `filter.labels` must match.
        """

    async def replace_connection(
        self,
        record: ConnectionRecord,
        expected_version: int,
        event: AuditEvent,
        *,
        drop_grants: bool = False,
    ) -> None:
        """Overwrite the row (tenant, id) with `record` if its version is still `expected_version`.

        Raises `NotFound` when no such row exists, `Aborted` when its version
        differs, `AlreadyExists` when the new name collides with another live
        connection. `drop_grants` also deletes the connection's grants (purge).
        """

    async def record_last_used(self, uses: Sequence[tuple[str, str, datetime]]) -> None:
        """Set last_used_at for (tenant, connection_id, time) triples; does not change the version."""

    async def record_test_result(
        self, tenant: str, connection_id: str, result: TestResult, event: AuditEvent
    ) -> None:
        """Set last_tested_at, test_status and last_test (not the version) and write `event`.

        Raises `NotFound` when the connection does not exist or was purged.
        """

    async def replace_mcp_tools(
        self,
        tenant: str,
        connection_id: str,
        tools: Sequence[McpTool],
        discovered_at: datetime,
        event: AuditEvent | None,
    ) -> None:
        """Replace the connection's stored MCP tools; `event` (when given) in the same transaction."""

    async def list_mcp_tools(self, tenant: str, connection_id: str) -> tuple[list[McpTool], datetime | None]:
        """The stored MCP tools ordered by name, and when they were discovered."""

    async def list_expiring_tokens(
        self, before: datetime, limit: int, after: datetime | None = None
    ) -> list[tuple[str, str]]:
        """(tenant, id) of live, active, not-expired connections whose token expires before `before`
        (and at or after `after`, when given), soonest first."""

    async def count_connections(self) -> dict[tuple[str, str], int]:
        """Connections (not purged) by (type, presented status), across tenants: for metrics."""


class GrantStore(Protocol):
    """Which executor principal may resolve which connection, until when."""

    async def put_grant(self, grant: Grant, event: AuditEvent) -> None:
        """Insert or replace the grant for (tenant, connection_id, principal)."""

    async def delete_grant(self, tenant: str, connection_id: str, principal: str, event: AuditEvent) -> bool:
        """Delete one grant and write `event`; False (and nothing written) when there was none."""

    async def delete_principal_grants(self, tenant: str, principal: str, event: AuditEvent) -> list[str]:
        """Delete every grant of `principal` in `tenant` in one transaction, writing `event` once per
        grant with that grant's connection id; the connection ids, sorted ([] and nothing written
        when there were none). Each grant's change is announced as `delete_grant` announces one."""

    async def get_grant(self, tenant: str, connection_id: str, principal: str) -> Grant | None:
        """The grant, expired or not, or None."""

    async def list_grants(
        self, tenant: str, filter: GrantFilter, limit: int, after: tuple[str, str] | None
    ) -> list[Grant]:
        """Up to `limit` grants ordered by (connection_id, principal), after that pair when given."""


class SecretVersionStore(Protocol):
    """When a connection's secret version was replaced: how long an executor's copy stays good."""

    async def superseded_at(self, tenant: str, connection_id: str, secret_version: int) -> datetime | None:
        """When that secret version was replaced by a newer one, while still remembered, else None.

        `replace_connection` records it in the same transaction when the secret version rises.
        """

    async def purge_superseded(self, before: datetime) -> int:
        """Forget secret versions replaced before `before`; returns how many."""


class OAuthStateStore(Protocol):
    """Pending authorization-code flows, each taken once."""

    async def put_oauth_state(self, pending: PendingAuthorization, event: AuditEvent) -> None:
        """Store a pending authorization-code flow with its audit event."""

    async def take_oauth_state(self, state_hash: str, tenant: str, actor: str) -> PendingAuthorization | None:
        """Atomically remove and return the flow this tenant's actor began (single use), or None.

        Another caller presenting the state finds nothing and consumes nothing.
        """

    async def delete_expired_oauth_states(self, now: datetime) -> int:
        """Forget flows that expired before completing; returns how many."""


class SecurityEventStore(Protocol):
    """The security monitor's events and the facts it remembers having seen."""

    async def add_security_event(self, event: SecurityEvent) -> SecurityEvent:
        """Store a security event; returns it with its id."""

    async def list_security_events(
        self, tenant: str, filter: SecurityEventFilter, limit: int, before_id: int | None
    ) -> list[SecurityEvent]:
        """Up to `limit` events of `tenant`, newest first, with id < before_id when given."""

    async def remember_seen(self, facts: Sequence[SeenFact], keep: int) -> None:
        """Insert facts not yet stored; keep only the newest `keep` objects per (tenant, kind, subject)."""

    async def load_seen(self, limit: int) -> list[SeenFact]:
        """Up to `limit` remembered facts, newest first."""


class AuditLogStore(Protocol):
    """The audit log: append, read, export, the hash chain, its seals and pruning."""

    async def append_audit(self, events: Sequence[AuditEvent]) -> None:
        """Durably append events in one transaction (one commit, one fsync for the batch)."""

    async def list_audit(
        self, tenant: str, filter: AuditFilter, limit: int, before_id: int | None
    ) -> list[AuditEvent]:
        """Up to `limit` events, newest first (descending id), with id < before_id when given."""

    async def export_audit(
        self, tenant: str, filter: AuditFilter, limit: int, after_id: int | None
    ) -> list[AuditEvent]:
        """Like `list_audit`, but oldest first (ascending id), with id > after_id when given."""

    async def verify_audit_chain(self, anchors: AnchorKeys) -> AuditChainReport:
        """Walk the whole hash chain from the newest checkpoint, in id order and in pages.

        The checkpoint must pass `anchors.checkpoint`. Every event's prev_hash must be its
        predecessor's hash and its hash must match its canonical form; the report names the
        first event where either fails. Each seal of an event on the way is judged by
        `anchors.seal` and, when it verifies, must match the event's hash; a verified seal
        of an event that is gone is a cut tail. The report carries the newest seal.
        """

    async def audit_anchors(self, at: Sequence[int] = ()) -> AuditAnchors:
        """The chain's tail (of the newest checkpoint when no event is left; (0, GENESIS) for
        none), its newest seal and checkpoint, and the hashes now held at the ids `at` and at
        the newest seal's, from one snapshot."""

    async def add_audit_seal(self, seal: AuditSeal) -> AuditSeal:
        """Store a seal; a seal of the same `last_id` already stored (another replica's, or one
        planted there) stays. The seal stored for `last_id`, this one or that one."""

    async def replace_audit_seal(self, old_mac: str, seal: AuditSeal) -> bool:
        """Re-sign the stored seal of `seal.last_id` and `seal.last_hash` (its key, MAC, time and
        format) if it still holds `old_mac`; False when it does not (changed meanwhile)."""

    async def replace_audit_checkpoint(self, old_mac: str | None, checkpoint: AuditCheckpoint) -> bool:
        """Sign checkpoint `checkpoint.id` again (its `newest_pruned_at`, `kek_id` and `mac`) if it
        still holds `old_mac` (None: unsigned) and the same last event; False when it does not."""

    async def prune_audit(
        self, before: datetime, now: datetime, anchors: AnchorKeys, batch_size: int = 1000
    ) -> int:
        """Delete the oldest events, up to the first one at or after `before` and no further
        than the newest one a verified seal matches, in batches.

        The part to delete is walked with its seals first; each batch is checked against the
        chain again and deleted in one transaction with a checkpoint signed by `anchors` (id and
        hash of its last event, the time of the newest). Raises `FailedPrecondition` (keeping
        the evidence) when the chain is broken in the part to delete, or the checkpoint it
        continues from is rejected by `anchors`. Returns how many events were deleted.
        """


class KeyStore(Protocol):
    """Master-key bookkeeping: broker-wide values (the key-check canary), wrapped data keys, wrap counts."""

    async def get_meta(self, key: str) -> bytes | None:
        """A broker-wide value (such as the sealed key-check canary), or None."""

    async def put_meta(self, key: str, value: bytes) -> None:
        """Insert or replace a broker-wide value."""

    async def deks_by_kek(self) -> dict[str, int]:
        """How many stored data keys (connections and pending oauth flows, purged rows excluded) each
        master key wraps: every master key still in use is a key here."""

    async def list_deks_not_under(
        self, kek_id: str, limit: int, after: tuple[str, str, str] | None = None
    ) -> list[WrappedDek]:
        """Up to `limit` stored data keys wrapped by a key other than `kek_id` ("" for every key).

        Ordered by (kind, tenant, key); only those after `after` when given.
        """

    async def rewrap_deks(
        self, rewrapped: Sequence[tuple[WrappedDek, Sealed]], wraps: Mapping[str, int]
    ) -> int:
        """Replace wrapped_dek and kek_id of each row that still holds the old wrapped key.

        Compare-and-swap per row (a row re-sealed or purged meanwhile is skipped);
        never changes the version or the ciphertext. `wraps` is added to the
        per-key counts in the same transaction. Returns how many rows changed.
        """

    async def add_kek_wraps(self, wraps: Mapping[str, int]) -> None:
        """Add to the persisted count of encryptions made under each master key."""

    async def kek_wraps(self) -> dict[str, int]:
        """The persisted count of encryptions made under each master key."""


class LeaseStore(Protocol):
    """Leases (database users made for executors): their rows as executors and admins see and
    change them; see `store.leases`."""

    async def insert_lease(self, lease: Lease) -> None:
        """Write a new lease, in state `creating`, before its user is created."""

    async def activate_lease(self, tenant: str, lease_id: str, events: Sequence[AuditEvent]) -> bool:
        """`creating` -> `active` with the events of its release; False when it was queued for
        revocation meanwhile (its creator took too long, or something ended it), is gone, or the
        grant it was made under (tenant, connection, principal) is gone."""

    async def get_lease(self, tenant: str, lease_id: str) -> Lease | None: ...

    async def list_leases(
        self, tenant: str, filter: LeaseFilter, limit: int, after: str | None
    ) -> list[Lease]:
        """A page of leases by id, after the id `after`."""

    async def renew_lease(
        self, tenant: str, lease_id: str, expires_at: datetime, now: datetime, event: AuditEvent
    ) -> bool:
        """Move an active, unexpired lease's end to `expires_at` (at most its `max_expires_at`);
        False, and nothing written, otherwise."""

    async def revoke_leases(
        self,
        tenant: str,
        filter: LeaseFilter,
        reason: str,
        now: datetime,
        event: AuditEvent | None,
        *,
        abandon: bool = False,
    ) -> int:
        """Queue every live lease matching `filter` for revocation now; how many. The event is
        written only when there was one. With `abandon`, every matching lease not yet revoked
        (queued ones too) is marked revoked at once, its user left as it is."""


class RevocationQueue(Protocol):
    """The leases owed a drop, as the revocation worker and the reconciler work through them, in
    every tenant; see `store.leases`."""

    async def claim_due_leases(
        self,
        now: datetime,
        creating_before: datetime,
        claim_until: datetime,
        limit: int,
        only: tuple[str, str] | None = None,
    ) -> list[Lease]:
        """Up to `limit` leases owed a drop (expired, queued, or stuck `creating` since before
        `creating_before`), in any tenant or only the lease `only` (tenant, id), claimed until
        `claim_until` by this caller only."""

    async def lease_revoked(self, tenant: str, lease_id: str, now: datetime, event: AuditEvent) -> bool:
        """The user was dropped: the lease is `revoked`, with its event (once: a lease already
        revoked, by a worker that took over a claim that ran out, stays as it is, and this is False)."""

    async def lease_revocation_failed(
        self, tenant: str, lease_id: str, error: str, next_attempt_at: datetime
    ) -> None:
        """A drop failed (`error`: a reason token): count it and try again at `next_attempt_at`."""

    async def live_lease_usernames(self, usernames: Sequence[str]) -> set[str]:
        """Which of `usernames` belong to a lease not yet revoked, in any tenant (the reconciler)."""

    async def lease_connections(self) -> list[tuple[str, str]]:
        """(tenant, connection id) of every connection with lease rows, in any tenant (the reconciler)."""

    async def pending_revocations(self, now: datetime) -> int:
        """How many leases are owed a drop now (queued, or active past their end), in any tenant."""

    async def prune_revoked_leases(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` leases revoked before `before`, in any tenant; how many. Their story
        stays in the audit log (lease.create, lease.revoke, lease.revoked)."""


class Coordination(Protocol):
    """What several replicas on one database share: the change feed, blocks, refresh locks, buckets."""

    async def watch(self, sink: ChangeSink) -> None:
        """Tell `sink` of every change committed from now on (this process's and, on PostgreSQL,
        other replicas' by LISTEN, `postgres.changes`, which calls `changes_unseen` whenever it cannot)."""

    async def announce_block(self, tenant: str, principal: str, until: float) -> None:
        """Tell the other replicas' monitors that this one blocked a principal (`principal_blocked`).

        Not a row: a block lives in each replica's memory. No-op on SQLite (one process).
        """

    def refresh_lock(self, tenant: str, connection_id: str) -> AbstractAsyncContextManager[None]:
        """Held around an OAuth2 token refresh, so one process at a time refreshes a connection.

        Within a process the caller already runs one refresh per connection; this
        extends that across replicas (a PostgreSQL advisory lock). No-op on SQLite.
        """

    async def take_rate_token(self, kind: str, principal: str, rate_per_second: float, burst: int) -> float:
        """Take one token from the shared bucket (kind, principal): 0.0, or seconds until one refills.

        Buckets hold up to `burst` tokens and refill at `rate_per_second`, on the
        store's clock, so every replica draws from the same bucket.
        """


class Store(
    Lifecycle,
    ConnectionStore,
    GrantStore,
    SecretVersionStore,
    OAuthStateStore,
    SecurityEventStore,
    AuditLogStore,
    KeyStore,
    LeaseStore,
    RevocationQueue,
    Coordination,
    Protocol,
):
    """Every role at once: what a backend implements and what the process that opens it holds."""
