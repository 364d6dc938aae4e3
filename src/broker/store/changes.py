"""The change feed's messages: what changed that Resolve serves, as short JSON texts.

A write that changes a connection row, a grant or every wrapped key calls
`Tx.changed(message)` in its transaction; once it commits, the engine hands the
message to this process's `ChangeSink` (`deliver`), and on PostgreSQL every
other replica hears it too (NOTIFY, `postgres.changes`). So the resolve cache is
invalidated in one place, the sink, whoever wrote. Applying a message twice is
harmless: it only forgets.
"""

from __future__ import annotations

import json

import structlog

from broker.store.protocols import ChangeSink

log = structlog.get_logger("broker.store.changes")


def connection_changed(tenant: str, connection_id: str) -> str:
    return json.dumps(["c", tenant, connection_id])


def grant_changed(tenant: str, connection_id: str, principal: str) -> str:
    return json.dumps(["g", tenant, connection_id, principal])


def everything_changed() -> str:
    return '["*"]'


def principal_blocked(tenant: str, principal: str, until: float) -> str:
    return json.dumps(["b", tenant, principal, until])


def deliver(sink: ChangeSink, message: str) -> None:
    """Apply one message to the sink; an unreadable message forgets everything (the safe reading)."""
    try:
        decoded = json.loads(message)
        kind = decoded[0]
        if kind == "c":
            sink.connection_changed(decoded[1], decoded[2])
        elif kind == "g":
            sink.grant_changed(decoded[1], decoded[2], decoded[3])
        elif kind == "b":
            sink.principal_blocked(decoded[1], decoded[2], float(decoded[3]))
        else:
            sink.changes_seen()  # "*", or a kind a newer replica sends: drop everything
    except (ValueError, IndexError, TypeError, KeyError):
        log.warning("change_message_unreadable", length=len(message))
        sink.changes_seen()
    except Exception as exc:  # a sink that failed may have missed the change: drop everything
        log.error("change_message_not_applied", error_type=type(exc).__name__)
        sink.changes_seen()
