"""Proxy mode: the broker makes calls with a connection's credential for an executor, who never
holds the secret: HTTP requests (`http`) and MCP tool calls (`call_tool`).

The order is the invariant: the caller's grant (PROXY or RESOLVE, unexpired) and its scope
are checked *before* any key is unwrapped; then the secrets are opened, the call is made
through the egress policy, and the call is audited, durably, before the answer is returned:
no audit record, no answer. A denial for lack of access looks like every other
(`DENIED_MESSAGE`); a call outside its grant's scope says so, since only the grantee can get
that far. Records and grants are read from the store on every call (no cache yet).

HTTP: `service.upstream` (injected credential, no redirects, no retries, capped and scrubbed
answer). MCP: a tool is called only if the stored list (the last admin refresh) has it and
the server still describes it exactly so (`testers.mcp.call_tool` compares the definition
hashes); otherwise FAILED_PRECONDITION and, for a changed or vanished tool, a security event.
A tool that runs only as an MCP task is never called (FAILED_PRECONDITION, before any key is
unwrapped) nor listed to executors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx

from broker import metrics
from broker.catalog import MAX_JSON_DEPTH
from broker.crypto import Keyring
from broker.egress import Blocked, DnsFailure, EgressPolicy, InvalidTarget
from broker.errors import (
    BrokerError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    SecretUnavailable,
    Unavailable,
)
from broker.model import (
    ConnectionRecord,
    Grant,
    GrantScope,
    McpTool,
    Outcome,
    TestCategory,
    TestStage,
    json_depth,
)
from broker.sensitive import SecretFields
from broker.service.audit import AuditLog
from broker.service.context import Call
from broker.service.linked import LinkBroken, bearer, is_linked, linked_connection, still_linked
from broker.service.lookup import refusal
from broker.service.monitor import Monitor
from broker.service.resolve import DENIED_MESSAGE, MAX_PURPOSE
from broker.service.sealing import DECRYPT_FAILED, open_secrets
from broker.service.tokens import TokenRefresher
from broker.service.upstream import (
    AnswerTooLarge,
    NotInjectable,
    UnreadableAnswer,
    UpstreamAnswer,
    UpstreamRequest,
    base_url,
    call,
    check_request,
    injection,
    pooled_client,
    stream,
    under_base,
)
from broker.store import ConnectionStore, GrantStore
from broker.testers import mcp
from broker.testers.base import Target, TestFailure

PROXY_HTTP = "connection.proxy"


class _TaskRequired(FailedPrecondition):
    """The approved tool runs only as an MCP task (`execution.taskSupport` "required"): a plain
    `tools/call` would fail, and the broker does not run tasks: a task's result is fetched by
    later requests (`tasks/result`), outside the one audited call."""


# Methods a 401 may repeat once after a token refresh (RFC 9110 idempotent methods).
_REPEATABLE = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# What a call through `service.upstream` can fail with, besides the checks before it.
_UPSTREAM_FAILURES = (
    InvalidArgument,
    Blocked,
    InvalidTarget,
    DnsFailure,
    httpx.HTTPError,
    TimeoutError,
    FailedPrecondition,
)
CALL_TOOL = "mcp.call_tool"
LIST_TOOLS = "mcp.list_granted_tools"
TOOL_CHANGED = "tool definition changed since it was approved"
MAX_REF, MAX_TOOL, MAX_ARGUMENTS = 256, 128, 256 * 1024  # MAX_PURPOSE is Resolve's
# The upstream part of a call stops this long before the caller's deadline, so that its failure is
# audited and answered (DEADLINE_EXCEEDED, with what happened) before gRPC cancels the call.
DEADLINE_MARGIN = 0.1


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
        max_stream_bytes: int = 256 * 1024 * 1024,
        note_used: Callable[[str, str, datetime], None] | None = None,
        tokens: TokenRefresher | None = None,
    ) -> None:
        self._connections = connections
        self._grants = grants
        self._keyring = keyring
        self._audit = audit
        self._egress = egress
        self._http = pooled_client(egress)  # kept-alive connections to upstreams; see `close`
        self._clock = clock
        self._max_bytes = max_response_bytes
        self._max_stream_bytes = max_stream_bytes
        # Where a call counts as a use of the connection (last_used_at): Resolve's batched writer.
        self._note_used = note_used
        self._tokens = tokens  # refreshes OAuth2 tokens: when due, and once after a 401
        self._monitor = monitor

    async def http(
        self,
        call_: Call,
        request: UpstreamRequest,
        *,
        connection_id: str = "",
        name: str = "",
        purpose: str = "",
        time_left: float | None = None,
    ) -> UpstreamAnswer:
        """Make `request` with the connection's credential; see the module docstring. `time_left`: the
        seconds left of the caller's deadline, which bounds the upstream part (None: unbounded)."""
        use, target, request, started = await self._http_target(call_, request, connection_id, name, purpose)
        async with self._within(use, started, _deadline(time_left)):
            answer = await self._send(use, target, request, started)
            if answer.status == 401 and target.oauth_token and request.method in _REPEATABLE:
                # The provider refused a token it issued (revoked, rotated early): one refresh and
                # one more try, never more. A non-idempotent call is not repeated.
                assert self._tokens is not None
                rejected = target.oauth_token
                refreshed = self._tokens.after_rejection(target.record, rejected)
                record, secrets = await self._token(use, refreshed, started)
                target = _Target(record, _also_scrubbing(secrets, rejected))
                use.details["retried"] = "after_401"
                answer = await self._send(use, target, request, started)
        use.details.update(status=str(answer.status), bytes=str(len(answer.body)))
        await self._done(use, started)
        return answer

    async def http_stream(
        self,
        call_: Call,
        request: UpstreamRequest,
        *,
        connection_id: str = "",
        name: str = "",
        purpose: str = "",
        time_left: float | None = None,
    ) -> AsyncIterator[UpstreamAnswer | bytes]:
        """As `http`, the answer streamed: its head, audited before it is yielded, then scrubbed
        chunks of the body (at most `max_stream_bytes`), all within `time_left` as for `http`."""
        use, target, request, started = await self._http_target(call_, request, connection_id, name, purpose)
        until = _deadline(time_left)
        chunks = stream(self._http, target.injection, request, max_bytes=self._max_stream_bytes)
        async with contextlib.aclosing(chunks):
            try:
                async with self._within(use, started, until):
                    head = await anext(chunks)
            except _UPSTREAM_FAILURES as exc:
                raise await self._upstream_failed(use, exc, started) from None
            assert isinstance(head, UpstreamAnswer)  # `stream` yields its head first
            use.details.update(status=str(head.status), streamed="true")
            await self._done(use, started)
            yield head
            while True:
                # Each step within the caller's deadline (a timeout must not span a `yield`, where
                # the code reading the chunks runs). A failure is audited again: the call was
                # allowed, then its answer broke off.
                try:
                    async with self._within(use, started, until):
                        chunk = await anext(chunks, None)
                except _UPSTREAM_FAILURES as exc:
                    raise await self._upstream_failed(use, exc, started) from None
                if chunk is None:
                    break
                assert isinstance(chunk, bytes)
                yield chunk

    async def call_tool(
        self,
        call_: Call,
        tool: str,
        arguments: dict[str, Any],
        *,
        connection_id: str = "",
        name: str = "",
        purpose: str = "",
        time_left: float | None = None,
    ) -> mcp.ToolCall:
        """Call an approved, unchanged MCP tool with the connection's credential; `time_left` as for
        `http`."""
        if not 0 < len(tool) <= MAX_TOOL or not tool.isprintable():
            raise InvalidArgument.field("tool", f"must be 1-{MAX_TOOL} printable characters")
        if len(json.dumps(arguments, default=str)) > MAX_ARGUMENTS:
            raise InvalidArgument.field("arguments", f"must be at most {MAX_ARGUMENTS} bytes as JSON")
        use = _Use(call_, CALL_TOOL, {"tool": tool}, self._clock())
        record, _ = await self._authorize(use, connection_id, name, purpose, lambda _, s: s.allows_tool(tool))
        started = time.monotonic()
        try:
            approved = {t.name: t for t in await self._approved_tools(record)}
            if tool not in approved:
                raise NotInjectable(
                    f"the tool {tool!r} is not approved: an admin approves a server's tools with"
                    " `brokerctl mcp refresh`"
                )
            if approved[tool].not_callable:
                raise _TaskRequired(
                    f"the tool {tool!r} cannot be called through the broker: {approved[tool].not_callable}"
                )
            linked = await self._linked_token(use, record, started)
            secrets = bearer(linked[1]) if linked else await self._open(use, record)
            target = Target(record.type, record.provider, record.config, secrets)
            approved_hash = approved[tool].definition_hash
            async with self._within(use, started, _deadline(time_left)):
                try:
                    result = await mcp.call_tool(target, self._egress, tool, arguments, approved_hash)
                except TestFailure as exc:
                    if linked is None or not _refused_before_the_session(exc):
                        raise
                    # The server refused a token its authorization server issued (revoked, rotated
                    # early) before anything was called: one refresh and one more try, never more.
                    rejected = target.secret("access_token")
                    linked = await self._linked_token(use, record, started, rejected)
                    assert linked is not None
                    secrets = _also_scrubbing(bearer(linked[1]), rejected)
                    target = Target(record.type, record.provider, record.config, secrets)
                    use.details["retried"] = "after_401"
                    result = await mcp.call_tool(target, self._egress, tool, arguments, approved_hash)
        except mcp.ToolChanged as exc:
            await self._failed(use, "tool_changed", started)
            if self._monitor is not None:
                self._monitor.tool_changed(call_, record.id, tool, exc.current is None, use.now)
            raise FailedPrecondition(
                f"{TOOL_CHANGED}; an admin reviews it with `brokerctl mcp refresh`"
            ) from None
        except _TaskRequired as exc:
            await self._failed(use, "task_required", started)
            raise exc from None
        except NotInjectable as exc:
            await self._failed(use, "not_callable", started)
            raise exc from None
        except mcp.ToolError as exc:
            await self._failed(use, exc.reason, started)
            if exc.arguments:
                raise InvalidArgument.field("arguments", exc.message) from None
            raise FailedPrecondition(exc.message) from None
        except (Blocked, InvalidTarget, DnsFailure) as exc:
            await self._failed(use, "egress_blocked", started)
            raise _caller_error(exc, "egress_blocked") from None
        except TestFailure as exc:
            await self._failed(use, exc.result.category.value, started)
            raise Unavailable(f"the MCP server call failed ({exc.result.category.value})") from None
        if max(map(json_depth, [*result.content, result.structured])) > MAX_JSON_DEPTH:
            await self._failed(use, "answer_too_deep", started)
            raise FailedPrecondition(
                f"the tool's result is nested more than {MAX_JSON_DEPTH} levels deep, more than an"
                " executor can read"
            )
        use.details["is_error"] = str(result.is_error).lower()
        await self._done(use, started)
        return result

    async def granted_tools(self, call_: Call, *, connection_id: str = "", name: str = "") -> list[McpTool]:
        """The approved tools of an MCP connection that the caller's grant lets it call (and that
        the broker can call: not those that run only as MCP tasks)."""
        use = _Use(call_, LIST_TOOLS, {}, self._clock())
        record, grant = await self._authorize(use, connection_id, name, "", lambda _, s: True)
        return [
            t
            for t in await self._approved_tools(record)
            if grant.scope.allows_tool(t.name) and not t.not_callable
        ]

    async def _approved_tools(self, record: ConnectionRecord) -> list[McpTool]:
        if record.type != "mcp":
            raise NotInjectable(f"tools belong to mcp connections, not to {record.type} connections")
        tools, _ = await self._connections.list_mcp_tools(record.tenant, record.id)
        return tools

    async def close(self) -> None:
        """Close the pooled upstream connections (at shutdown, after the listeners drained)."""
        await self._http.aclose()

    # ------------------------------------------------------------ each step

    async def _http_target(
        self, call_: Call, request: UpstreamRequest, connection_id: str, name: str, purpose: str
    ) -> tuple[_Use, _Target, UpstreamRequest, float]:
        """The checks of an HTTP call, then the opened connection's injection (an OAuth2 token
        refreshed first when it is due, as for Resolve), the request with a URL in its path made
        a path under the connection's base URL, and when it began."""
        check_request(request)  # before anything is audited: the path goes into the event
        use = _Use(call_, PROXY_HTTP, {"method": request.method}, self._clock())
        use.details["path"] = request.path if request.path.startswith("/") else "(a URL)"

        def allows(record: ConnectionRecord, scope: GrantScope) -> bool:
            nonlocal request
            if not request.path.startswith("/"):  # scopes name paths under the base URL: make it one
                request = under_base(request, base_url(record.type, record.provider, record.config))
                use.details["path"] = request.path
            return scope.allows_request(request.method, request.path)

        record, _ = await self._authorize(use, connection_id, name, purpose, allows)
        secrets = await self._open(use, record)
        started = time.monotonic()
        if record.type == "oauth2" and self._tokens is not None:
            record, secrets = await self._token(use, self._tokens.fresh(record, secrets), started)
        try:
            target = _Target(record, secrets)
        except NotInjectable as exc:
            raise await self._upstream_failed(use, exc, started) from None
        use.details["host"] = httpx.URL(target.injection.base_url).host or ""
        return use, target, request, started

    async def _send(
        self, use: _Use, target: _Target, request: UpstreamRequest, started: float
    ) -> UpstreamAnswer:
        try:
            return await call(self._http, target.injection, request, max_bytes=self._max_bytes)
        except _UPSTREAM_FAILURES as exc:
            raise await self._upstream_failed(use, exc, started) from None

    async def _token(
        self, use: _Use, refresh: Awaitable[tuple[ConnectionRecord, SecretFields]], started: float
    ) -> tuple[ConnectionRecord, SecretFields]:
        """An OAuth2 refresh's result; its failure (re-authorization needed, the provider down) is
        audited as `oauth_refresh_failed` and raised as the broker said it."""
        try:
            return await refresh
        except (FailedPrecondition, Unavailable):
            await self._failed(use, "oauth_refresh_failed", started)
            raise

    async def _linked_token(
        self, use: _Use, record: ConnectionRecord, started: float, rejected: str = ""
    ) -> tuple[ConnectionRecord, SecretFields] | None:
        """For an MCP connection linked to an oauth2 connection (`service.linked`): that connection
        and its secrets with a token refreshed when due (or, after the server refused `rejected`,
        a new one); None for any other connection. A link that no longer holds, before or after the
        refresh, is audited as `oauth_link_broken`."""
        if not is_linked(record.type, record.config):
            return None
        if self._tokens is None:
            raise FailedPrecondition("OAuth2 tokens are not kept on this broker")
        try:
            linked = await linked_connection(self._connections, use.call.tenant, record.config)
            use.details["oauth_connection"] = linked.id
            refresh = (
                self._tokens.after_rejection(linked, rejected)
                if rejected
                else self._tokens.fresh(linked, await self._open(use, linked))
            )
            linked, secrets = await self._token(use, refresh, started)
            still_linked(linked, record.config)
        except LinkBroken:
            await self._failed(use, "oauth_link_broken", started)
            raise
        return linked, secrets

    async def _authorize(
        self,
        use: _Use,
        connection_id: str,
        name: str,
        purpose: str,
        allows: Callable[[ConnectionRecord, GrantScope], bool],
    ) -> tuple[ConnectionRecord, Grant]:
        """The record and the grant, once the caller may use it for this call (nothing is decrypted
        yet); every
        refusal audited (and told to the monitor) before it is raised."""
        if bool(connection_id) == bool(name):
            raise InvalidArgument.field("ref", "exactly one of connection_id or name is required")
        for field_name, text, most in (
            ("connection_id", connection_id, MAX_REF),
            ("name", name, MAX_REF),
            ("purpose", purpose, MAX_PURPOSE),
        ):
            if len(text) > most or not text.isprintable():
                raise InvalidArgument.field(field_name, f"must be at most {most} printable characters")
        call_, now = use.call, use.now
        if purpose:
            use.details["purpose"] = purpose
        record = await (
            self._connections.get_connection(call_.tenant, connection_id)
            if connection_id
            else self._connections.find_connection_by_name(call_.tenant, name)
        )
        use.ref_id = record.id if record is not None else connection_id
        if name and record is None:
            use.details["name"] = name[:128]
        reason = self._denial_reason(call_, record, now)
        grant = None
        if not reason:
            assert record is not None
            grant = await self._grants.get_grant(call_.tenant, record.id, call_.actor)
            if grant is None:
                reason = "no_grant"
            elif not grant.active_at(now):
                reason = "grant_expired"
            elif not allows(record, grant.scope):
                reason = "out_of_scope"
        if reason:
            metrics.PROXY_CALLS.labels("denied", reason).inc()
            await self._audit.append(
                call_.audit_event(now, use.action, use.ref_id, Outcome.DENIED, reason, use.details)
            )
            if self._monitor is not None:
                self._monitor.resolve_denied(call_, use.ref_id, reason, now)
            if reason == "out_of_scope":
                raise PermissionDenied("the call is outside the grant's scope")
            raise PermissionDenied(DENIED_MESSAGE)
        assert record is not None and grant is not None
        return record, grant

    async def _open(self, use: _Use, record: ConnectionRecord) -> SecretFields:
        try:
            return open_secrets(self._keyring, record)
        except SecretUnavailable:
            metrics.PROXY_CALLS.labels("failed", DECRYPT_FAILED).inc()
            failed = Outcome.FAILED
            event = use.call.audit_event(use.now, use.action, use.ref_id, failed, DECRYPT_FAILED, use.details)
            await self._audit.append(event)
            raise

    def _denial_reason(self, call_: Call, record: ConnectionRecord | None, now: datetime) -> str:
        if self._monitor is not None and self._monitor.blocked(call_.tenant, call_.actor, now):
            return "principal_blocked"
        if record is None:
            return "unknown_connection"
        return refusal(record)

    async def _upstream_failed(self, use: _Use, exc: Exception, started: float) -> Exception:
        """Audit a call the upstream did not answer; what to tell the caller."""
        if isinstance(exc, InvalidArgument):
            return exc  # a request this connection does not take: nothing left the broker
        reason = _failure_reason(exc)
        await self._failed(use, reason, started)
        return _caller_error(exc, reason)

    @contextlib.asynccontextmanager
    async def _within(self, use: _Use, started: float, until: float | None) -> AsyncIterator[None]:
        """The upstream part of a call, bounded by the caller's deadline (`until`, see `_deadline`). A
        call cut short (the deadline, or the caller gone) is audited as failed: the upstream may
        have acted on it. Another timeout (the egress policy's) is raised as it is."""
        try:
            async with asyncio.timeout_at(until) as deadline:
                yield
        except TimeoutError:
            if not deadline.expired():
                raise
            await self._failed(use, "deadline_exceeded", started)
            raise DeadlineExceeded("the upstream did not answer before the call's deadline") from None
        except asyncio.CancelledError:
            # The append joins a group commit that a cancelled waiter does not stop.
            await self._failed(use, "cancelled", started)
            raise

    async def _failed(self, use: _Use, reason: str, started: float) -> None:
        use.details["latency_ms"] = str(int((time.monotonic() - started) * 1000))
        metrics.PROXY_CALLS.labels("failed", reason).inc()
        event = use.call.audit_event(use.now, use.action, use.ref_id, Outcome.FAILED, reason, use.details)
        await self._audit.append(event)

    async def _done(self, use: _Use, started: float) -> None:
        use.details["latency_ms"] = str(int((time.monotonic() - started) * 1000))
        event = use.call.audit_event(use.now, use.action, use.ref_id, Outcome.ALLOWED, "", use.details)
        await self._audit.append(event)
        metrics.PROXY_CALLS.labels("allowed", "").inc()
        if self._monitor is not None:
            self._monitor.resolve_allowed(use.call, use.ref_id, use.now)
        if self._note_used is not None:
            self._note_used(use.call.tenant, use.ref_id, use.now)


class _Target:
    """A connection opened for a call: its record, how its credential is injected, and the
    OAuth2 access token sent ("" for other types), which a 401 names as refused."""

    def __init__(self, record: ConnectionRecord, secrets: SecretFields) -> None:
        self.record = record
        self.injection = injection(record.type, record.provider, record.config, secrets)
        self.oauth_token = secrets.reveal().get("access_token", "") if record.type == "oauth2" else ""


class _Use:
    """One proxied call as the audit trail sees it: who, what, on which connection, and how it went."""

    def __init__(self, call_: Call, action: str, details: dict[str, str], now: datetime) -> None:
        self.call, self.action, self.details, self.now = call_, action, details, now
        self.ref_id = ""


def _also_scrubbing(secrets: SecretFields, refused: str) -> SecretFields:
    """`secrets` for a retry after a 401, with the refused token among the values its answer is
    scrubbed of: that token was sent and may still be good (a hostile upstream can refuse a good
    token to be sent a second one). It is never sent again."""
    return SecretFields({**secrets.reveal(), "rejected_access_token": refused})


def _refused_before_the_session(failure: TestFailure) -> bool:
    """The MCP server answered 401 before the session was initialized: no tool was called."""
    return (
        failure.result.category is TestCategory.AUTH_FAILED and failure.result.stage is TestStage.AUTHENTICATE
    )


def _deadline(time_left: float | None) -> float | None:
    """When (event loop time) the upstream part of a call with `time_left` seconds must stop;
    None: no deadline."""
    if time_left is None:
        return None
    return asyncio.get_running_loop().time() + max(time_left - DEADLINE_MARGIN, 0.0)


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, Blocked | InvalidTarget):
        return "egress_blocked"
    if isinstance(exc, DnsFailure):
        return "dns_failed"
    if isinstance(exc, httpx.PoolTimeout):  # before its base class: nothing was sent upstream
        return "upstream_pool_full"
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "upstream_timeout"
    if isinstance(exc, AnswerTooLarge):
        return "answer_too_large"
    if isinstance(exc, UnreadableAnswer):
        return "answer_unreadable"
    if isinstance(exc, NotInjectable):
        return "not_injectable"
    return "upstream_unreachable"


def _caller_error(exc: BaseException, reason: str) -> BrokerError:
    """What the executor is told: the kind of failure, never the upstream's own words."""
    if isinstance(exc, FailedPrecondition):
        return exc
    if reason == "egress_blocked":
        return FailedPrecondition("the egress policy does not allow this connection's address")
    if reason == "upstream_pool_full":
        return Unavailable("every connection the broker keeps to upstreams is in use; retry later")
    if reason == "upstream_timeout":
        return Unavailable("the upstream did not answer in time")
    if reason == "dns_failed":
        return Unavailable("the upstream's host name could not be resolved")
    return Unavailable("the upstream could not be reached")
