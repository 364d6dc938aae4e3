"""The audit log's hash chain: one canonical byte form per event, hashed with SHA-256.

Format version 1 (it must never change silently; `tests/unit/test_audit_chain_format.py`
pins a known answer). The canonical form of an event is the UTF-8 encoding of

    json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

where `doc` has exactly these keys:

    v              1 (this format's version)
    id             the event's id (integer)
    time_us        its time in integer microseconds since the Unix epoch (UTC)
    tenant, actor, action, outcome, connection_id, reason, request_id, peer   (strings)
    details        an object of string -> string
    prev_hash      the previous event's hash (lowercase hex), or `GENESIS` for the first

and an event's `hash` is the lowercase hex SHA-256 of that form. Because `prev_hash`
is inside the hashed bytes, each event commits to the whole history before it.

There is one chain across all tenants, in append (id) order: appends have a single
writer (SQLite's writer lock; on PostgreSQL a transaction-level advisory lock that
every replica takes for its appends, see `store/postgres/` for the cost), so the order
is well defined, and one chain means deleting or reordering any tenant's events breaks
the links around them. Verification reports only ids and a
generic problem, never another tenant's contents.

SHA-256 is unkeyed: someone who can write the database and recompute every later hash
can forge a consistent chain. The chain makes quiet edits evident; exported copies
(ExportAuditEvents) anchor it outside the database.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from broker.model import AuditEvent
from broker.store._codec import Row, audit_from_row, to_micros

FORMAT_VERSION = 1
GENESIS = "0" * 64

PROBLEM_LINK = "the link to the previous event is broken: an event before this one was deleted or reordered"
PROBLEM_HASH = "the event does not match its hash: it was edited or moved"
PROBLEM_MISSING = "the event has no hash"
PROBLEM_UNREADABLE = "the event cannot be read back: a stored field was edited"


def canonical_bytes(event: AuditEvent) -> bytes:
    """The event's canonical form (format version 1); `id` and `prev_hash` must be set."""
    doc: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "id": int(event.id),
        "time_us": to_micros(event.time),
        "tenant": event.tenant,
        "actor": event.actor,
        "action": event.action,
        "outcome": event.outcome.value,
        "connection_id": event.connection_id,
        "reason": event.reason,
        "request_id": event.request_id,
        "peer": event.peer,
        "details": {str(k): str(v) for k, v in event.details.items()},
        "prev_hash": event.prev_hash,
    }
    text = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8")


def event_hash(event: AuditEvent) -> str:
    """SHA-256 (lowercase hex) of the canonical form."""
    return hashlib.sha256(canonical_bytes(event)).hexdigest()


@dataclass
class ChainWalk:
    """Checks events fed in id order against the running chain; remembers the first break."""

    expected_prev: str
    checked: int = 0
    broken_id: int = 0
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem

    def check(self, event: AuditEvent) -> bool:
        """Check the next event; False (and the break recorded) when its link or hash is wrong."""
        if not self.ok:
            return False
        self.checked += 1
        if not event.hash:
            return self._broken(event.id, PROBLEM_MISSING)
        if event.prev_hash != self.expected_prev:
            return self._broken(event.id, PROBLEM_LINK)
        if event_hash(event) != event.hash:
            return self._broken(event.id, PROBLEM_HASH)
        self.expected_prev = event.hash
        return True

    def check_row(self, row: Row) -> bool:
        """`check` a stored row; a row whose fields no longer parse is a break."""
        try:
            event = audit_from_row(row)
        except (ValueError, TypeError, KeyError):
            return self.unreadable(int(row["id"]))
        return self.check(event)

    def unreadable(self, event_id: int) -> bool:
        """Record an event whose stored fields no longer parse."""
        if self.ok:
            self.checked += 1
            self._broken(event_id, PROBLEM_UNREADABLE)
        return False

    def _broken(self, event_id: int, problem: str) -> bool:
        self.broken_id, self.problem = event_id, problem
        return False
