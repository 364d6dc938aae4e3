"""AdminService: thin adapters from proto requests to the connection, access and audit services."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from broker import catalog
from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.api import convert
from broker.api.interceptors import current_call
from broker.errors import FailedPrecondition, InvalidArgument
from broker.model import (
    AuditFilter,
    ConnectionFilter,
    ConnectionRecord,
    GrantFilter,
    LeaseFilter,
    SecurityEventFilter,
)
from broker.sensitive import SecretFields
from broker.service import (
    AccessService,
    AuditLog,
    ConnectionPatch,
    ConnectionService,
    DraftAuthorization,
    LeaseService,
    MasterKeys,
    Monitor,
    NewConnection,
    OAuthService,
    TestingService,
)


def _draft(draft: pb.ConnectionDraft) -> NewConnection:
    """A draft to test or discover with; `ConnectionService.draft_target` validates it."""
    return NewConnection(
        name=draft.name,
        type=draft.type,
        provider=draft.provider,
        config=convert.from_struct(draft.config, "draft.config"),
        secrets=SecretFields(draft.secrets),
    )


class AdminServicer(broker_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        connections: ConnectionService,
        access: AccessService,
        audit: AuditLog,
        tests: TestingService,
        oauth: OAuthService,
        leases: LeaseService,
        monitor: Monitor | None = None,
        keys: MasterKeys | None = None,
    ) -> None:
        self._leases = leases
        self._keys = keys
        self._monitor = monitor
        self._connections = connections
        self._access = access
        self._audit = audit
        self._tests = tests
        self._oauth = oauth

    def _summary(self, record: ConnectionRecord) -> pb.Connection:
        return convert.connection(record, stale=self._tests.is_stale(record))

    async def ListConnectionTypes(self, request: pb.ListConnectionTypesRequest, context: Any) -> Any:
        return pb.ListConnectionTypesResponse(
            types=[convert.connection_type(t) for t in catalog.list_types()]
        )

    async def CreateConnection(self, request: pb.CreateConnectionRequest, context: Any) -> pb.Connection:
        new = NewConnection(
            name=request.name,
            type=request.type,
            provider=request.provider,
            config=convert.from_struct(request.config, "config"),
            secrets=SecretFields(request.secrets),
            labels=dict(request.labels),
            test_before_save=request.test_before_save,
        )
        return self._summary(await self._connections.create(current_call(), new))

    async def GetConnection(self, request: pb.GetConnectionRequest, context: Any) -> pb.Connection:
        return self._summary(await self._connections.get(current_call(), request.id))

    async def ListConnections(self, request: pb.ListConnectionsRequest, context: Any) -> Any:
        filter = ConnectionFilter(
            type=request.type,
            provider=request.provider,
            status=convert.connection_status(request.status),
            labels=dict(request.labels),
            name_prefix=request.name_prefix,
        )
        records, token = await self._connections.list(
            current_call(), filter, request.page_size, request.page_token
        )
        return pb.ListConnectionsResponse(
            connections=[self._summary(r) for r in records], next_page_token=token
        )

    async def UpdateConnection(self, request: pb.UpdateConnectionRequest, context: Any) -> pb.Connection:
        patch = ConnectionPatch(
            id=request.id,
            name=request.name if request.HasField("name") else None,
            config=convert.from_struct(request.config, "config") if request.HasField("config") else None,
            secrets=SecretFields(request.secrets),
            clear_secrets=tuple(request.clear_secrets),
            labels=dict(request.labels.values) if request.HasField("labels") else None,
            etag=request.etag,
            test_before_save=request.test_before_save,
        )
        return self._summary(await self._connections.update(current_call(), patch))

    async def DeleteConnection(self, request: pb.DeleteConnectionRequest, context: Any) -> pb.Connection:
        return self._summary(await self._connections.delete(current_call(), request.id))

    async def RestoreConnection(self, request: pb.RestoreConnectionRequest, context: Any) -> pb.Connection:
        return self._summary(await self._connections.restore(current_call(), request.id))

    async def PurgeConnection(self, request: pb.PurgeConnectionRequest, context: Any) -> Any:
        await self._connections.purge(current_call(), request.id)
        return pb.PurgeConnectionResponse(id=request.id)

    async def RevokeConnection(self, request: pb.RevokeConnectionRequest, context: Any) -> pb.Connection:
        return self._summary(await self._connections.revoke(current_call(), request.id, request.reason))

    async def GrantAccess(self, request: pb.GrantAccessRequest, context: Any) -> pb.Grant:
        expires_at = convert.from_timestamp(request, "expires_at")
        grant = await self._access.grant(
            current_call(),
            request.connection_id,
            request.principal,
            expires_at,
            convert.grant_mode(request.mode),
            convert.grant_scope(request.scope),
        )
        return convert.grant(grant)

    async def RevokeAccess(self, request: pb.RevokeAccessRequest, context: Any) -> Any:
        removed = await self._access.revoke(
            current_call(),
            request.connection_id,
            request.principal,
            every_connection=request.every_connection,
        )
        return pb.RevokeAccessResponse(grants_removed=removed)

    async def ListGrants(self, request: pb.ListGrantsRequest, context: Any) -> Any:
        filter = GrantFilter(connection_id=request.connection_id, principal=request.principal)
        grants, token = await self._access.list(current_call(), filter, request.page_size, request.page_token)
        return pb.ListGrantsResponse(grants=[convert.grant(g) for g in grants], next_page_token=token)

    async def ListLeases(self, request: pb.ListLeasesRequest, context: Any) -> Any:
        filter = LeaseFilter(
            connection_id=request.connection_id,
            principal=request.principal,
            run_id=request.run_id,
            state=convert.lease_state(request.state),
        )
        leases, token = await self._leases.list(current_call(), filter, request.page_size, request.page_token)
        return pb.ListLeasesResponse(leases=[convert.lease(x) for x in leases], next_page_token=token)

    async def RevokeLeases(self, request: pb.RevokeLeasesRequest, context: Any) -> Any:
        filter = LeaseFilter(
            connection_id=request.connection_id,
            principal=request.principal,
            run_id=request.run_id,
            username_prefix=request.username_prefix,
            lease_id=request.lease_id,
        )
        revoked = await self._leases.revoke_matching(current_call(), filter, abandon=request.abandon)
        return pb.RevokeLeasesResponse(revoked=revoked)

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Any) -> Any:
        filter = AuditFilter(
            connection_id=request.connection_id,
            actor=request.actor,
            action=request.action,
            start_time=convert.from_timestamp(request, "start_time"),
            end_time=convert.from_timestamp(request, "end_time"),
        )
        events, token = await self._audit.list(current_call(), filter, request.page_size, request.page_token)
        return pb.ListAuditEventsResponse(
            events=[convert.audit_event(e) for e in events], next_page_token=token
        )

    async def VerifyAuditLog(self, request: pb.VerifyAuditLogRequest, context: Any) -> Any:
        report = await self._audit.verify(current_call())
        return pb.VerifyAuditLogResponse(
            ok=report.ok,
            events_checked=report.events_checked,
            first_broken_id=report.first_broken_id,
            problem=report.problem,
            seals_checked=report.seals_checked,
            seals_unverifiable=report.seals_unverifiable,
            unsealed_events=report.unsealed_events,
            sealed_through_id=report.newest_seal.last_id if report.newest_seal else 0,
        )

    async def ExportAuditEvents(
        self, request: pb.ExportAuditEventsRequest, context: Any
    ) -> AsyncIterator[pb.AuditEvent]:
        filter = AuditFilter(
            connection_id=request.connection_id,
            start_time=convert.from_timestamp(request, "start_time"),
            end_time=convert.from_timestamp(request, "end_time"),
        )
        async for event in self._audit.export(current_call(), filter):
            yield convert.audit_event(event)

    async def TestConnection(self, request: pb.TestConnectionRequest, context: Any) -> pb.TestResult:
        call = current_call()
        if request.WhichOneof("target") == "draft":
            target = self._connections.draft_target(_draft(request.draft))
            result = await self._tests.test_draft(call, target)
        else:
            result = await self._tests.test_stored(call, request.id)
        return convert.test_result(result)

    async def DiscoverMcpTools(self, request: pb.DiscoverMcpToolsRequest, context: Any) -> Any:
        call = current_call()
        if request.WhichOneof("target") == "draft":
            target = self._connections.draft_target(_draft(request.draft))
            result, tools = await self._tests.discover(call, target)
        else:
            result, tools = await self._tests.discover_stored(call, request.id)
        return pb.DiscoverMcpToolsResponse(
            result=convert.test_result(result), tools=[convert.mcp_tool(t) for t in tools]
        )

    async def RefreshMcpTools(self, request: pb.RefreshMcpToolsRequest, context: Any) -> Any:
        changes = await self._tests.refresh_tools(current_call(), request.id)
        return pb.RefreshMcpToolsResponse(
            result=convert.test_result(changes.result),
            tools=[convert.mcp_tool(t) for t in changes.tools],
            added=changes.added,
            removed=changes.removed,
            changed=changes.changed,
        )

    async def ListMcpTools(self, request: pb.ListMcpToolsRequest, context: Any) -> Any:
        tools, discovered_at = await self._tests.list_tools(current_call(), request.id)
        return pb.ListMcpToolsResponse(
            tools=[convert.mcp_tool(t) for t in tools], discovered_at=convert.timestamp(discovered_at)
        )

    async def BeginAuthorization(self, request: pb.BeginAuthorizationRequest, context: Any) -> Any:
        call = current_call()
        scopes = list(request.scopes)
        if request.WhichOneof("target") == "draft":
            draft = request.draft
            if draft.type not in ("", "oauth2"):
                raise InvalidArgument.field("draft.type", "must be oauth2")
            if not draft.name:
                raise InvalidArgument.field("draft.name", "is required: it names the connection to create")
            target = self._connections.draft_target(
                NewConnection(
                    name=draft.name,
                    type="oauth2",
                    provider=draft.provider,
                    config=convert.from_struct(draft.config, "draft.config"),
                    secrets=SecretFields(draft.secrets),
                    labels=dict(request.labels),
                )
            )
            pending = DraftAuthorization(
                draft.name, target.provider, dict(target.config), target.secrets, dict(request.labels)
            )
            url, state, expires_at = await self._oauth.begin(
                call, request.redirect_uri, scopes, draft=pending
            )
        else:
            url, state, expires_at = await self._oauth.begin(
                call, request.redirect_uri, scopes, connection_id=request.connection_id
            )
        return pb.BeginAuthorizationResponse(
            authorization_url=url, state=state, expires_at=convert.timestamp(expires_at)
        )

    async def CompleteAuthorization(self, request: pb.CompleteAuthorizationRequest, context: Any) -> Any:
        completed = await self._oauth.complete(current_call(), request.state, request.code, request.iss)
        return self._summary(completed)

    # -------------------------------------------------------------- security

    def _security(self) -> Monitor:
        if self._monitor is None:
            raise FailedPrecondition("the security monitor is not running on this broker")
        return self._monitor

    async def ReinstateConnection(
        self, request: pb.ReinstateConnectionRequest, context: Any
    ) -> pb.Connection:
        record = await self._security().reinstate(current_call(), request.id, request.reason)
        return self._summary(record)

    async def ListSecurityEvents(self, request: pb.ListSecurityEventsRequest, context: Any) -> Any:
        filter = SecurityEventFilter(
            rule=request.rule,
            connection_id=request.connection_id,
            principal=request.principal,
            start_time=convert.from_timestamp(request, "start_time"),
            end_time=convert.from_timestamp(request, "end_time"),
        )
        monitor = self._security()
        events, token = await monitor.list(current_call(), filter, request.page_size, request.page_token)
        return pb.ListSecurityEventsResponse(
            events=[convert.security_event(e) for e in events], next_page_token=token
        )

    # ----------------------------------------------------------- master keys

    async def RotateMasterKey(self, request: pb.RotateMasterKeyRequest, context: Any) -> Any:
        if self._keys is None:
            raise FailedPrecondition("master-key rotation is not available on this broker")
        active, previous, deks = await self._keys.rotate(current_call())
        return pb.RotateMasterKeyResponse(active_kek_id=active, previous_kek_id=previous, deks_by_kek=deks)
