"""How `brokerctl` shows replies: aligned tables and key/value blocks, or JSON with `--json`.

Only `render_resolved` prints secret values; every other reply type has no field
that could hold one (the admin API is redacted by construction).

Much of what is shown was written by someone else: an MCP server's tool descriptions,
a test's error text, another admin's labels or config. Tables and key/value blocks show every
character that is not printable escaped (controls, bidirectional overrides and marks, zero-width
characters: `\x1b`, `\u202e`, `\u200b`), so no reply can move the cursor, retitle the terminal,
reorder what the reader sees or make two different names look alike. JSON escapes them itself.
"""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from broker._proto import broker_pb2
from broker.cli._json import plain_value
from broker.client import struct_to_dict

_NONE = "-"
_MIN_WRAP = 20


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(text: str) -> str:
    """`text` safe for a terminal, every character that is not printable escaped, the rest as is.

    Not printable (`str.isprintable`): C0 and C1 controls, bidi overrides, isolates and marks,
    zero-width and other format characters, separators other than the space (U+2028, U+00A0),
    unassigned code points. So no reply moves the cursor or reorders what is read, and two
    names that differ only by an invisible character never look the same.
    """
    if text.isprintable():
        return text  # the common case, without building a new string
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    grid = [list(headers), *([shown(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in grid) for i in range(len(headers))]
    lines = []
    for row in grid:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def blocks(headers: tuple[str, str], items: Iterable[tuple[str, Sequence[str]]], width: int) -> str:
    """A name column, then paragraphs wrapped to fit `width` columns, each item under the last."""
    items = [(shown(name), [shown(p) for p in paragraphs]) for name, paragraphs in items]
    indent = max([len(headers[0]), *(len(name) for name, _ in items)]) + 2
    lines = [headers[0].ljust(indent) + headers[1]]
    for name, paragraphs in items:
        body = [line for p in paragraphs for line in wrap(p, width - indent)]
        lines.append(name.ljust(indent) + body[0])
        lines += [" " * indent + line for line in body[1:]]
    return "\n".join(lines)


def wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` characters (never narrower than 20), at least one line."""
    return textwrap.wrap(text, max(width, _MIN_WRAP), break_on_hyphens=False) or [""]


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
    """A Struct as compact JSON, `-` when empty; non-ASCII text as is (`shown` escapes what must be)."""
    doc = struct_to_dict(message)
    return json.dumps(doc, sort_keys=True, ensure_ascii=False) if doc else _NONE


def render_types(reply: broker_pb2.ListConnectionTypesResponse, width: int) -> str:
    """Each connection type, its fields (`*` = secret) and providers, wrapped to `width` columns."""
    items = []
    for t in reply.types:
        paragraphs = [
            t.description or _NONE,
            "fields: " + (", ".join(f.name + ("*" if f.secret else "") for f in t.fields) or _NONE),
        ]
        if t.providers:
            paragraphs.append("providers: " + ", ".join(t.providers))
        items.append((t.name, paragraphs))
    footer = wrap("* = secret. `brokerctl types TYPE` shows each field of a type.", width)
    return blocks(("TYPE", "DESCRIPTION"), items, width) + "\n\n" + "\n".join(footer)


def render_type(t: broker_pb2.ConnectionType, width: int) -> str:
    """One connection type: each field's kind, whether it is required, its default, allowed values, secret."""
    intro = [f"{t.name}: {t.description}" if t.description else t.name]
    if t.providers:
        intro.append("providers: " + ", ".join(t.providers))
    text = "\n".join(line for p in intro for line in wrap(shown(p), width))
    if not t.fields:
        return text + "\n\nno fixed fields: any config, and secrets under any names"
    items = [
        (f.name, [_field_facts(f), f.description]) if f.description else (f.name, [_field_facts(f)])
        for f in t.fields
    ]
    return text + "\n\n" + blocks(("FIELD", "DETAILS"), items, width)


def _field_facts(f: broker_pb2.FieldSpec) -> str:
    facts = [_enum(broker_pb2.FieldKind, f.kind, "FIELD_KIND_"), "required" if f.required else "optional"]
    if f.secret:
        facts.append("SECRET, never resolved" if f.withheld else "SECRET")
    if f.HasField("default_value"):
        facts.append("default " + json.dumps(plain_value(f.default_value), ensure_ascii=False))
    if f.choices:
        facts.append("one of: " + " | ".join(f.choices))
    return ", ".join(facts)


def render_connection(c: broker_pb2.Connection) -> str:
    """A connection's summary as a key/value block (it holds secret field names, never values)."""
    expired = [("expired", _reauthorization(c.reauthorization))] if c.HasField("reauthorization") else []
    return fields(
        [
            ("id", c.id),
            ("name", c.name),
            ("type", c.type),
            ("provider", c.provider or _NONE),
            ("status", _enum(broker_pb2.ConnectionStatus, c.status, "CONNECTION_STATUS_")),
            *expired,
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


def render_grants(grants: Iterable[broker_pb2.Grant], now: dt.datetime) -> str:
    """One row per grant; STATE says whether it has expired by `now`, MODE how it may be used."""
    rows = [
        (
            g.connection_id,
            g.principal,
            "expired" if grant_expired(g, now) else "active",
            "proxy" if g.mode == broker_pb2.GRANT_MODE_PROXY else "resolve",
            _scope(g.scope),
            timestamp(g, "expires_at", "never"),
            timestamp(g, "created_at"),
            g.created_by or _NONE,
        )
        for g in grants
    ]
    return table(("CONNECTION", "PRINCIPAL", "STATE", "MODE", "SCOPE", "EXPIRES", "CREATED", "BY"), rows)


def _scope(scope: broker_pb2.GrantScope) -> str:
    parts = {"methods": scope.methods, "paths": scope.path_prefixes, "tools": scope.tools}
    return " ".join(f"{name}={','.join(items)}" for name, items in parts.items() if items) or _NONE


def grant_expired(g: broker_pb2.Grant, now: dt.datetime) -> bool:
    """True once the grant's expiry has passed (the broker refuses it from that instant)."""
    return g.HasField("expires_at") and g.expires_at.ToDatetime(tzinfo=dt.UTC) <= now


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


def render_verify(r: broker_pb2.VerifyAuditLogResponse) -> str:
    """The verdict of VerifyAuditLog: ok with counts, or the first broken event and why."""
    if not r.ok:
        return f"BROKEN at event {r.first_broken_id}: {r.problem} ({r.events_checked} events checked)"
    seals = (
        f"{r.seals_checked} seals matched, sealed through event {r.sealed_through_id},"
        f" {r.unsealed_events} newest events not sealed yet"
    )
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
    if r.HasField("lease"):
        # The user and password above are this lease's: they stop working when it ends.
        pairs += [
            ("lease", r.lease.id),
            ("lease user", r.lease.username),
            ("lease expires", timestamp(r.lease, "expires_at")),
            ("lease max", timestamp(r.lease, "max_expires_at")),
        ]
        if r.lease.run_id:
            pairs.append(("lease run", r.lease.run_id))
    pairs += [(f"secret {k}", v) for k, v in sorted(r.secrets.items())]
    return fields(pairs)


def render_leases(leases: Iterable[broker_pb2.Lease]) -> str:
    """One row per lease; REASON is why it ends, or the last failed attempt to drop its user."""
    rows = [
        (
            x.id,
            x.connection_id,
            x.principal,
            x.username,
            _enum(broker_pb2.LeaseState, x.state, "LEASE_STATE_"),
            timestamp(x, "expires_at"),
            " / ".join(part for part in (x.revoke_reason, x.last_error) if part) or _NONE,
            str(x.revocation_attempts),
        )
        for x in leases
    ]
    headers = ("ID", "CONNECTION", "PRINCIPAL", "USER", "STATE", "EXPIRES", "REASON / LAST ERROR", "ATTEMPTS")
    return table(headers, rows)


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
    """MCP tools: name, the server's hints (`tool_hints`), the input schema's parameters, and a
    one-line description after the tool's title, if it has one."""
    rows = []
    for tool in tools:
        schema = struct_to_dict(tool.input_schema)
        params = ", ".join(sorted(schema.get("properties", {}))) if isinstance(schema, dict) else ""
        title = tool.title or tool.annotations.title
        description = " ".join((f"{title}: {tool.description}" if title else tool.description).split())
        rows.append((tool.name, tool_hints(tool), params or _NONE, description[:80] or _NONE))
    return table(("TOOL", "HINTS", "PARAMETERS", "DESCRIPTION"), rows) if rows else "no tools"


def tool_hints(tool: broker_pb2.McpTool) -> str:
    """What the server says of a tool, compactly: only the hints it set (MCP's defaults when it
    sets none: may modify, may destroy, not idempotent, open world), then its task support; a
    tool the broker will not call says so."""
    hints = tool.annotations
    said = []
    if hints.HasField("read_only_hint"):
        said.append("read-only" if hints.read_only_hint else "writes")
    if hints.HasField("destructive_hint"):
        said.append("destructive" if hints.destructive_hint else "additive")
    if hints.HasField("idempotent_hint") and hints.idempotent_hint:
        said.append("idempotent")
    if hints.HasField("open_world_hint"):
        said.append("open-world" if hints.open_world_hint else "closed-world")
    if tool.task_support in ("optional", "required"):
        said.append(f"task-{tool.task_support}")
    if tool.not_callable:
        said.append("not-callable")
    return ",".join(said) or _NONE


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


def _reauthorization(r: broker_pb2.Reauthorization) -> str:
    """Why and since when a connection needs re-authorization: `reason (error) at time: description`."""
    text = r.reason + (f" ({r.error})" if r.error else "") + f" at {timestamp(r, 'since')}"
    return text + (f": {r.description}" if r.description else "")


def _tested(c: broker_pb2.Connection) -> str:
    status = _enum(broker_pb2.TestStatus, c.test_status, "TEST_STATUS_")
    if status == "unspecified":
        return _NONE
    when = timestamp(c, "last_tested_at")
    return status if when == _NONE else f"{status} at {when}"


def render_tool_call(result: broker_pb2.CallMcpToolResponse) -> str:
    """Each text item as it is; any other item (an image, a resource) as one line of JSON."""
    lines = []
    for item in result.content:
        fields = json_format.MessageToDict(item)
        lines.append(
            str(fields["text"]) if fields.get("type") == "text" else json.dumps(fields, ensure_ascii=False)
        )
    return "\n".join(lines)
