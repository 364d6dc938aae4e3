"""Grant modes and scopes over the admin API: what is stored, shown and refused."""

from __future__ import annotations

import grpc

from broker._proto import broker_pb2 as pb
from broker.service.resolve import DENIED_MESSAGE
from tests.conftest import Running
from tests.helpers import EXECUTOR, db_request, field_violations, rpc_error, struct


async def audit_count(running: Running) -> int:
    events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))
    return len(events.events)


def api_request(name: str = "api") -> pb.CreateConnectionRequest:
    return pb.CreateConnectionRequest(
        name=name,
        type="http",
        config=struct({"base_url": "https://api.example.com", "auth_type": "bearer"}),
        secrets={"token": "tok-1234"},
    )


async def test_a_proxy_grant_with_a_scope_is_stored_listed_and_audited(running: Running) -> None:
    admin = running.admin()
    api = await admin.CreateConnection(api_request())
    scope = pb.GrantScope(methods=["post", "GET"], path_prefixes=["/v1/", "/user"])
    grant = await admin.GrantAccess(
        pb.GrantAccessRequest(connection_id=api.id, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY, scope=scope)
    )
    assert grant.mode == pb.GRANT_MODE_PROXY
    assert list(grant.scope.methods) == ["GET", "POST"]  # normalised
    assert list(grant.scope.path_prefixes) == ["/user", "/v1/"]
    listed = await admin.ListGrants(pb.ListGrantsRequest(connection_id=api.id))
    assert list(listed.grants) == [grant]
    [event] = (await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="grant.create"))).events
    assert event.details["mode"] == "proxy"
    assert event.details["scope_methods"] == "GET POST"

    # Granting again replaces mode and scope; a request without a mode is a RESOLVE grant.
    plain = await admin.GrantAccess(pb.GrantAccessRequest(connection_id=api.id, principal=EXECUTOR))
    assert plain.mode == pb.GRANT_MODE_RESOLVE and plain.scope == pb.GrantScope()
    assert list((await admin.ListGrants(pb.ListGrantsRequest(connection_id=api.id))).grants) == [plain]


async def test_a_grant_that_does_not_fit_its_connection_is_refused_and_changes_nothing(
    running: Running,
) -> None:
    admin = running.admin()
    db = await admin.CreateConnection(db_request())
    api = await admin.CreateConnection(api_request())
    before = await audit_count(running)
    refused = {
        "mode": pb.GrantAccessRequest(connection_id=db.id, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY),
        "scope": pb.GrantAccessRequest(
            connection_id=api.id, principal=EXECUTOR, scope=pb.GrantScope(methods=["GET"])
        ),
        "scope.tools": pb.GrantAccessRequest(
            connection_id=api.id,
            principal=EXECUTOR,
            mode=pb.GRANT_MODE_PROXY,
            scope=pb.GrantScope(tools=["search"]),
        ),
        "scope.path_prefixes[0]": pb.GrantAccessRequest(
            connection_id=api.id,
            principal=EXECUTOR,
            mode=pb.GRANT_MODE_PROXY,
            scope=pb.GrantScope(path_prefixes=["/v1/%2e%2e/admin"]),
        ),
    }
    for field, request in refused.items():
        error = await rpc_error(admin.GrantAccess(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(error), field
    unknown_mode = pb.GrantAccessRequest(connection_id=api.id, principal=EXECUTOR)
    unknown_mode.mode = 7  # type: ignore[assignment]
    assert "mode" in field_violations(await rpc_error(admin.GrantAccess(unknown_mode)))

    assert not (await admin.ListGrants(pb.ListGrantsRequest())).grants
    assert await audit_count(running) == before


async def test_a_proxy_grant_never_resolves_and_the_switch_takes_effect_at_once(running: Running) -> None:
    admin, resolver = running.admin(), running.resolver()
    api = await admin.CreateConnection(api_request())
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=api.id, principal=EXECUTOR))
    assert (await resolver.Resolve(pb.ResolveRequest(connection_id=api.id))).secrets["token"] == "tok-1234"

    # The RESOLVE grant is cached now; turning it into a PROXY grant must not leave it usable.
    proxy = pb.GrantAccessRequest(connection_id=api.id, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY)
    await admin.GrantAccess(proxy)
    for ref in (pb.ResolveRequest(connection_id=api.id), pb.ResolveRequest(name="api")):
        denied = await rpc_error(resolver.Resolve(ref))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        assert denied.details() == DENIED_MESSAGE  # looks like every other denial
        assert "tok-1234" not in str(denied.trailing_metadata())
    events = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="connection.resolve"))
    assert [(e.outcome, e.reason) for e in events.events[:2]] == [("denied", "proxy_only")] * 2
