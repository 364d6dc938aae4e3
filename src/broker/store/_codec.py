"""Records to SQL parameters and rows back to records, for the SQL backends.

Times are INTEGER microseconds since the epoch (UTC); dicts are JSON text with
sorted keys. Nothing here formats a value into an error message.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from broker.crypto.envelope import Sealed
from broker.model import (
    AuditEvent,
    AuditSeal,
    ConnectionRecord,
    ConnectionStatus,
    Grant,
    McpTool,
    Outcome,
    PendingAuthorization,
    SecurityEvent,
    SeenFact,
    TestCategory,
    TestResult,
    TestStage,
    TestStatus,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Row(Protocol):
    """A result row addressable by column name (sqlite3.Row, asyncpg.Record)."""

    def __getitem__(self, key: str, /) -> Any: ...


def to_micros(value: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is a programming error."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("the store needs timezone-aware datetimes")
    return (value - _EPOCH) // _MICROSECOND


def to_micros_or_none(value: datetime | None) -> int | None:
    return None if value is None else to_micros(value)


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


def from_micros_or_none(value: int | None) -> datetime | None:
    return None if value is None else from_micros(value)


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# Column order shared by INSERT and UPDATE; `tenant` and `id` come first.
CONNECTION_COLUMNS = (
    "tenant",
    "id",
    "name",
    "type",
    "provider",
    "config",
    "secret_fields",
    "labels",
    "status",
    "version",
    "secret_version",
    "ciphertext",
    "wrapped_dek",
    "kek_id",
    "created_at",
    "updated_at",
    "created_by",
    "deleted_at",
    "purged_at",
    "last_used_at",
    "last_tested_at",
    "test_status",
    "last_test",
    "reauth_required_at",
    "secret_expires_at",
    "suspended_at",
)
# Test results are written out of band (`record_test_result`), never by a replace.
TEST_COLUMNS = ("last_tested_at", "test_status", "last_test")


def connection_params(record: ConnectionRecord) -> tuple[Any, ...]:
    """Values in `CONNECTION_COLUMNS` order."""
    sealed = record.sealed
    return (
        record.tenant,
        record.id,
        record.name,
        record.type,
        record.provider,
        to_json(record.config),
        to_json(list(record.secret_fields)),
        to_json(record.labels),
        record.status.value,
        record.version,
        record.secret_version,
        None if sealed is None else sealed.ciphertext,
        None if sealed is None else sealed.wrapped_dek,
        None if sealed is None else sealed.kek_id,
        to_micros(record.created_at),
        to_micros(record.updated_at),
        record.created_by,
        to_micros_or_none(record.deleted_at),
        to_micros_or_none(record.purged_at),
        to_micros_or_none(record.last_used_at),
        to_micros_or_none(record.last_tested_at),
        record.test_status.value,
        None if record.last_test is None else to_json(test_result_to_doc(record.last_test)),
        to_micros_or_none(record.reauth_required_at),
        # Derived, for the background refresher's scan; read back through `token_expires_at`.
        to_micros_or_none(record.token_expires_at),
        to_micros_or_none(record.suspended_at),
    )


def _blob(value: Any) -> bytes:
    # A sealed column written with another SQL type behind the broker's back (TEXT,
    # INTEGER) reads as no bytes, which never opens: the caller sees decrypt_failed,
    # not a TypeError (nor `bytes(<huge int>)` allocating that many zero bytes).
    return bytes(value) if isinstance(value, bytes | bytearray | memoryview) else b""


def sealed_from_row(row: Row) -> Sealed:
    """The sealed columns (ciphertext, wrapped_dek, kek_id) of a row, whatever SQL types they hold."""
    kek_id = row["kek_id"]
    return Sealed(
        _blob(row["ciphertext"]), _blob(row["wrapped_dek"]), kek_id if isinstance(kek_id, str) else ""
    )


def connection_from_row(row: Row) -> ConnectionRecord:
    # A purge clears all three sealed columns; NULL in only some of them is tampering.
    purged = all(row[c] is None for c in ("ciphertext", "wrapped_dek", "kek_id"))
    sealed = None if purged else sealed_from_row(row)
    return ConnectionRecord(
        id=row["id"],
        tenant=row["tenant"],
        name=row["name"],
        type=row["type"],
        provider=row["provider"],
        config=json.loads(row["config"]),
        secret_fields=tuple(json.loads(row["secret_fields"])),
        labels=json.loads(row["labels"]),
        status=ConnectionStatus(row["status"]),
        version=row["version"],
        secret_version=row["secret_version"],
        sealed=sealed,
        created_at=from_micros(row["created_at"]),
        updated_at=from_micros(row["updated_at"]),
        created_by=row["created_by"],
        deleted_at=from_micros_or_none(row["deleted_at"]),
        purged_at=from_micros_or_none(row["purged_at"]),
        last_used_at=from_micros_or_none(row["last_used_at"]),
        last_tested_at=from_micros_or_none(row["last_tested_at"]),
        test_status=TestStatus(row["test_status"]),
        last_test=None if row["last_test"] is None else test_result_from_doc(json.loads(row["last_test"])),
        reauth_required_at=from_micros_or_none(row["reauth_required_at"]),
        suspended_at=from_micros_or_none(row["suspended_at"]),
    )


def test_result_to_doc(result: TestResult) -> dict[str, Any]:
    return {
        "success": result.success,
        "category": result.category.value,
        "stage": result.stage.value,
        "message": result.message,
        "details": result.details,
        "verified": list(result.verified),
        "not_verified": list(result.not_verified),
        "latency_ms": result.latency_ms,
        "tested_at": to_micros_or_none(result.tested_at),
    }


def test_result_from_doc(doc: dict[str, Any]) -> TestResult:
    return TestResult(
        success=bool(doc["success"]),
        category=TestCategory(doc["category"]),
        stage=TestStage(doc["stage"]),
        message=doc["message"],
        details=dict(doc["details"]),
        verified=tuple(doc["verified"]),
        not_verified=tuple(doc["not_verified"]),
        latency_ms=int(doc["latency_ms"]),
        tested_at=from_micros_or_none(doc["tested_at"]),
    )


def mcp_tool_params(
    tenant: str, connection_id: str, tool: McpTool, discovered_at: datetime
) -> tuple[Any, ...]:
    return (
        tenant,
        connection_id,
        tool.name,
        tool.description,
        to_json(tool.input_schema),
        tool.definition_hash,
        to_micros(discovered_at),
    )


def mcp_tool_from_row(row: Row) -> McpTool:
    return McpTool(
        name=row["name"],
        description=row["description"],
        input_schema=json.loads(row["input_schema"]),
        definition_hash=row["definition_hash"],
    )


GRANT_COLUMNS = ("tenant", "connection_id", "principal", "created_at", "created_by", "expires_at")


def grant_params(grant: Grant) -> tuple[Any, ...]:
    return (
        grant.tenant,
        grant.connection_id,
        grant.principal,
        to_micros(grant.created_at),
        grant.created_by,
        to_micros_or_none(grant.expires_at),
    )


def grant_from_row(row: Row) -> Grant:
    return Grant(
        tenant=row["tenant"],
        connection_id=row["connection_id"],
        principal=row["principal"],
        created_at=from_micros(row["created_at"]),
        created_by=row["created_by"],
        expires_at=from_micros_or_none(row["expires_at"]),
    )


# `id` is assigned by the database and left out.
AUDIT_COLUMNS = (
    "tenant",
    "time",
    "actor",
    "action",
    "outcome",
    "connection_id",
    "reason",
    "request_id",
    "peer",
    "details",
)


def audit_params(event: AuditEvent) -> tuple[Any, ...]:
    return (
        event.tenant,
        to_micros(event.time),
        event.actor,
        event.action,
        event.outcome.value,
        event.connection_id,
        event.reason,
        event.request_id,
        event.peer,
        to_json(event.details),
    )


def audit_from_row(row: Row) -> AuditEvent:
    return AuditEvent(
        id=row["id"],
        time=from_micros(row["time"]),
        tenant=row["tenant"],
        actor=row["actor"],
        action=row["action"],
        outcome=Outcome(row["outcome"]),
        connection_id=row["connection_id"],
        reason=row["reason"],
        request_id=row["request_id"],
        peer=row["peer"],
        details=json.loads(row["details"]),
        hash=row["hash"] or "",
        prev_hash=row["prev_hash"] or "",
    )


def oauth_state_params(p: PendingAuthorization) -> tuple[Any, ...]:
    return (
        p.state_hash,
        p.tenant,
        p.actor,
        p.connection_id,
        to_micros(p.created_at),
        to_micros(p.expires_at),
        p.sealed.ciphertext,
        p.sealed.wrapped_dek,
        p.sealed.kek_id,
    )


def oauth_state_from_row(row: Row) -> PendingAuthorization:
    return PendingAuthorization(
        state_hash=row["state_hash"],
        tenant=row["tenant"],
        actor=row["actor"],
        connection_id=row["connection_id"],
        created_at=from_micros(row["created_at"]),
        expires_at=from_micros(row["expires_at"]),
        sealed=sealed_from_row(row),
    )


# `id` is assigned by the database and left out.
SECURITY_EVENT_COLUMNS = (
    "tenant",
    "time",
    "rule",
    "severity",
    "action",
    "principal",
    "connection_id",
    "peer",
    "details",
)


def security_event_params(event: SecurityEvent) -> tuple[Any, ...]:
    return (
        event.tenant,
        to_micros(event.time),
        event.rule,
        event.severity,
        event.action,
        event.principal,
        event.connection_id,
        event.peer,
        to_json(event.details),
    )


def security_event_from_row(row: Row) -> SecurityEvent:
    return SecurityEvent(
        id=row["id"],
        time=from_micros(row["time"]),
        tenant=row["tenant"],
        rule=row["rule"],
        severity=row["severity"],
        action=row["action"],
        principal=row["principal"],
        connection_id=row["connection_id"],
        peer=row["peer"],
        details=json.loads(row["details"]),
    )


def seen_fact_from_row(row: Row) -> SeenFact:
    return SeenFact(
        tenant=row["tenant"],
        kind=row["kind"],
        subject=row["subject"],
        object=row["object"],
        first_seen=from_micros(row["first_seen"]),
    )


SEAL_COLUMNS = ("last_id", "last_hash", "kek_id", "mac", "sealed_at")


def seal_params(seal: AuditSeal) -> tuple[Any, ...]:
    return (seal.last_id, seal.last_hash, seal.kek_id, seal.mac, to_micros(seal.sealed_at))


def seal_from_row(row: Row) -> AuditSeal:
    return AuditSeal(
        int(row["last_id"]), str(row["last_hash"]), str(row["kek_id"]), str(row["mac"]),
        from_micros(row["sealed_at"]),
    )  # fmt: skip
