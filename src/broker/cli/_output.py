"""How `brokerctl` shows replies: aligned tables and key/value blocks, or JSON with `--json`.

Only `render_resolved` prints secret values; every other reply type has no field
that could hold one (the admin API is redacted by construction).

Much of what is shown was written by someone else: an MCP server's tool descriptions,
a test's error text, another admin's labels. Tables and key/value blocks show control
characters and bidirectional overrides escaped (`\x1b`, `\u202e`), so no reply can move
the cursor, retitle the terminal or reorder what the reader sees. JSON escapes them itself.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from broker._proto import broker_pb2
from broker.client import struct_to_dict

_NONE = "-"


def to_json(message: Message) -> str:
    """The message as indented JSON, with the proto's own field names."""
    doc = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(doc, indent=2, sort_keys=True)


# C0 and C1 controls (DEL included) and the bidirectional embeddings, overrides and isolates.
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(char: re.Match[str]) -> str:
    code = ord(char.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: str) -> str:
    """`text` safe for a terminal: control characters and bidi overrides escaped, the rest as is."""
    return _UNSHOWABLE.sub(_escape, text)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    grid = [list(headers), *([shown(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in grid) for i in range(len(headers))]
    lines = []
    for row in grid:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    """A `key: value` block with the values aligned."""
    width = max(len(shown(k)) for k, _ in pairs) + 1
    return "\n".join(f"{(shown(k) + ':').ljust(width)}  {shown(v)}" for k, v in pairs)


def timestamp(message: Message, name: str, unset: str = _NONE) -> str:
    """An RFC 3339 UTC time to the second, or `unset` when the field is not set."""
    if not message.HasField(name):
        return unset
    when: dt.datetime = getattr(message, name).ToDatetime(tzinfo=dt.UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def struct_text(message: struct_pb2.Struct) -> str:
    """A Struct as compact JSON, `-` when empty."""
    doc = struct_to_dict(message)
    return json.dumps(doc, sort_keys=True) if doc else _NONE


def render_types(reply: broker_pb2.ListConnectionTypesResponse) -> str:
    """One row per connection type; secret fields are marked with `*`."""
    rows = [
        (
            t.name,
            ", ".join(t.providers) or _NONE,
            ", ".join(f.name + ("*" if f.secret else "") for f in t.fields) or _NONE,
            t.description,
        )
        for t in reply.types
    ]
    return table(("TYPE", "PROVIDERS", "FIELDS (* = secret)", "DESCRIPTION"), rows)


def render_connection(c: broker_pb2.Connection) -> str:
    """A connection's summary as a key/value block (it holds secret field names, never values)."""
    return fields(
        [
            ("id", c.id),
            ("name", c.name),
            ("type", c.type),
            ("provider", c.provider or _NONE),
            ("status", _enum(broker_pb2.ConnectionStatus, c.status, "CONNECTION_STATUS_")),
            ("config", struct_text(c.config)),
            ("secrets", ", ".join(c.secret_fields) or _NONE),
            ("labels", _labels(c.labels)),
            ("etag", c.etag or _NONE),
            ("created", timestamp(c, "created_at")),
            ("updated", timestamp(c, "updated_at")),
            ("last used", timestamp(c, "last_used_at")),
            ("tested", _tested(c)),
            ("deleted", timestamp(c, "deleted_at")),
        ]
    )


def render_connections(connections: Iterable[broker_pb2.Connection]) -> str:
    """The list view: one row per connection."""
    rows = [
        (
            c.id,
            c.name,
            c.type,
            c.provider or _NONE,
            _enum(broker_pb2.ConnectionStatus, c.status, "CONNECTION_STATUS_"),
            ",".join(c.secret_fields) or _NONE,
            timestamp(c, "updated_at"),
        )
        for c in connections
    ]
    return table(("ID", "NAME", "TYPE", "PROVIDER", "STATUS", "SECRETS", "UPDATED"), rows)


def render_grants(grants: Iterable[broker_pb2.Grant]) -> str:
    """One row per grant."""
    rows = [
        (
            g.connection_id,
            g.principal,
            timestamp(g, "expires_at", "never"),
            timestamp(g, "created_at"),
            g.created_by or _NONE,
        )
        for g in grants
    ]
    return table(("CONNECTION", "PRINCIPAL", "EXPIRES", "CREATED", "BY"), rows)


def render_audit(events: Iterable[broker_pb2.AuditEvent]) -> str:
    """One row per audit event, in the order the server returns them (newest first)."""
    rows = [
        (
            timestamp(e, "time"),
            e.actor,
            e.action,
            e.connection_id or _NONE,
            e.outcome,
            e.reason or _NONE,
            _labels(e.details),
        )
        for e in events
    ]
    return table(("TIME", "ACTOR", "ACTION", "CONNECTION", "OUTCOME", "REASON", "DETAILS"), rows)


def json_line(message: Message) -> str:
    """The message as one line of compact JSON with the proto's field names (for JSON Lines files)."""
    doc = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def render_verify(r: broker_pb2.VerifyAuditLogResponse) -> str:
    """The verdict of VerifyAuditLog: ok with counts, or the first broken event and why."""
    if not r.ok:
        return f"BROKEN at event {r.first_broken_id}: {r.problem} ({r.events_checked} events checked)"
    seals = f"{r.seals_checked} seals matched, {r.unsealed_events} newest events not sealed yet"
    if r.seals_unverifiable:
        seals += f", {r.seals_unverifiable} seals under master keys no longer configured"
    return f"ok: the audit chain is intact ({r.events_checked} events checked; {seals})"


def render_resolved(r: broker_pb2.ResolveResponse) -> str:
    """A Resolve reply, secret values included: the one view that shows them."""
    pairs = [
        ("connection", r.connection_id),
        ("name", r.name),
        ("type", r.type),
        ("provider", r.provider or _NONE),
        ("config", struct_text(r.config)),
        ("expires", timestamp(r, "expires_at", "never")),
        ("cache ttl", f"{r.cache_ttl_seconds}s"),
        ("secret version", str(r.secret_version)),
    ]
    if r.HasField("superseded_at"):
        pairs.append(("superseded", timestamp(r, "superseded_at", _NONE)))
    pairs += [(f"secret {k}", v) for k, v in sorted(r.secrets.items())]
    return fields(pairs)


def render_rotated(r: broker_pb2.RotateMasterKeyResponse) -> str:
    """RotateMasterKey's answer: the new and previous key ids, and the data keys each wraps."""
    head = fields([("active key", r.active_kek_id), ("previous key", r.previous_kek_id or _NONE)])
    ids = sorted(set(r.deks_by_kek) | ({r.active_kek_id} if r.active_kek_id else set()))
    rows = [
        (kek_id, "active" if kek_id == r.active_kek_id else "old", str(r.deks_by_kek.get(kek_id, 0)))
        for kek_id in ids
    ]
    return head + "\n\n" + table(("KEY", "STATE", "DATA KEYS"), rows)


def render_test_result(r: broker_pb2.TestResult) -> str:
    """A test result: the verdict first, then what was and was not verified."""
    verdict = "ok" if r.success else "FAILED"
    category = _enum(broker_pb2.TestCategory, r.category, "TEST_CATEGORY_")
    stage = _enum(broker_pb2.TestStage, r.stage, "TEST_STAGE_")
    pairs = [
        ("result", f"{verdict} ({category}) after {r.latency_ms} ms, reached {stage}"),
        ("message", r.message or _NONE),
    ]
    pairs += [(key, value) for key, value in sorted(r.details.items())]
    pairs.append(("verified", ", ".join(r.verified) or _NONE))
    pairs.append(("not verified", ", ".join(r.not_verified) or _NONE))
    return fields(pairs)


def render_tools(tools: Iterable[broker_pb2.McpTool]) -> str:
    """MCP tools: name, a one-line description, and the input schema's parameters."""
    rows = []
    for tool in tools:
        schema = struct_to_dict(tool.input_schema)
        params = ", ".join(sorted(schema.get("properties", {}))) if isinstance(schema, dict) else ""
        description = " ".join(tool.description.split())
        rows.append((tool.name, params or _NONE, description[:80] or _NONE))
    return table(("TOOL", "PARAMETERS", "DESCRIPTION"), rows) if rows else "no tools"


def render_tool_changes(r: broker_pb2.RefreshMcpToolsResponse) -> str:
    """A refresh: the test verdict, what changed, then the tools."""
    parts = [render_test_result(r.result)]
    if r.result.success:
        for label, names in (("added", r.added), ("removed", r.removed), ("changed", r.changed)):
            parts.append(f"{label}: {', '.join(names) if names else _NONE}")
        parts.append(render_tools(r.tools))
    return "\n\n".join(parts)


def render_security_events(events: Iterable[broker_pb2.SecurityEvent]) -> str:
    """One row per security event, newest first."""
    rows = [
        (
            timestamp(e, "time"),
            e.rule,
            e.severity,
            e.action,
            e.principal or _NONE,
            e.connection_id or _NONE,
            _labels(e.details),
        )
        for e in events
    ]
    return table(("TIME", "RULE", "SEVERITY", "ACTION", "PRINCIPAL", "CONNECTION", "DETAILS"), rows)


def _enum(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def _labels(labels: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or _NONE


def _tested(c: broker_pb2.Connection) -> str:
    status = _enum(broker_pb2.TestStatus, c.test_status, "TEST_STATUS_")
    if status == "unspecified":
        return _NONE
    when = timestamp(c, "last_tested_at")
    return status if when == _NONE else f"{status} at {when}"
