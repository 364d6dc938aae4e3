"""SQL pieces both backends share: status predicates, counts, and event-listing filters.

Statements differ only in their placeholders (`?` on SQLite, `$n` on PostgreSQL), so
filters are written once against a `Params` collector that knows the style.
"""

from __future__ import annotations

from typing import Any

from broker.model import AuditFilter, ConnectionStatus, SecurityEventFilter
from broker.store._codec import to_micros

# `ListConnections` status filters; None lists live connections (active and revoked).
STATUS_WHERE: dict[ConnectionStatus | None, str] = {
    None: "deleted_at IS NULL",
    ConnectionStatus.ACTIVE: (
        "status = 'active' AND deleted_at IS NULL AND reauth_required_at IS NULL AND suspended_at IS NULL"
    ),
    ConnectionStatus.REVOKED: "status = 'revoked' AND deleted_at IS NULL",
    ConnectionStatus.DELETED: "deleted_at IS NOT NULL AND purged_at IS NULL",
    ConnectionStatus.EXPIRED: (
        "status = 'active' AND deleted_at IS NULL AND reauth_required_at IS NOT NULL AND suspended_at IS NULL"
    ),
    ConnectionStatus.SUSPENDED: "status = 'active' AND deleted_at IS NULL AND suspended_at IS NOT NULL",
}

# What admins see as a connection's status, in SQL (the same order as `presented_status`).
COUNT_BY_TYPE_AND_STATUS = (
    "SELECT type, CASE WHEN deleted_at IS NOT NULL THEN 'deleted' WHEN status = 'revoked' THEN 'revoked'"
    " WHEN suspended_at IS NOT NULL THEN 'suspended' WHEN reauth_required_at IS NOT NULL THEN 'expired'"
    " ELSE 'active' END AS state, COUNT(*) AS n FROM connections WHERE purged_at IS NULL GROUP BY 1, 2"
)


class Params:
    """Collects a statement's parameters; calling it with a value returns the value's placeholder."""

    def __init__(self, numbered: bool) -> None:
        self.values: list[Any] = []
        self._numbered = numbered  # `$1, $2, ...` (PostgreSQL), else `?` (SQLite)

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}" if self._numbered else "?"


def event_page(
    arg: Params,
    select: str,
    tenant: str,
    filter: AuditFilter | SecurityEventFilter,
    limit: int,
    *,
    cursor: int | None,
    oldest_first: bool,
) -> str:
    """One page of an event listing (audit or security events): the tenant, each exact-match
    filter that is set, `time` from start_time (inclusive) to end_time (exclusive); newest first
    with id < cursor, or oldest first with id > cursor (when given)."""
    check_limit(limit)
    equals = _audit_equals(filter) if isinstance(filter, AuditFilter) else _security_equals(filter)
    where = [f"tenant = {arg(tenant)}"]
    where += [f"{column} = {arg(value)}" for column, value in equals if value]
    if filter.start_time is not None:
        where.append(f"time >= {arg(to_micros(filter.start_time))}")
    if filter.end_time is not None:
        where.append(f"time < {arg(to_micros(filter.end_time))}")
    if cursor is not None:
        where.append(f"id {'>' if oldest_first else '<'} {arg(cursor)}")
    order = "id" if oldest_first else "id DESC"
    return f"{select} WHERE {' AND '.join(where)} ORDER BY {order} LIMIT {arg(limit)}"


def _audit_equals(filter: AuditFilter) -> list[tuple[str, str]]:
    """The exact-match columns of an audit listing."""
    return [("connection_id", filter.connection_id), ("actor", filter.actor), ("action", filter.action)]


def _security_equals(filter: SecurityEventFilter) -> list[tuple[str, str]]:
    """The exact-match columns of a security-event listing."""
    return [("rule", filter.rule), ("connection_id", filter.connection_id), ("principal", filter.principal)]


def check_limit(limit: int) -> None:
    """Refuse a page size below 1: SQLite reads a negative LIMIT as "no limit"."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
