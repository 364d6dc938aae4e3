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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.model import AnchorKeys, AuditChainReport, AuditEvent, AuditSeal
from broker.store._codec import AUDIT, Row, to_json, to_micros

FORMAT_VERSION = 1
GENESIS = "0" * 64

PROBLEM_LINK = "the link to the previous event is broken: an event before this one was deleted or reordered"
PROBLEM_HASH = "the event does not match its hash: it was edited or moved"
PROBLEM_MISSING = "the event has no hash"
PROBLEM_UNREADABLE = "the event cannot be read back: a stored field was edited"
PROBLEM_SEAL_MISMATCH = (
    "the event's hash differs from the one sealed: the chain was rewritten from here or earlier"
)
PROBLEM_SEAL_FORGED = "a seal does not verify under its master key: it was forged or edited"
PROBLEM_SEAL_MISSING = "a sealed event is missing: the newest events were cut off"
PROBLEM_BEFORE_START = "an event lies before where the chain starts (its checkpoint): it was inserted"


def _doc(event: AuditEvent) -> dict[str, Any]:
    """The hashed fields of `event` as a fresh dict (its own copy of `details`), the link aside."""
    return {
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


def _canonical(doc: dict[str, Any]) -> bytes:
    """The canonical form of `doc` (see the module docstring): the store's JSON (sorted keys, no
    spaces, UTF-8 as it is), encoded."""
    return to_json(doc).encode("utf-8")


def canonical_bytes(event: AuditEvent) -> bytes:
    """The event's canonical form (format version 1); `id` and `prev_hash` must be set."""
    return _canonical(_doc(event))


def event_hash(event: AuditEvent) -> str:
    """SHA-256 (lowercase hex) of the canonical form."""
    return hashlib.sha256(canonical_bytes(event)).hexdigest()


# The chain's tail in one statement: the newest event's (id, hash), else the newest checkpoint's
# (everything before it pruned); no row at all before the first event.
TAIL_QUERY = (
    "SELECT preference, id, hash FROM"
    " (SELECT 0 AS preference, id, hash FROM audit_events ORDER BY id DESC LIMIT 1) AS newest_event"
    " UNION ALL SELECT preference, id, hash FROM"
    " (SELECT 1 AS preference, last_id AS id, last_hash AS hash FROM audit_checkpoints"
    " ORDER BY last_id DESC LIMIT 1) AS newest_checkpoint"
)


def tail(rows: Sequence[Row]) -> tuple[int, str]:
    """(id, hash) of the chain's tail from the rows of `TAIL_QUERY`; (0, GENESIS) for no chain."""
    if not rows:
        return 0, GENESIS
    newest = min(rows, key=lambda row: int(row["preference"]))
    return int(newest["id"]), str(newest["hash"] or "")


_ID, _HASH, _PREV_HASH = (AUDIT.columns.index(column) for column in ("id", "hash", "prev_hash"))


def linker(events: Iterable[AuditEvent]) -> Callable[[Sequence[Row]], list[tuple[Any, ...]]]:
    """What makes the audit rows (`AUDIT.params`) of `events` from the rows of `TAIL_QUERY`: each
    event gets the next id and links to the one before it.

    The events' fields are copied now, on the caller's side; the returned function only numbers,
    links and hashes them, so it may run later on another thread (the SQLite writer's, with the
    tail read in the same transaction) without reading anything the caller could still change.
    """
    prepared = [(_doc(event), list(AUDIT.params(event))) for event in events]

    def link(tail_rows: Sequence[Row]) -> list[tuple[Any, ...]]:
        last_id, last_hash = tail(tail_rows)
        rows = []
        for doc, params in prepared:
            last_id += 1
            doc["id"], doc["prev_hash"] = last_id, last_hash
            last_hash = hashlib.sha256(_canonical(doc)).hexdigest()
            params[_ID], params[_HASH], params[_PREV_HASH] = last_id, last_hash, doc["prev_hash"]
            rows.append(tuple(params))
        return rows

    return link


@dataclass
class ChainWalk:
    """Checks events fed in id order against the running chain; remembers the first break."""

    expected_prev: str
    checked: int = 0
    broken_id: int = 0
    problem: str = ""
    last_id: int = 0
    seals_checked: int = 0
    seals_unverifiable: int = 0
    since_seal: int = 0  # events checked after the newest seal that matched
    sealed_through: int = 0  # the id of the newest event a verified seal matched
    _sealed: dict[int, str] = field(default_factory=dict)  # id -> hash, seals not yet reached

    @property
    def ok(self) -> bool:
        return not self.problem

    def check(self, event: AuditEvent) -> bool:
        """Check the next event; False (and the break recorded) when its link or hash is wrong."""
        if not self.ok:
            return False
        self.checked += 1
        if not event.hash:
            return self.broken(event.id, PROBLEM_MISSING)
        if event.prev_hash != self.expected_prev:
            return self.broken(event.id, PROBLEM_LINK)
        if event_hash(event) != event.hash:
            return self.broken(event.id, PROBLEM_HASH)
        self.expected_prev = event.hash
        self.last_id = event.id
        self.since_seal += 1
        sealed = self._sealed.pop(event.id, None)
        if sealed is not None:
            if sealed != event.hash:
                return self.broken(event.id, PROBLEM_SEAL_MISMATCH)
            self.seals_checked += 1
            self.since_seal = 0
            self.sealed_through = event.id
        return True

    def add_seals(self, seals: Iterable[AuditSeal], anchors: AnchorKeys) -> bool:
        """Seals for events still ahead of the walk; False (a break) when one's MAC fails."""
        for seal in seals:
            verdict = anchors.seal(seal)
            if verdict is None:
                self.seals_unverifiable += 1
            elif not verdict:
                return self.broken(seal.last_id, PROBLEM_SEAL_FORGED)
            else:
                self._sealed[seal.last_id] = seal.last_hash
        return self.ok

    def finish(self, seals_beyond_the_end: Iterable[AuditSeal], anchors: AnchorKeys) -> None:
        """After the last event: a verified seal of an event that is not there means a cut tail."""
        if self.ok and self.add_seals(seals_beyond_the_end, anchors) and self._sealed:
            self.broken(min(self._sealed), PROBLEM_SEAL_MISSING)

    def report(self, newest_seal: AuditSeal | None = None) -> AuditChainReport:
        return AuditChainReport(
            self.ok,
            self.checked,
            self.broken_id,
            self.problem,
            seals_checked=self.seals_checked,
            seals_unverifiable=self.seals_unverifiable,
            unsealed_events=self.since_seal if self.ok else 0,
            newest_seal=newest_seal,
        )

    def check_row(self, row: Row) -> bool:
        """`check` a stored row; a row whose fields no longer parse is a break."""
        try:
            event = AUDIT.from_row(row)
        except (ValueError, TypeError, KeyError, OverflowError):
            return self.unreadable(int(row["id"]))
        return self.check(event)

    def unreadable(self, event_id: int) -> bool:
        """Record an event whose stored fields no longer parse."""
        if self.ok:
            self.checked += 1
            self.broken(event_id, PROBLEM_UNREADABLE)
        return False

    def broken(self, event_id: int, problem: str) -> bool:
        """Record a break (found by the walk, or outside it: the checkpoint it starts from)."""
        self.broken_id, self.problem = event_id, problem
        return False
