"""Grants: which executor principal may resolve which connection, until when."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from broker.errors import InvalidArgument, NotFound
from broker.identity import InvalidSpiffeId, parse_spiffe_id
from broker.model import Grant, GrantFilter, Role, shown_id
from broker.service import paging
from broker.service.context import Call
from broker.service.inputs import require_printable
from broker.service.lookup import live_connection
from broker.store import ConnectionStore, GrantStore


class AccessService:
    def __init__(
        self,
        connections: ConnectionStore,
        grants: GrantStore,
        clock: Callable[[], datetime],
    ) -> None:
        self._connections = connections
        self._grants = grants
        self._clock = clock

    def _check_grantee(self, call: Call, principal: str) -> None:
        if not principal:
            raise InvalidArgument.field("principal", "is required")
        try:
            grantee = parse_spiffe_id(principal, call.principal.trust_domain)
        except InvalidSpiffeId as exc:
            raise InvalidArgument.field("principal", str(exc)) from None
        if grantee.role is not Role.EXECUTOR:
            raise InvalidArgument.field("principal", "must be an executor principal (.../executor/<name>)")
        if grantee.tenant != call.tenant:
            raise InvalidArgument.field("principal", f"must belong to tenant {call.tenant}")

    async def grant(
        self, call: Call, connection_id: str, principal: str, expires_at: datetime | None
    ) -> Grant:
        """Let `principal` resolve the connection; replaces an existing grant's expiry."""
        self._check_grantee(call, principal)
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise InvalidArgument.field("expires_at", "must be in the future")
        await live_connection(self._connections, call.tenant, connection_id, field="connection_id")
        grant = Grant(
            tenant=call.tenant,
            connection_id=connection_id,
            principal=principal,
            created_at=now,
            created_by=call.actor,
            expires_at=expires_at,
        )
        details = {"principal": principal}
        if expires_at is not None:
            details["expires_at"] = expires_at.isoformat()
        event = call.audit_event(now, "grant.create", connection_id, details=details)
        await self._grants.put_grant(grant, event)
        return grant

    async def revoke(self, call: Call, connection_id: str, principal: str) -> None:
        """Remove a grant; NOT_FOUND when there was none."""
        if not connection_id:
            raise InvalidArgument.field("connection_id", "is required")
        if not principal:
            raise InvalidArgument.field("principal", "is required")
        require_printable(connection_id=connection_id, principal=principal)
        event = call.audit_event(
            self._clock(), "grant.revoke", connection_id, details={"principal": principal}
        )
        if not await self._grants.delete_grant(call.tenant, connection_id, principal, event):
            raise NotFound(f"no grant of connection {shown_id(connection_id)} to that principal")

    async def list(
        self, call: Call, filter: GrantFilter, page_size: int, page_token: str
    ) -> tuple[list[Grant], str]:
        """One page of grants ordered by (connection id, principal)."""
        limit = paging.page_size(page_size)
        require_printable(connection_id=filter.connection_id, principal=filter.principal)
        after = paging.decode_token("grants", page_token, paging.text_pair)
        grants = await self._grants.list_grants(
            call.tenant, filter, limit + 1, tuple(after) if after else None
        )
        if len(grants) > limit:
            last = grants[limit - 1]
            return grants[:limit], paging.encode_token("grants", [last.connection_id, last.principal])
        return grants, ""
