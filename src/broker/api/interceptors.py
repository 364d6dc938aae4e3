"""One interceptor for every broker RPC: request id, identity, role, logging, errors.

It authenticates the caller from the peer certificate, checks the role the
service requires (a valid certificate used with the wrong role is reported to
`on_wrong_role`, which audits it), makes the `Call` available to the servicer,
and translates a `BrokerError` into its status in exactly one place. Unexpected exceptions
become INTERNAL with the request id and nothing else: no stack trace or driver
message reaches a caller.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import structlog
from google.rpc import code_pb2, error_details_pb2, status_pb2

from broker import metrics
from broker.api import convert
from broker.api.handlers import Stream, Unary, wrap_handler
from broker.api.identity import principal_from_context
from broker.errors import (
    BrokerError,
    ConnectionTestFailed,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from broker.model import Role
from broker.service.context import Call

log = structlog.get_logger("broker.api")

_CURRENT_CALL: contextvars.ContextVar[Call] = contextvars.ContextVar("broker_call")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def current_call() -> Call:
    """The authenticated call being served (set by the interceptor)."""
    return _CURRENT_CALL.get()


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _abort_args(error: BrokerError, request_id: str) -> tuple[Any, str, tuple[tuple[str, Any], ...]]:
    code = getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)
    trailers: list[tuple[str, Any]] = [("x-request-id", request_id)]
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
    """Wraps the unary and server-streaming handlers of the services in `roles` (service -> role)."""

    def __init__(
        self, trust_domain: str, roles: Mapping[str, Role], on_wrong_role: WrongRoleHook | None = None
    ) -> None:
        self._trust_domain = trust_domain
        self._roles = dict(roles)
        self._on_wrong_role = on_wrong_role

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        service = details.method.split("/")[1] if details.method.count("/") == 2 else ""
        role = self._roles.get(service)
        if handler is None or role is None:
            return handler  # health checking and reflection: the TLS layer already required a client cert
        guard = _Guard(self._trust_domain, role, details.method, self._on_wrong_role)
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


@dataclass(frozen=True)
class _Guard:
    """The one code path for every wrapped call: identity, role, the `Call`, logs, metrics, errors."""

    trust_domain: str
    role: Role
    method: str
    on_wrong_role: WrongRoleHook | None = None

    def unary(self, behaviour: Unary) -> Unary:
        async def guarded(request: Any, context: Any) -> Any:
            async with self.serving(context, request):
                return await behaviour(request, context)
            raise AssertionError("unreachable: serving() aborts the call on every error")

        return guarded

    def stream(self, behaviour: Stream) -> Stream:
        async def guarded(request: Any, context: Any) -> AsyncIterator[Any]:
            async with self.serving(context, request):
                async for response in behaviour(request, context):
                    yield response

        return guarded

    @contextlib.asynccontextmanager
    async def serving(self, context: Any, request: Any) -> AsyncIterator[None]:
        """Run the body as the authenticated caller; any error ends the call with its status.

        A request that did not decode is refused only once the caller is known and allowed,
        so it is authenticated (and a wrong role audited) like any other call.

        The context variables are reset quietly: a stream the client abandoned is closed
        later by the event loop, in another context, where a reset cannot apply. By then the
        call is gone too, and asking its context for the peer crashes gRPC (a segfault, found
        by the fuzz test), so the peer is read once, here.
        """
        request_id = _request_id(context.invocation_metadata())
        peer = context.peer()
        started = time.perf_counter()
        outcome = "OK"
        caller = ""
        bound = structlog.contextvars.bind_contextvars(request_id=request_id, method=self.method)
        try:
            principal = principal_from_context(context, self.trust_domain)
            caller = principal.spiffe_id
            call = Call(principal, request_id, peer)
            if principal.role is not self.role:
                await self._wrong_role(call)
                raise PermissionDenied(f"this call requires the {self.role.value} role")
            if request is _MALFORMED:
                self._malformed()
            token = _CURRENT_CALL.set(call)
            try:
                yield
            finally:
                with contextlib.suppress(ValueError):
                    _CURRENT_CALL.reset(token)
            context.set_trailing_metadata((("x-request-id", request_id),))
            return
        except BrokerError as error:
            outcome = error.status
            abort = _abort_args(error, request_id)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            outcome = "INTERNAL"
            log.exception("unexpected_error", error_type=type(exc).__name__)
            abort = (
                grpc.StatusCode.INTERNAL,
                f"internal error (request id {request_id})",
                (("x-request-id", request_id),),
            )
        except BaseException:
            outcome = "CANCELLED"
            raise
        finally:
            elapsed = time.perf_counter() - started
            _rpc_counter(self.method, outcome).inc()
            _rpc_seconds(self.method).observe(elapsed)
            # A line per successful call at debug only: JSON-rendering it on every call cost ~10%
            # of Resolve throughput (docs/PERFORMANCE.md). Failures keep theirs, request id included.
            emit = log.debug if outcome == "OK" else log.info
            emit("rpc", status=outcome, ms=round(elapsed * 1000, 2), principal=caller, peer=peer)
            with contextlib.suppress(ValueError):
                structlog.contextvars.reset_contextvars(**bound)
        await context.abort(abort[0], abort[1], trailing_metadata=abort[2])

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
