"""SQL pieces both backends share: status predicates, counts, and event-listing filters.

Statements differ only in their placeholders (`?` on SQLite, `$n` on PostgreSQL), so
filters are written once against a `Params` collector that knows the style.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
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
    equals: Iterable[tuple[str, str]],
    start: datetime | None,
    end: datetime | None,
    limit: int,
    *,
    before_id: int | None = None,
    after_id: int | None = None,
) -> str:
    """One page of an event listing (audit or security events): the tenant, each non-empty
    (column, value), `time` from `start` (inclusive) to `end` (exclusive); newest first below
    `before_id`, or oldest first above `after_id` when that is given. Columns come from our code."""
    check_limit(limit)
    where = [f"tenant = {arg(tenant)}"]
    where += [f"{column} = {arg(value)}" for column, value in equals if value]
    if start is not None:
        where.append(f"time >= {arg(to_micros(start))}")
    if end is not None:
        where.append(f"time < {arg(to_micros(end))}")
    if after_id is not None:
        where.append(f"id > {arg(after_id)}")
        order = "id"
    else:
        if before_id is not None:
            where.append(f"id < {arg(before_id)}")
        order = "id DESC"
    return f"{select} WHERE {' AND '.join(where)} ORDER BY {order} LIMIT {arg(limit)}"


def audit_equals(filter: AuditFilter) -> list[tuple[str, str]]:
    """The exact-match columns of an audit listing."""
    return [("connection_id", filter.connection_id), ("actor", filter.actor), ("action", filter.action)]


def security_equals(filter: SecurityEventFilter) -> list[tuple[str, str]]:
    """The exact-match columns of a security-event listing."""
    return [("rule", filter.rule), ("connection_id", filter.connection_id), ("principal", filter.principal)]


def check_limit(limit: int) -> None:
    """Refuse a page size below 1: SQLite reads a negative LIMIT as "no limit"."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
