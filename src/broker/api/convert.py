"""Proto <-> domain conversion. The admin `Connection` is built here from the record,
which holds no secret values, so redaction is a property of the types."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from broker import catalog
from broker._proto import broker_pb2 as pb
from broker.errors import FieldViolation, InvalidArgument
from broker.model import (
    AuditEvent,
    ConnectionRecord,
    ConnectionStatus,
    Grant,
    GrantMode,
    GrantScope,
    Lease,
    LeaseState,
    McpTool,
    ReauthReason,
    SecurityEvent,
    TestCategory,
    TestResult,
    TestStage,
    TestStatus,
)

_STATUS_TO_PB = {
    ConnectionStatus.ACTIVE: pb.CONNECTION_STATUS_ACTIVE,
    ConnectionStatus.REVOKED: pb.CONNECTION_STATUS_REVOKED,
    ConnectionStatus.DELETED: pb.CONNECTION_STATUS_DELETED,
    ConnectionStatus.EXPIRED: pb.CONNECTION_STATUS_EXPIRED,
    ConnectionStatus.SUSPENDED: pb.CONNECTION_STATUS_SUSPENDED,
}
_STATUS_FROM_PB: dict[int, ConnectionStatus] = {int(v): k for k, v in _STATUS_TO_PB.items()}

_Enum = TypeVar("_Enum", bound=enum.Enum)


def _enum_filter(value: int, known: Mapping[int, _Enum], field: str, kind: str) -> _Enum | None:
    """A request's enum filter: UNSPECIFIED (0) is none, an unknown number is INVALID_ARGUMENT (read as
    UNSPECIFIED it would list what the caller did not ask for)."""
    if value == 0:
        return None
    found = known.get(value)
    if found is None:
        raise InvalidArgument.field(field, f"is not a {kind}")
    return found


def connection_status(value: int) -> ConnectionStatus | None:
    """A request's status filter; UNSPECIFIED is the default listing."""
    return _enum_filter(value, _STATUS_FROM_PB, "status", "ConnectionStatus")


_TEST_STATUS_TO_PB = {
    TestStatus.UNTESTED: pb.TEST_STATUS_UNTESTED,
    TestStatus.SUCCESS: pb.TEST_STATUS_SUCCESS,
    TestStatus.FAILED: pb.TEST_STATUS_FAILED,
}
_CATEGORY_TO_PB: dict[TestCategory, pb.TestCategory] = {
    c: getattr(pb, f"TEST_CATEGORY_{c.name}") for c in TestCategory
}
_STAGE_TO_PB: dict[TestStage, pb.TestStage] = {s: getattr(pb, f"TEST_STAGE_{s.name}") for s in TestStage}
_KIND_TO_PB: dict[catalog.FieldKind, pb.FieldKind] = {
    kind: getattr(pb, f"FIELD_KIND_{kind.name}") for kind in catalog.FieldKind
}


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def from_timestamp(message: Any, field: str) -> datetime | None:
    """The datetime in `message.<field>` when it is set."""
    if not message.HasField(field):
        return None
    ts: timestamp_pb2.Timestamp = getattr(message, field)
    if not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument.field(field, "is not a valid timestamp")
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument.field(field, "is not a valid timestamp") from None


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


# A Struct carries every number as a double, which holds each integer exactly only up to 2**53 - 1
# (JavaScript's Number.MAX_SAFE_INTEGER): 2**53 + 1 arrives as 2**53. Past that bound a request's
# number may not be the one the caller wrote, so it is refused rather than silently changed.
MAX_EXACT_NUMBER = 2**53 - 1
_NOT_FINITE = "must be a finite number, not NaN or Infinity"
_NOT_EXACT = (
    f"must be a number between -{MAX_EXACT_NUMBER} and {MAX_EXACT_NUMBER} (2^53 - 1): a larger one"
    " cannot arrive exactly; send a large id as a string"
)


def from_struct(message: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """The Struct in request field `field` as plain values; a number that is NaN, Infinity or
    beyond +-(2**53 - 1) (so maybe not the one sent) is INVALID_ARGUMENT.

    Each one found is named by its path (`config.port`, `config.headers[2]`); nothing is stored
    or sent anywhere with a number the caller did not write.
    """
    bad: list[FieldViolation] = []
    values = _from_fields(message, field, bad)
    if bad:
        raise InvalidArgument(bad)
    return values


def _from_fields(message: struct_pb2.Struct, path: str, bad: list[FieldViolation]) -> dict[str, Any]:
    # A key that is not even a plausible field name may be a pasted secret: not quoted in a path.
    return {
        key: _from_value(value, f"{path}.{key}" if catalog.FIELD_NAME.fullmatch(key) else path, bad)
        for key, value in message.fields.items()
    }


def _from_value(value: struct_pb2.Value, path: str, bad: list[FieldViolation]) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            bad.append(FieldViolation(path, _NOT_FINITE))
        elif abs(number) > MAX_EXACT_NUMBER:
            bad.append(FieldViolation(path, _NOT_EXACT))
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _from_fields(value.struct_value, path, bad)
    if kind == "list_value":
        return [_from_value(item, f"{path}[{i}]", bad) for i, item in enumerate(value.list_value.values)]
    return None  # null_value, or a Value with no kind set (as MessageToDict reads it)


def test_result(result: TestResult) -> pb.TestResult:
    return pb.TestResult(
        success=result.success,
        latency_ms=result.latency_ms,
        category=_CATEGORY_TO_PB[result.category],
        stage=_STAGE_TO_PB[result.stage],
        message=result.message,
        details=result.details,
        verified=list(result.verified),
        not_verified=list(result.not_verified),
        tested_at=timestamp(result.tested_at),
    )


def mcp_tool(tool: McpTool) -> pb.McpTool:
    message = pb.McpTool(
        name=tool.name,
        description=tool.description,
        input_schema=struct(tool.input_schema),
        definition_hash=tool.definition_hash,
        title=tool.title,
        task_support=tool.task_support,
        not_callable=tool.not_callable,
    )
    if tool.annotations is not None:
        message.annotations.CopyFrom(_annotations(tool.annotations))
    if tool.output_schema is not None:
        message.output_schema.CopyFrom(struct(tool.output_schema))
    return message


# MCP's annotation keys and their fields in `McpToolAnnotations`.
_HINTS = {
    "readOnlyHint": "read_only_hint",
    "destructiveHint": "destructive_hint",
    "idempotentHint": "idempotent_hint",
    "openWorldHint": "open_world_hint",
}


def _annotations(stored: dict[str, Any]) -> pb.McpToolAnnotations:
    """The stored hints; a hint that is not a boolean (the SDK admits none) is left unset."""
    title = stored.get("title")
    message = pb.McpToolAnnotations(title=title if isinstance(title, str) else "")
    for key, field in _HINTS.items():
        value = stored.get(key)
        if isinstance(value, bool):
            setattr(message, field, value)
    return message


def connection(record: ConnectionRecord, stale: bool = False) -> pb.Connection:
    """The redacted summary: names of secret fields, never their values."""
    return pb.Connection(
        id=record.id,
        name=record.name,
        type=record.type,
        provider=record.provider,
        config=struct(record.config),
        secret_fields=list(record.secret_fields),
        labels=record.labels,
        status=_STATUS_TO_PB[record.presented_status],
        etag=record.etag,
        created_at=timestamp(record.created_at),
        updated_at=timestamp(record.updated_at),
        last_used_at=timestamp(record.last_used_at),
        last_tested_at=timestamp(record.last_tested_at),
        test_status=_TEST_STATUS_TO_PB[record.test_status],
        deleted_at=timestamp(record.deleted_at),
        last_test=test_result(record.last_test) if record.last_test is not None else None,
        stale=stale,
        reauthorization=reauthorization(record),
    )


def reauthorization(record: ConnectionRecord) -> pb.Reauthorization | None:
    """Why the connection is EXPIRED and since when; None while it needs no re-authorization."""
    if record.reauth_required_at is None:
        return None
    why = record.reauth_reason or ReauthReason("unrecorded")  # expired before reasons were kept
    return pb.Reauthorization(
        reason=why.reason,
        error=why.error,
        description=why.description,
        since=timestamp(record.reauth_required_at),
    )


_GRANT_MODE_TO_PB = {GrantMode.RESOLVE: pb.GRANT_MODE_RESOLVE, GrantMode.PROXY: pb.GRANT_MODE_PROXY}
_GRANT_MODE_FROM_PB: dict[int, GrantMode] = {int(v): k for k, v in _GRANT_MODE_TO_PB.items()}
_GRANT_MODE_FROM_PB[pb.GRANT_MODE_UNSPECIFIED] = GrantMode.RESOLVE


def grant(value: Grant) -> pb.Grant:
    scope = value.scope
    return pb.Grant(
        connection_id=value.connection_id,
        principal=value.principal,
        expires_at=timestamp(value.expires_at),
        created_at=timestamp(value.created_at),
        created_by=value.created_by,
        mode=_GRANT_MODE_TO_PB[value.mode],
        scope=pb.GrantScope(methods=scope.methods, path_prefixes=scope.path_prefixes, tools=scope.tools),
    )


_LEASE_STATE_TO_PB = {
    LeaseState.CREATING: pb.LEASE_STATE_CREATING,
    LeaseState.ACTIVE: pb.LEASE_STATE_ACTIVE,
    LeaseState.REVOKING: pb.LEASE_STATE_REVOKING,
    LeaseState.REVOKED: pb.LEASE_STATE_REVOKED,
}
_LEASE_STATE_FROM_PB: dict[int, LeaseState] = {int(n): state for state, n in _LEASE_STATE_TO_PB.items()}


def lease(value: Lease) -> pb.Lease:
    return pb.Lease(
        id=value.id,
        connection_id=value.connection_id,
        principal=value.principal,
        username=value.username,
        state=_LEASE_STATE_TO_PB[value.state],
        created_at=timestamp(value.created_at),
        expires_at=timestamp(value.expires_at),
        max_expires_at=timestamp(value.max_expires_at),
        run_id=value.run_id,
        revoke_reason=value.revoke_reason,
        revocation_attempts=value.attempts,
        last_error=value.last_error,
        next_attempt_at=timestamp(value.next_attempt_at if value.state is LeaseState.REVOKING else None),
        revoked_at=timestamp(value.revoked_at),
    )


def lease_state(value: int) -> LeaseState | None:
    """A request's lease state filter; UNSPECIFIED is any."""
    return _enum_filter(value, _LEASE_STATE_FROM_PB, "state", "LeaseState")


def grant_mode(value: int) -> GrantMode:
    """A request's mode; UNSPECIFIED is RESOLVE, an unknown number is INVALID_ARGUMENT."""
    mode = _GRANT_MODE_FROM_PB.get(value)
    if mode is None:
        raise InvalidArgument.field("mode", "must be GRANT_MODE_RESOLVE or GRANT_MODE_PROXY")
    return mode


def grant_scope(value: pb.GrantScope) -> GrantScope:
    return GrantScope(tuple(value.methods), tuple(value.path_prefixes), tuple(value.tools))


def audit_event(event: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        id=event.id,
        time=timestamp(event.time),
        actor=event.actor,
        action=event.action,
        connection_id=event.connection_id,
        outcome=event.outcome.value,
        reason=event.reason,
        request_id=event.request_id,
        peer=event.peer,
        details=event.details,
        hash=event.hash,
        prev_hash=event.prev_hash,
    )


def security_event(event: SecurityEvent) -> pb.SecurityEvent:
    return pb.SecurityEvent(
        id=event.id,
        time=timestamp(event.time),
        rule=event.rule,
        severity=event.severity,
        principal=event.principal,
        connection_id=event.connection_id,
        peer=event.peer,
        action=event.action,
        details=event.details,
    )


def connection_type(value: catalog.ConnectionType) -> pb.ConnectionType:
    fields = []
    for spec in value.fields:
        field = pb.FieldSpec(
            name=spec.name,
            kind=_KIND_TO_PB[spec.kind],
            secret=spec.secret,
            withheld=spec.withheld,
            required=spec.required,
            choices=list(spec.choices),
            description=spec.description,
        )
        if spec.default is not None:
            json_format.ParseDict(spec.default, field.default_value)
        fields.append(field)
    return pb.ConnectionType(
        name=value.name, description=value.description, fields=fields, providers=list(value.providers)
    )
