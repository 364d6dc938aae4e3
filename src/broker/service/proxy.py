"""Proxy mode: the broker makes an HTTP call with a connection's credential for an executor,
who never holds the secret.

The order is the invariant: the caller's grant (PROXY or RESOLVE, unexpired) and its scope
are checked *before* any key is unwrapped; then the secrets are opened, the call is made
through the egress policy (`service.upstream`: injected credential, no redirects, no
retries, capped and scrubbed answer), and the call is audited, durably, before the answer
is returned: no audit record, no answer. A denial for lack of access looks like every
other (`DENIED_MESSAGE`); a call outside its grant's scope says so, since only the grantee
can get that far. Records and grants are read from the store on every call (no cache yet).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import httpx

from broker import metrics
from broker.crypto import Keyring
from broker.egress import Blocked, DnsFailure, EgressPolicy, InvalidTarget
from broker.errors import (
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    SecretUnavailable,
    Unavailable,
)
from broker.model import ConnectionRecord, Grant, Outcome
from broker.service.audit import AuditLog
from broker.service.context import Call
from broker.service.lookup import refusal
from broker.service.monitor import Monitor
from broker.service.resolve import DENIED_MESSAGE
from broker.service.sealing import DECRYPT_FAILED, open_secrets
from broker.service.upstream import (
    AnswerTooLarge,
    NotInjectable,
    UpstreamAnswer,
    UpstreamRequest,
    call,
    check_request,
    injection,
)
from broker.store import ConnectionStore, GrantStore

PROXY_HTTP = "connection.proxy"
OUT_OF_SCOPE = "the call is outside the grant's scope (its methods and path prefixes)"
MAX_PURPOSE, MAX_REF = 256, 256


class ProxyService:
    def __init__(
        self,
        connections: ConnectionStore,
        grants: GrantStore,
        keyring: Keyring,
        audit: AuditLog,
        egress: EgressPolicy,
        clock: Callable[[], datetime],
        max_response_bytes: int,
        monitor: Monitor | None = None,
    ) -> None:
        self._connections = connections
        self._grants = grants
        self._keyring = keyring
        self._audit = audit
        self._egress = egress
        self._clock = clock
        self._max_bytes = max_response_bytes
        self._monitor = monitor

    async def http(
        self,
        call_: Call,
        request: UpstreamRequest,
        *,
        connection_id: str = "",
        name: str = "",
        purpose: str = "",
    ) -> UpstreamAnswer:
        """Make `request` with the connection's credential; see the module docstring."""
        if bool(connection_id) == bool(name):
            raise InvalidArgument.field("ref", "exactly one of connection_id or name is required")
        for field_name, text, most in (
            ("connection_id", connection_id, MAX_REF),
            ("name", name, MAX_REF),
            ("purpose", purpose, MAX_PURPOSE),
        ):
            if len(text) > most or not text.isprintable():
                raise InvalidArgument.field(field_name, f"must be at most {most} printable characters")
        check_request(request)  # before anything is audited: the path goes into the event
        now = self._clock()
        record = await (
            self._connections.get_connection(call_.tenant, connection_id)
            if connection_id
            else self._connections.find_connection_by_name(call_.tenant, name)
        )
        ref_id = record.id if record is not None else connection_id
        details = {"method": request.method[:16], "path": request.path[:256]}
        if purpose:
            details["purpose"] = purpose
        if name and record is None:
            details["name"] = name[:128]
        grant = None if record is None else await self._grants.get_grant(call_.tenant, record.id, call_.actor)
        reason = self._denial_reason(call_, record, grant, now)
        if not reason and grant is not None and not grant.scope.allows_request(request.method, request.path):
            reason = "out_of_scope"
        if reason:
            metrics.PROXY_CALLS.labels("denied", reason).inc()
            await self._audit.append(
                call_.audit_event(now, PROXY_HTTP, ref_id, Outcome.DENIED, reason, details)
            )
            if self._monitor is not None:
                self._monitor.resolve_denied(call_, ref_id, reason, now)
            raise PermissionDenied(OUT_OF_SCOPE if reason == "out_of_scope" else DENIED_MESSAGE)
        assert record is not None
        try:
            secrets = open_secrets(self._keyring, record)
        except SecretUnavailable:
            metrics.PROXY_CALLS.labels("failed", DECRYPT_FAILED).inc()
            await self._audit.append(
                call_.audit_event(now, PROXY_HTTP, ref_id, Outcome.FAILED, DECRYPT_FAILED, details)
            )
            raise
        started = time.monotonic()
        try:
            target = injection(record.type, record.provider, record.config, secrets)
            details["host"] = httpx.URL(target.base_url).host
            answer = await call(self._egress, target, request, max_bytes=self._max_bytes)
        except InvalidArgument:
            raise  # a request that may not be sent: nothing left the broker
        except (Blocked, InvalidTarget, DnsFailure, httpx.HTTPError, TimeoutError, FailedPrecondition) as exc:
            reason = _failure_reason(exc)
            details["latency_ms"] = str(int((time.monotonic() - started) * 1000))
            metrics.PROXY_CALLS.labels("failed", reason).inc()
            await self._audit.append(
                call_.audit_event(now, PROXY_HTTP, ref_id, Outcome.FAILED, reason, details)
            )
            raise _caller_error(exc, reason) from None
        details.update(
            status=str(answer.status),
            bytes=str(len(answer.body)),
            latency_ms=str(int((time.monotonic() - started) * 1000)),
        )
        await self._audit.append(call_.audit_event(now, PROXY_HTTP, ref_id, Outcome.ALLOWED, "", details))
        metrics.PROXY_CALLS.labels("allowed", "").inc()
        if self._monitor is not None:
            self._monitor.resolve_allowed(call_, record.id, now)
        return answer

    def _denial_reason(
        self, call_: Call, record: ConnectionRecord | None, grant: Grant | None, now: datetime
    ) -> str:
        if self._monitor is not None and self._monitor.blocked(call_.tenant, call_.actor, now):
            return "principal_blocked"
        if record is None:
            return "unknown_connection"
        if reason := refusal(record):
            return reason
        if grant is None:
            return "no_grant"
        if not grant.active_at(now):
            return "grant_expired"
        return ""


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, Blocked | InvalidTarget):
        return "egress_blocked"
    if isinstance(exc, DnsFailure):
        return "dns_failed"
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "upstream_timeout"
    if isinstance(exc, AnswerTooLarge):
        return "answer_too_large"
    if isinstance(exc, NotInjectable):
        return "not_injectable"
    return "upstream_unreachable"


def _caller_error(exc: BaseException, reason: str) -> BrokerError:
    """What the executor is told: the kind of failure, never the upstream's own words."""
    if isinstance(exc, FailedPrecondition):
        return exc
    if reason == "egress_blocked":
        return FailedPrecondition("the egress policy does not allow this connection's address")
    if reason == "upstream_timeout":
        return Unavailable("the upstream did not answer in time")
    if reason == "dns_failed":
        return Unavailable("the upstream's host name could not be resolved")
    return Unavailable("the upstream could not be reached")
