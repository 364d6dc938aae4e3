"""One interceptor for every broker RPC: request id, identity, role, rate limit, logging, errors.

It authenticates the caller from the peer certificate, checks the role the
service requires (a valid certificate used with the wrong role is reported to
`on_wrong_role`, which audits it), takes a rate-limit token for the method's class
(`broker.api.ratelimit`), makes the `Call` available to the servicer, and translates
a `BrokerError` into its status in exactly one place. Unexpected exceptions become
INTERNAL with the request id and nothing else: no stack trace or driver message
reaches a caller.

The per-call code is plain straight-line code in one coroutine (no async context
manager, no second interceptor layer): it runs on every Resolve, and each layer was
measurable (docs/PERFORMANCE.md, "Issue 15: CPU").
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import structlog
from google.rpc import code_pb2, error_details_pb2, status_pb2

from broker import log as broker_log
from broker import metrics
from broker.api import convert
from broker.api.handlers import Stream, Unary, wrap_handler
from broker.api.identity import principal_from_context
from broker.api.ratelimit import CLASSES
from broker.errors import (
    BrokerError,
    ConnectionTestFailed,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from broker.model import Role
from broker.service import Call, RateLimits

log = structlog.get_logger("broker.api")

_CURRENT_CALL: contextvars.ContextVar[Call] = contextvars.ContextVar("broker_call")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_REQUEST_ID_KEY = "x-request-id"


def current_call() -> Call:
    """The authenticated call being served (set by the interceptor)."""
    return _CURRENT_CALL.get()


def _reset(var: contextvars.ContextVar[Any], token: contextvars.Token[Any]) -> None:
    """Reset quietly: a stream closed later by the event loop runs in another context."""
    with contextlib.suppress(ValueError):
        var.reset(token)


class RequestIds:
    """Request ids: a per-process random prefix and a counter, e.g. `9f3c0a1b2d4e5f60-1a`.

    Unique within the process by the counter and across processes (replicas, `--workers`) by
    the 64-bit prefix, which a forked child draws anew. Cheaper than `uuid4` per call, and an id
    says which process served the call. Not a secret and not meant to be unguessable.
    """

    def __init__(self) -> None:
        self._renew()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self.prefix = secrets.token_hex(8) + "-"
        self._next = itertools.count(1).__next__

    def __call__(self) -> str:
        return self.prefix + format(self._next(), "x")


new_request_id = RequestIds()


def _request_id(metadata: Any) -> str:
    """The caller's `x-request-id` when it is a sane token, else a new one."""
    for key, value in metadata or ():
        if key == _REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return new_request_id()


def _abort_args(error: BrokerError, request_id: str) -> tuple[Any, str, tuple[tuple[str, Any], ...]]:
    code = getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)
    trailers: list[tuple[str, Any]] = [(_REQUEST_ID_KEY, request_id)]
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.shown
            ]
        )
        status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=error.message)
        status.details.add().Pack(bad_request)
        trailers.append((_STATUS_DETAILS_KEY, status.SerializeToString()))
    elif isinstance(error, ResourceExhausted) and error.retry_after > 0:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromTimedelta(timedelta(seconds=error.retry_after))
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=error.message)
        status.details.add().Pack(retry)
        trailers.append((_STATUS_DETAILS_KEY, status.SerializeToString()))
    elif isinstance(error, ConnectionTestFailed):
        status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=error.message)
        status.details.add().Pack(convert.test_result(error.result))
        trailers.append((_STATUS_DETAILS_KEY, status.SerializeToString()))
    return code, error.message, tuple(trailers)


class _Malformed:
    """What the request deserializer yields for bytes that are not the method's message."""


_MALFORMED = _Malformed()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning `_MALFORMED` instead of raising.

    gRPC calls the deserializer before any interceptor code runs, so a decode error would end
    the call as UNKNOWN, unauthenticated and unaudited; as a marker it reaches the guard,
    which checks the caller first and then refuses the request as INVALID_ARGUMENT.
    """
    if deserializer is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # DecodeError, a recursion limit, invalid UTF-8: all the same to a caller
            return _MALFORMED

    return decode


# Told of a call refused because the caller's role does not match the service: the caller is
# known (a valid certificate of this trust domain), so the refusal can be audited for its tenant.
WrongRoleHook = Callable[[Call, str], Awaitable[None]]


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps the unary and server-streaming handlers of the services in `roles` (service -> role).

    With `limits`, a call of a rate-limited method (`broker.api.ratelimit.CLASSES`) takes a token
    for its caller once the caller is authenticated, before the servicer runs.
    """

    def __init__(
        self,
        trust_domain: str,
        roles: Mapping[str, Role],
        on_wrong_role: WrongRoleHook | None = None,
        limits: RateLimits | None = None,
    ) -> None:
        self._trust_domain = trust_domain
        self._roles = dict(roles)
        self._on_wrong_role = on_wrong_role
        self._limits = limits

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        # Runs once per method of a listener: its DrainGate caches the wrapped chain (api/drain.py).
        handler = await continuation(details)
        service = details.method.split("/")[1] if details.method.count("/") == 2 else ""
        role = self._roles.get(service)
        if handler is None or role is None:
            return handler  # health checking and reflection: the TLS layer already required a client cert
        kind = CLASSES.get(details.method.rpartition("/")[2], "")
        limits = self._limits if kind else None
        guard = _Guard(self._trust_domain, role, details.method, self._on_wrong_role, limits, kind)
        # A kind of handler nobody wraps is UNIMPLEMENTED (None), never unauthenticated.
        return wrap_handler(handler, guard, _tolerant)


def _metric_names(method: str) -> tuple[str, str]:
    """("AdminService", "CreateConnection") for "/broker.v1.AdminService/CreateConnection"."""
    return method.split("/")[1].rpartition(".")[2], method.rpartition("/")[2]


# Labelled children looked up once per (method, code), not per call; both sets are fixed.
@functools.lru_cache(maxsize=2048)
def _rpc_counter(method: str, code: str) -> Any:
    return metrics.RPCS.labels(*_metric_names(method), code)


@functools.lru_cache(maxsize=256)
def _rpc_seconds(method: str) -> Any:
    return metrics.RPC_SECONDS.labels(*_metric_names(method))


@functools.lru_cache(maxsize=256)
def _malformed_counter(method: str) -> Any:
    return metrics.MALFORMED_REQUESTS.labels(*_metric_names(method))


def _outcome(exc: BaseException, request_id: str) -> tuple[str, tuple[Any, str, Any] | None]:
    """The status a failed call ends with, and how to abort it; no abort: re-raise `exc`."""
    if isinstance(exc, BrokerError):
        return exc.status, _abort_args(exc, request_id)
    if isinstance(exc, grpc.aio.AbortError):
        return "OK", None  # the call was already aborted with its own status
    if isinstance(exc, Exception):
        log.exception("unexpected_error", error_type=type(exc).__name__)
        internal = f"internal error (request id {request_id})"
        return "INTERNAL", (grpc.StatusCode.INTERNAL, internal, ((_REQUEST_ID_KEY, request_id),))
    return "CANCELLED", None  # cancelled, or a stream the client abandoned (GeneratorExit)


@dataclass(frozen=True)
class _Guard:
    """The one code path for every wrapped call: identity, role, rate limit, the `Call`, logs,
    metrics, errors.

    A request that did not decode is refused only once the caller is known and allowed, so it is
    authenticated (and a wrong role audited) like any other call.

    The peer is read once, at the start: a stream the client abandoned is closed later by the
    event loop, in another context, when the call is gone, and asking its context for the peer
    then crashes gRPC (a segfault, found by the fuzz test). For the same reason the context
    variables are reset quietly: a reset cannot apply in another context.
    """

    trust_domain: str
    role: Role
    method: str
    on_wrong_role: WrongRoleHook | None = None
    limits: RateLimits | None = None
    kind: str = ""

    def unary(self, behaviour: Unary) -> Unary:
        limits, kind = self.limits, self.kind

        async def guarded(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            request_id = _request_id(context.invocation_metadata())
            peer = context.peer()
            bound = broker_log.bind_call(request_id, self.method)
            caller = ""
            try:
                call = self._call(context, request_id, peer)
                caller = call.actor
                if call.principal.role is not self.role or request is _MALFORMED:
                    await self._refuse(call, request)
                if limits is not None and (ended := await limits.enforce(call, kind)) is not None:
                    context.add_done_callback(lambda _: ended())  # once gRPC has ended the call
                token = _CURRENT_CALL.set(call)
                try:
                    response = await behaviour(request, context)
                finally:
                    _reset(_CURRENT_CALL, token)
                context.set_trailing_metadata(((_REQUEST_ID_KEY, request_id),))
            except BaseException as exc:
                outcome, abort = _outcome(exc, request_id)
                self._finish(outcome, started, caller, peer, bound)
                if abort is None:
                    raise
            else:
                self._finish("OK", started, caller, peer, bound)
                return response
            await context.abort(abort[0], abort[1], trailing_metadata=abort[2])
            raise AssertionError("unreachable: abort() raises")

        return guarded

    def stream(self, behaviour: Stream) -> Stream:
        limits, kind = self.limits, self.kind

        async def guarded(request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            request_id = _request_id(context.invocation_metadata())
            peer = context.peer()
            bound = broker_log.bind_call(request_id, self.method)
            caller = ""
            try:
                call = self._call(context, request_id, peer)
                caller = call.actor
                if call.principal.role is not self.role or request is _MALFORMED:
                    await self._refuse(call, request)
                if limits is not None and (ended := await limits.enforce(call, kind)) is not None:
                    context.add_done_callback(lambda _: ended())  # once gRPC has ended the call
                token = _CURRENT_CALL.set(call)
                try:
                    async for response in behaviour(request, context):
                        yield response
                finally:
                    _reset(_CURRENT_CALL, token)
                context.set_trailing_metadata(((_REQUEST_ID_KEY, request_id),))
            except BaseException as exc:
                outcome, abort = _outcome(exc, request_id)
                self._finish(outcome, started, caller, peer, bound)
                if abort is None:
                    raise
            else:
                self._finish("OK", started, caller, peer, bound)
                return
            await context.abort(abort[0], abort[1], trailing_metadata=abort[2])

        return guarded

    def _call(self, context: Any, request_id: str, peer: str) -> Call:
        return Call(principal_from_context(context, self.trust_domain), request_id, peer)

    async def _refuse(self, call: Call, request: Any) -> None:
        """Raise for a caller of the wrong role (audited) or a request that did not decode."""
        if call.principal.role is not self.role:
            await self._wrong_role(call)
            raise PermissionDenied(f"this call requires the {self.role.value} role")
        self._malformed()

    def _finish(self, outcome: str, started: float, caller: str, peer: str, bound: Any) -> None:
        """Count the call, log it (every failure; a success at debug only), unbind its log context."""
        elapsed = time.perf_counter() - started
        _rpc_counter(self.method, outcome).inc()
        _rpc_seconds(self.method).observe(elapsed)
        # A line per successful call at debug only, and its arguments not even built otherwise:
        # rendering it on every call cost ~10% of Resolve throughput (docs/PERFORMANCE.md).
        # Failures keep theirs, request id included.
        if outcome != "OK":
            log.info("rpc", status=outcome, ms=round(elapsed * 1000, 2), principal=caller, peer=peer)
        elif broker_log.debug_enabled():
            log.debug("rpc", status=outcome, ms=round(elapsed * 1000, 2), principal=caller, peer=peer)
        broker_log.unbind_call(bound)

    def _malformed(self) -> None:
        # One line, no traceback: the bytes are the caller's problem, and may hold anything.
        log.warning("malformed_request")
        _malformed_counter(self.method).inc()
        raise InvalidArgument.field("request", "malformed request: not a valid message for this method")

    async def _wrong_role(self, call: Call) -> None:
        if self.on_wrong_role is None:
            return
        try:
            await self.on_wrong_role(call, self.method)
        except Exception as exc:  # the refusal stands whether or not it could be recorded
            log.warning("wrong_role_audit_failed", error_type=type(exc).__name__)
