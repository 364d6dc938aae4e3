"""Grants: which executor principal may use which connection, how (resolve or proxy), until when."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from broker import catalog
from broker.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from broker.identity import InvalidSpiffeId, parse_spiffe_id
from broker.model import UNSCOPED, Grant, GrantFilter, GrantMode, GrantScope, Role, plain_path, shown_id
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
        self,
        call: Call,
        connection_id: str,
        principal: str,
        expires_at: datetime | None,
        mode: GrantMode = GrantMode.RESOLVE,
        scope: GrantScope = UNSCOPED,
    ) -> Grant:
        """Let `principal` use the connection; replaces an existing grant's expiry, mode and scope."""
        self._check_grantee(call, principal)
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise InvalidArgument.field("expires_at", "must be in the future")
        record = await live_connection(self._connections, call.tenant, connection_id, field="connection_id")
        scope = checked_scope(record.type, mode, scope)
        await self._check_callable(record.tenant, connection_id, scope)
        grant = Grant(
            tenant=call.tenant,
            connection_id=connection_id,
            principal=principal,
            created_at=now,
            created_by=call.actor,
            expires_at=expires_at,
            mode=mode,
            scope=scope,
        )
        details = {"principal": principal, "mode": mode.value}
        if expires_at is not None:
            details["expires_at"] = expires_at.isoformat()
        for name in ("methods", "path_prefixes", "tools"):
            if getattr(scope, name):
                details[f"scope_{name}"] = " ".join(getattr(scope, name))
        event = call.audit_event(now, "grant.create", connection_id, details=details)
        await self._grants.put_grant(grant, event)
        return grant

    async def _check_callable(self, tenant: str, connection_id: str, scope: GrantScope) -> None:
        """FAILED_PRECONDITION when the scope names a stored tool the broker will not call (one
        that runs only as an MCP task): granting it would approve a call that can never be made.
        A tool not discovered yet may be named; it is checked again when called."""
        if not scope.tools:
            return
        tools, _ = await self._connections.list_mcp_tools(tenant, connection_id)
        refused = [t for t in tools if t.name in scope.tools and t.not_callable]
        if refused:
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise FailedPrecondition(
                f"scope.tools names {refused[0].name!r}{more}, which cannot be granted:"
                f" {refused[0].not_callable}"
            )

    async def revoke(
        self, call: Call, connection_id: str, principal: str, *, every_connection: bool = False
    ) -> int:
        """Remove a grant (NOT_FOUND when there was none), or with `every_connection` every grant
        of the principal in the caller's tenant; how many were removed."""
        if every_connection:
            return await self._revoke_everywhere(call, connection_id, principal)
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
        return 1

    async def _revoke_everywhere(self, call: Call, connection_id: str, principal: str) -> int:
        """Cut a principal off (its certificate or machine is compromised): every grant in one
        transaction, none of another tenant's. None at all is success (0): the call can be repeated.
        The change feed takes each grant out of every replica's Resolve cache and queues the
        principal's leases on that connection, exactly as that many single revocations would."""
        if connection_id:
            raise InvalidArgument.field("connection_id", "must be empty with every_connection")
        # The rules a grantee was checked against when granted (an executor of the caller's
        # tenant), so a mistyped principal is an error rather than a silent "0 removed".
        self._check_grantee(call, principal)
        # One event per grant, as a single revocation writes: the connection's own audit trail
        # shows who lost access; `every_connection` tells the two kinds of revocation apart.
        event = call.audit_event(
            self._clock(), "grant.revoke", "", details={"principal": principal, "every_connection": "true"}
        )
        return len(await self._grants.delete_principal_grants(call.tenant, principal, event))

    async def list(
        self, call: Call, filter: GrantFilter, page_size: int, page_token: str
    ) -> tuple[list[Grant], str]:
        """One page of grants ordered by (connection id, principal)."""
        limit = paging.page_size(page_size)
        require_printable(connection_id=filter.connection_id, principal=filter.principal)
        after = paging.decode_token("grants", page_token, paging.text_pair, filter)
        grants = await self._grants.list_grants(
            call.tenant, filter, limit + 1, tuple(after) if after else None
        )
        if len(grants) > limit:
            last = grants[limit - 1]
            return grants[:limit], paging.encode_token("grants", [last.connection_id, last.principal], filter)
        return grants, ""


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_MAX_PATH_PREFIXES, _MAX_TOOLS, _MAX_PATH, _MAX_TOOL = 32, 256, 512, 128


def checked_scope(connection_type: str, mode: GrantMode, scope: GrantScope) -> GrantScope:
    """The scope, normalised (methods upper case; each list sorted, without repeats), or
    INVALID_ARGUMENT naming every part that does not fit the mode and the connection's type."""
    kind = catalog.get_type(connection_type).proxy if mode is GrantMode.PROXY else None
    if mode is GrantMode.PROXY and not kind:
        raise InvalidArgument.field(
            "mode", f"a {connection_type} connection cannot be used through the proxy; grant RESOLVE"
        )
    if mode is GrantMode.RESOLVE and scope:
        raise InvalidArgument.field(
            "scope", "applies only to PROXY grants: a resolved secret can be used beyond any scope"
        )
    if kind != "http" and (scope.methods or scope.path_prefixes):
        raise InvalidArgument.field("scope", f"methods and path prefixes apply to HTTP calls, not {kind}")
    if kind != "mcp" and scope.tools:
        raise InvalidArgument.field("scope.tools", "apply to MCP connections only")
    for name, most in (
        ("path_prefixes", _MAX_PATH_PREFIXES),
        ("tools", _MAX_TOOLS),
        ("methods", len(_METHODS)),
    ):
        if len(getattr(scope, name)) > most:
            raise InvalidArgument.field(f"scope.{name}", f"at most {most}")
    bad = [
        FieldViolation(f"scope.methods[{i}]", f"must be one of {', '.join(sorted(_METHODS))}")
        for i, method in enumerate(scope.methods)
        if method.upper() not in _METHODS
    ]
    bad += [
        FieldViolation(
            f"scope.path_prefixes[{i}]",
            f"must start with '/' and hold at most {_MAX_PATH} printable ASCII characters, without"
            " spaces, '?', '#', dot segments or encoded dots and slashes",
        )
        for i, prefix in enumerate(scope.path_prefixes)
        if not plain_path(prefix, _MAX_PATH)
    ]
    bad += [
        FieldViolation(f"scope.tools[{i}]", f"must be 1-{_MAX_TOOL} printable characters, no spaces")
        for i, tool in enumerate(scope.tools)
        if not (0 < len(tool) <= _MAX_TOOL and tool.isprintable() and not any(c.isspace() for c in tool))
    ]
    if bad:
        raise InvalidArgument(bad)
    return GrantScope(
        tuple(sorted({m.upper() for m in scope.methods})),
        tuple(sorted(set(scope.path_prefixes))),
        tuple(sorted(set(scope.tools))),
    )
