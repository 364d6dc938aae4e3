"""Connection use-cases for admins: create, read, list, update and the lifecycle.

Every write validates through the catalog, seals secrets under a fresh data key
when they change, commits the row together with its audit event; the store's
change feed then invalidates the Resolve cache. Nothing here returns a secret value.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from broker import catalog, oauth
from broker.crypto import Keyring
from broker.egress import EgressPolicy
from broker.errors import Aborted, FailedPrecondition, FieldViolation, InvalidArgument
from broker.model import (
    AuditEvent,
    ConnectionFilter,
    ConnectionRecord,
    ConnectionStatus,
    LeaseFilter,
    LeaseState,
    Outcome,
    ReauthReason,
    TestResult,
    TestStatus,
    new_id,
)
from broker.sensitive import SecretFields
from broker.service import paging
from broker.service.audit import AuditLog
from broker.service.context import Call
from broker.service.inputs import require_printable
from broker.service.linked import is_linked, link
from broker.service.lookup import existing_connection
from broker.service.oauth import DraftAuthorization, revoke_upstream
from broker.service.sealing import open_secrets_audited, seal
from broker.service.testing import TestingService
from broker.service.tokens import CLIENT_CREDENTIALS, token_config, token_secrets
from broker.store import ConnectionStore, LeaseStore
from broker.testers import Target

Clock = Callable[[], datetime]

_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9 ._:/@-]{0,126}[A-Za-z0-9._-])?$")
_LABEL_KEY = re.compile(r"^[a-z0-9](?:[a-z0-9._/-]{0,61}[a-z0-9])?$")
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_SECRET_BYTES = 64 * 1024
MAX_SECRET_FIELDS = 64
MAX_CONFIG_BYTES = 64 * 1024
# How long a revoke or purge waits for the provider's revocation before answering (it goes on
# after): less than brokerctl's default deadline of 10 s.
UPSTREAM_REVOCATION_WAIT = 5.0
# The outcome audited for a provider revocation that shutdown cut off before it was answered.
CUT_OFF = "cut_off_at_shutdown"

log = structlog.get_logger("broker.connections")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class NewConnection:
    name: str
    type: str
    provider: str
    config: dict[str, Any]
    secrets: SecretFields
    labels: dict[str, str] = field(default_factory=dict)
    test_before_save: bool = False


@dataclass(frozen=True)
class ConnectionPatch:
    """A partial update; None means "leave as is" (see UpdateConnectionRequest in the proto)."""

    id: str
    name: str | None = None
    config: dict[str, Any] | None = None
    secrets: SecretFields = field(default_factory=lambda: SecretFields({}))
    clear_secrets: tuple[str, ...] = ()
    labels: dict[str, str] | None = None
    etag: str = ""
    test_before_save: bool = False


def _check_name(name: str, violations: list[FieldViolation]) -> None:
    if not name:
        violations.append(FieldViolation("name", "is required"))
    elif not _NAME.fullmatch(name):
        violations.append(
            FieldViolation(
                "name",
                # Worded from `_NAME` itself: change the two together.
                "must be 1 to 128 characters, each an ASCII letter, a digit, a space or one of . _ : / @ -, "
                "starting with a letter or digit and ending with a letter, digit, '.', '_' or '-'",
            )
        )


def _check_labels(labels: Mapping[str, str], violations: list[FieldViolation]) -> None:
    if len(labels) > MAX_LABELS:
        violations.append(FieldViolation("labels", f"at most {MAX_LABELS} labels"))
    for position, (key, value) in enumerate(sorted(labels.items()), start=1):
        if not _LABEL_KEY.fullmatch(key):
            # The bad key is not echoed: it is input we refused, and may be anything.
            violations.append(
                FieldViolation("labels", f"key #{position} must be 1-63 of a-z 0-9 . _ / - (lowercase)")
            )
        elif len(value) > MAX_LABEL_VALUE:
            violations.append(
                FieldViolation(f"labels.{key}", f"value must be at most {MAX_LABEL_VALUE} characters")
            )
        elif not value.isprintable():
            violations.append(FieldViolation(f"labels.{key}", "value must not contain control characters"))


def _check_sizes(config: Mapping[str, Any], secrets: SecretFields, violations: list[FieldViolation]) -> None:
    """Bounds that keep one connection small, whatever its type allows."""
    if len(json.dumps(config, default=str)) > MAX_CONFIG_BYTES:
        violations.append(FieldViolation("config", f"must be at most {MAX_CONFIG_BYTES} bytes as JSON"))
    if len(secrets.names) > MAX_SECRET_FIELDS:
        violations.append(FieldViolation("secrets", f"at most {MAX_SECRET_FIELDS} secret fields"))
    for name, value in secrets.reveal().items():
        if len(value.encode()) > MAX_SECRET_BYTES:
            violations.append(
                FieldViolation(f"secrets.{name[:64]}", f"must be at most {MAX_SECRET_BYTES} bytes")
            )


def _validate(
    name: str,
    type_: str,
    provider: str,
    config: Mapping[str, Any],
    secrets: SecretFields,
    labels: Mapping[str, str],
) -> catalog.Validated:
    """All checks of a connection's content; raises one InvalidArgument listing every violation."""
    violations: list[FieldViolation] = []
    _check_name(name, violations)
    _check_labels(labels, violations)
    _check_sizes(config, secrets, violations)
    try:
        validated = catalog.validate(type_, provider, config, secrets.reveal())
    except InvalidArgument as exc:
        # One violation per field: a 1 MB secret is too long in bytes and in characters, said once.
        reported = {v.field for v in violations}
        violations.extend(v for v in exc.violations if v.field not in reported)
    if violations:
        raise InvalidArgument(violations)
    return validated


def _check_secrets_follow_destination(
    current: ConnectionRecord, new_config: Mapping[str, Any], given: SecretFields
) -> None:
    """Pointing a connection elsewhere, or changing what is done with its secrets there, needs
    them again.

    Otherwise an admin who may edit but never read a secret could aim the connection at a server
    they control and test it, sending the stored secret there, or have a dynamic connection's
    stored administrator run their SQL. How the secret travels to the same destination (TLS, CA,
    driver options) is bound too but re-sealed without asking: the server stays the one the
    secrets were given for, and so does what they are used for.
    """
    moved = [
        f for f in catalog.fields_needing_secrets(current.type) if new_config.get(f) != current.config.get(f)
    ]
    missing = sorted(set(current.secret_fields) - set(given.names))
    if moved and missing:
        what = (
            "where the secrets are sent"
            if moved[0] in catalog.destination_fields(current.type)
            else "what the broker does with the secrets"
        )
        raise InvalidArgument(
            FieldViolation(
                f"secrets.{name}", f"must be given again: changing config.{moved[0]} changes {what}"
            )
            for name in missing
        )


def _check_clear_secrets(current: ConnectionRecord, patch: ConnectionPatch) -> None:
    """Each name to clear is a secret the connection holds, and is not given a new value too.

    Otherwise a typo (`pasword`) would be a silent no-op that still re-seals, and the admin would
    believe the secret gone. The names given are not quoted: they may be a secret pasted there.
    """
    if len(patch.clear_secrets) > MAX_SECRET_FIELDS:
        raise InvalidArgument.field("clear_secrets", f"at most {MAX_SECRET_FIELDS} names")
    held = ", ".join(current.secret_fields) or "none"
    violations = [
        FieldViolation(
            f"clear_secrets[{i}]",
            "is also given in secrets: clear a secret or set it, not both"
            if name in patch.secrets.names
            else f"is not a secret this connection holds (it holds: {held})",
        )
        for i, name in enumerate(patch.clear_secrets)
        if name in patch.secrets.names or name not in current.secret_fields
    ]
    if violations:
        raise InvalidArgument(violations)


def _tokens_asked_for_another_audience(
    current: ConnectionRecord, config: Mapping[str, Any], secrets: dict[str, str], given: tuple[str, ...]
) -> bool:
    """An oauth2 connection whose `resource` indicators change drops its tokens (from `secrets`)
    unless the same update gives them: they were asked for the old ones (RFC 8707), and an MCP
    connection linked to it (`service.linked`) must never send a server a token that was not asked
    for it. Returns whether the connection must now be authorized again; a client credentials one
    just gets a new token."""
    if current.type != "oauth2" or config.get("resource") == current.config.get("resource"):
        return False
    held = [name for name in ("access_token", "refresh_token") if name in secrets and name not in given]
    dropped = [secrets.pop(name) for name in held]
    return bool(dropped) and config.get("grant_type") != CLIENT_CREDENTIALS


def _target(validated: catalog.Validated) -> Target:
    return Target(validated.type, validated.provider, validated.config, SecretFields(validated.secrets))


class ConnectionService:
    def __init__(
        self,
        connections: ConnectionStore,
        keyring: Keyring,
        audit: AuditLog,
        clock: Clock = utc_now,
        tests: TestingService | None = None,
        egress: EgressPolicy | None = None,
        leases: LeaseStore | None = None,
    ) -> None:
        self._audit = audit
        # A dynamic connection's leases: purging it would destroy the credentials that drop them.
        self._leases = leases
        # Revoking an oauth2 connection asks its provider to revoke the tokens too (through egress).
        self._egress = egress
        self._connections = connections
        self._keyring = keyring
        self._clock = clock
        self._tests = tests
        # Provider revocations under way, by the connection each revokes: referenced so that they
        # finish when their caller went away, and so that shutdown waits for them (`close`).
        self._upstream_revocations: dict[asyncio.Task[None], str] = {}

    async def _linked(self, call: Call, validated: catalog.Validated) -> catalog.Validated:
        """An MCP connection's `oauth_connection` checked and kept as the linked connection's id."""
        if not is_linked(validated.type, validated.config):
            return validated
        return replace(validated, config=await link(self._connections, call.tenant, validated.config))

    async def _test_before_save(self, call: Call, validated: catalog.Validated) -> TestResult:
        if self._tests is None:
            raise FailedPrecondition("connection testing is not configured on this broker")
        return await self._tests.test_before_save(call, _target(validated))

    def draft_target(self, new: NewConnection) -> Target:
        """Validate a draft exactly as `create` would, without storing anything."""
        return _target(
            _validate(new.name or "draft", new.type, new.provider, new.config, new.secrets, new.labels)
        )

    def _event(self, call: Call, action: str, connection_id: str, **details: str) -> AuditEvent:
        return call.audit_event(self._clock(), action, connection_id, details=details)

    async def create(self, call: Call, new: NewConnection) -> ConnectionRecord:
        """Validate, seal and store a new connection; the reply is its redacted record."""
        validated = await self._linked(
            call, _validate(new.name, new.type, new.provider, new.config, new.secrets, new.labels)
        )
        tested = await self._test_before_save(call, validated) if new.test_before_save else None
        secrets = SecretFields(validated.secrets)
        now = self._clock()
        connection_id = new_id("conn")
        record = ConnectionRecord(
            id=connection_id,
            tenant=call.tenant,
            name=new.name,
            type=validated.type,
            provider=validated.provider,
            config=validated.config,
            secret_fields=secrets.names,
            labels=dict(new.labels),
            status=ConnectionStatus.ACTIVE,
            version=1,
            secret_version=1,
            sealed=None,
            created_at=now,
            updated_at=now,
            created_by=call.actor,
        )
        record = replace(record, sealed=seal(self._keyring, secrets, record))
        details = {"type": record.type, "secret_fields": ",".join(secrets.names)}
        if tested is not None:
            record = replace(
                record, last_test=tested, last_tested_at=tested.tested_at, test_status=TestStatus.SUCCESS
            )
            details["tested"] = tested.category.value
        event = call.audit_event(now, "connection.create", connection_id, details=details)
        await self._connections.create_connection(record, event)
        return record

    async def create_authorized(
        self, call: Call, draft: DraftAuthorization, tokens: oauth.TokenSet
    ) -> ConnectionRecord:
        """Create the oauth2 connection a completed authorization-code flow produced."""
        new = NewConnection(
            name=draft.name,
            type="oauth2",
            provider=draft.provider,
            config=token_config(draft.config, tokens),
            secrets=SecretFields(token_secrets(draft.secrets.reveal(), tokens)),
            labels=draft.labels,
        )
        return await self.create(call, new)

    async def get(self, call: Call, connection_id: str) -> ConnectionRecord:
        """The connection in any state but purged; another tenant's id is not found."""
        return await existing_connection(self._connections, call.tenant, connection_id)

    async def list(
        self, call: Call, filter: ConnectionFilter, page_size: int, page_token: str
    ) -> tuple[list[ConnectionRecord], str]:
        """One page of connections ordered by id, and the token for the next page ("" at the end)."""
        limit = paging.page_size(page_size)
        require_printable(type=filter.type, provider=filter.provider, name_prefix=filter.name_prefix)
        # Filters obey the rules labels are stored under; each one is a clause in the query.
        violations: list[FieldViolation] = []
        _check_labels(filter.labels, violations)
        if violations:
            raise InvalidArgument(violations)
        after = paging.decode_token("connections", page_token, paging.text, filter)
        records = await self._connections.list_connections(call.tenant, filter, limit + 1, after)
        if len(records) > limit:
            return records[:limit], paging.encode_token("connections", records[limit - 1].id, filter)
        return records, ""

    async def update(self, call: Call, patch: ConnectionPatch) -> ConnectionRecord:
        """Apply a partial update; secrets are re-sealed under a new data key only when they change."""
        current = await self.get(call, patch.id)
        if patch.etag and patch.etag != current.etag:
            raise Aborted("the connection changed since it was read (etag mismatch); read it again and retry")
        if not current.live:
            raise FailedPrecondition(f"connection {current.id} is deleted; restore it before updating")

        config = dict(current.config)
        for key, value in (patch.config or {}).items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        _check_clear_secrets(current, patch)
        event = self._event(call, "connection.update", current.id)
        old_secrets = (await open_secrets_audited(self._keyring, current, self._audit, event)).reveal()
        merged = {k: v for k, v in old_secrets.items() if k not in patch.clear_secrets}
        merged.update(patch.secrets.reveal())
        name = current.name if patch.name is None else patch.name
        labels = current.labels if patch.labels is None else patch.labels
        reauthorize = _tokens_asked_for_another_audience(current, config, merged, patch.secrets.names)
        validated = _validate(name, current.type, current.provider, config, SecretFields(merged), labels)
        validated = await self._linked(call, validated)
        _check_secrets_follow_destination(current, validated.config, patch.secrets)
        tested = await self._test_before_save(call, validated) if patch.test_before_save else None

        secrets = SecretFields(validated.secrets)
        secrets_changed = bool(patch.secrets.names or patch.clear_secrets or reauthorize)
        record = replace(
            current,
            name=name,
            config=validated.config,
            labels=dict(labels),
            secret_fields=secrets.names,
            version=current.version + 1,
            updated_at=self._clock(),
        )
        if reauthorize:
            record = replace(
                record, reauth_required_at=record.updated_at, reauth_reason=ReauthReason("resource_changed")
            )
        # The destination (where, how: TLS, the trusted CA, driver options; and to do what) is bound
        # into the ciphertext: changing it re-seals, secrets changed or not.
        if secrets_changed or record.destination != current.destination:
            record = replace(record, secret_version=current.secret_version + 1)
            record = replace(record, sealed=seal(self._keyring, secrets, record))
        changed = [
            f
            for f, differs in (
                ("name", record.name != current.name),
                ("config", record.config != current.config),
                ("labels", record.labels != current.labels),
                ("secrets", secrets_changed),
            )
            if differs
        ]
        if changed:
            event = self._event(call, "connection.update", current.id, changed=",".join(changed))
            await self._commit(record, current, event)
        else:
            # Nothing to change: no write, no audit event, and the etag others hold stays valid.
            record = current
        if tested is not None:
            test_event = call.audit_event(
                self._clock(), "connection.test", record.id, details={"before_save": "true"}
            )
            await self._connections.record_test_result(call.tenant, record.id, tested, test_event)
            record = replace(
                record, last_test=tested, last_tested_at=tested.tested_at, test_status=TestStatus.SUCCESS
            )
        return record

    async def delete(self, call: Call, connection_id: str) -> ConnectionRecord:
        """Soft delete: hidden from lists, resolvable by nobody, restorable until purged."""
        current = await self.get(call, connection_id)
        if not current.live:
            return current
        record = replace(
            current, deleted_at=self._clock(), version=current.version + 1, updated_at=self._clock()
        )
        await self._commit(record, current, self._event(call, "connection.delete", current.id))
        return record

    async def restore(self, call: Call, connection_id: str) -> ConnectionRecord:
        """Undo a soft delete; fails when the name was taken meanwhile."""
        current = await self.get(call, connection_id)
        if current.live:
            raise FailedPrecondition(f"connection {current.id} is not deleted")
        record = replace(current, deleted_at=None, version=current.version + 1, updated_at=self._clock())
        await self._commit(record, current, self._event(call, "connection.restore", current.id))
        return record

    async def purge(self, call: Call, connection_id: str) -> None:
        """Destroy the wrapped data key (and ciphertext) of a soft-deleted connection, and its grants.

        An OAuth2 connection's tokens are revoked at the provider first: after the purge nobody
        holds them, so nobody could revoke them any more (a refresh token may live for years).
        """
        current = await self.get(call, connection_id)
        if current.live:
            raise FailedPrecondition(f"connection {current.id} must be deleted before it can be purged")
        now = self._clock()
        if self._leases is not None:
            await self._leases_dropped(call, current.id, now)
        record = replace(current, sealed=None, purged_at=now, version=current.version + 1, updated_at=now)
        await self._commit(
            record, current, self._event(call, "connection.purge", current.id), drop_grants=True
        )
        # `current` still holds the sealed tokens in memory: the one copy left.
        await self._revoke_upstream(call, current)

    async def _leases_dropped(self, call: Call, connection_id: str, now: datetime) -> None:
        """Refuse to purge while a lease's database user still waits to be dropped: that needs the
        stored administrator's credentials, which a purge destroys."""
        assert self._leases is not None
        mine = LeaseFilter(connection_id=connection_id)
        await self._leases.revoke_leases(call.tenant, mine, "connection_purged", now, None)
        waiting = replace(mine, state=LeaseState.REVOKING)
        if await self._leases.list_leases(call.tenant, waiting, 1, None):
            raise FailedPrecondition(
                f"connection {connection_id} has leases whose database users are still being dropped; "
                f"purge it once `brokerctl leases --connection {connection_id} --state revoking` lists none "
                f"(if the database is gone for good: `brokerctl leases revoke --connection {connection_id} "
                "--abandon`)"
            )

    async def revoke(self, call: Call, connection_id: str, reason: str) -> ConnectionRecord:
        """Mark revoked: stays listed, never resolves again."""
        if len(reason) > 512:
            raise InvalidArgument.field("reason", "must be at most 512 characters")
        require_printable(reason=reason)
        current = await self.get(call, connection_id)
        if not current.live:
            raise FailedPrecondition(f"connection {current.id} is deleted")
        if current.status is ConnectionStatus.REVOKED:
            return current
        record = replace(
            current, status=ConnectionStatus.REVOKED, version=current.version + 1, updated_at=self._clock()
        )
        event = call.audit_event(self._clock(), "connection.revoke", current.id, reason=reason)
        await self._commit(record, current, event)
        await self._revoke_upstream(call, current)
        return record

    async def _revoke_upstream(self, call: Call, record: ConnectionRecord) -> None:
        """Ask an oauth2 connection's provider to revoke its tokens, after the local change committed.

        The local revoke or purge never waits for the provider: one slow to answer (up to the egress
        timeout, longer than brokerctl's deadline) would otherwise keep a leaked credential
        resolvable. The caller waits for the provider `UPSTREAM_REVOCATION_WAIT` seconds at most;
        the call goes on without it, and its outcome is an audit event of its own,
        `connection.upstream_revocation`.
        """
        if self._egress is None or record.type != "oauth2":
            return
        task = asyncio.create_task(self._revoke_upstream_audited(call, record, self._egress))
        self._upstream_revocations[task] = record.id
        task.add_done_callback(self._upstream_revocation_ended)
        # asyncio.wait neither cancels the task at its timeout nor when this caller is cancelled.
        await asyncio.wait({task}, timeout=UPSTREAM_REVOCATION_WAIT)

    def _upstream_revocation_ended(self, task: asyncio.Task[None]) -> None:
        self._upstream_revocations.pop(task, None)
        # Retrieved here so that an unexpected failure is logged, not left to the loop's handler.
        if not task.cancelled() and task.exception() is not None:
            log.error("upstream_revocation_failed", error_type=type(task.exception()).__name__)

    async def _revoke_upstream_audited(
        self, call: Call, record: ConnectionRecord, egress: EgressPolicy
    ) -> None:
        try:
            upstream = await revoke_upstream(self._keyring, egress, record)
        except asyncio.CancelledError:
            # Only `close` cancels this task: the trail must say the provider may still hold the
            # tokens (revoke them there by hand), so the event is written, then the task ends.
            await self._audit_upstream_revocation(call, record, f"failed: {CUT_OFF}")
            raise
        except Exception:
            # A failure nobody foresaw still leaves its trail (and is logged by the done callback).
            await self._audit_upstream_revocation(call, record, "failed: unexpected_error")
            raise
        await self._audit_upstream_revocation(call, record, upstream)

    async def close(self, deadline: float) -> None:
        """Let the provider revocations under way finish until `deadline` (`time.monotonic()`).

        Those still unanswered then are cancelled, each logged (`upstream_revocation_cut_off`) and
        audited as `connection.upstream_revocation` failed with `cut_off_at_shutdown`.
        """
        pending = dict(self._upstream_revocations)
        if not pending:
            return
        left = max(deadline - time.monotonic(), 0.0)
        log.info("upstream_revocations_draining", count=len(pending), wait_seconds=round(left, 3))
        _, cut = await asyncio.wait(pending, timeout=left)
        for task in cut:
            log.warning("upstream_revocation_cut_off", connection_id=pending[task])
            task.cancel()
        if cut:
            # Each writes its audit event as it ends; the audit log is flushed after this step.
            await asyncio.wait(cut)
        log.info("upstream_revocations_drained", completed=len(pending) - len(cut), cut_off=len(cut))

    async def _audit_upstream_revocation(self, call: Call, record: ConnectionRecord, upstream: str) -> None:
        if not upstream:
            return
        failed = upstream.startswith("failed")
        outcome = Outcome.FAILED if failed else Outcome.SUCCEEDED
        reason = upstream.removeprefix("failed: ") if failed else ""
        event = call.audit_event(
            self._clock(),
            "connection.upstream_revocation",
            record.id,
            outcome,
            reason,
            details={"upstream_revocation": upstream},
        )
        await self._audit.append(event)

    async def _commit(
        self,
        record: ConnectionRecord,
        current: ConnectionRecord,
        event: AuditEvent,
        *,
        drop_grants: bool = False,
    ) -> None:
        # The store's change feed tells the Resolve cache once the change is committed.
        await self._connections.replace_connection(record, current.version, event, drop_grants=drop_grants)
