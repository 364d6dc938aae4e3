"""mTLS identity, roles and tenant isolation (invariants 3 and 6)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from tests.conftest import Running, client_cert
from tests.helpers import EXECUTOR, EXECUTOR_B, db_request, rpc_error

ADMIN = "spiffe://broker.local/tenant/default/admin/cli"
SERVING = health_pb2.HealthCheckResponse.SERVING


async def test_no_client_certificate_is_refused_at_the_handshake(running: Running) -> None:
    for port in (running.broker.admin_port, running.broker.resolve_port):
        channel = running.channel(None, port)
        stub = broker_pb2_grpc.AdminServiceStub(channel)
        error = await rpc_error(stub.ListConnections(pb.ListConnectionsRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel)
        error = await rpc_error(health.Check(health_pb2.HealthCheckRequest(), timeout=5))
        assert error.code() == grpc.StatusCode.UNAVAILABLE


async def test_certificate_from_another_ca_is_refused(running: Running) -> None:
    error = await rpc_error(
        running.admin("other_ca_admin").ListConnections(pb.ListConnectionsRequest(), timeout=5)
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("who", ["no_spiffe", "foreign_domain", "two_uris", "ca_certificate"])
async def test_certificate_without_an_accepted_spiffe_id_is_unauthenticated(
    running: Running, who: str
) -> None:
    error = await rpc_error(running.admin(who).ListConnections(pb.ListConnectionsRequest()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_wrong_role_is_permission_denied(running: Running) -> None:
    # An executor certificate on the admin listener.
    as_executor = broker_pb2_grpc.AdminServiceStub(
        running.channel(running.identities["executor"], running.broker.admin_port)
    )
    error = await rpc_error(as_executor.ListConnections(pb.ListConnectionsRequest()))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # An admin certificate on the resolve listener.
    as_admin = broker_pb2_grpc.ResolveServiceStub(
        running.channel(running.identities["admin"], running.broker.resolve_port)
    )
    error = await rpc_error(as_admin.Resolve(pb.ResolveRequest(name="x")))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # Both refusals are audited, for the caller's tenant, with the method they tried.
    page = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="rpc.denied"))
    seen = {(e.actor, e.outcome, e.reason, e.details["method"]) for e in page.events}
    assert seen == {
        (EXECUTOR, "denied", "wrong_role", "ListConnections"),
        (ADMIN, "denied", "wrong_role", "Resolve"),
    }


async def test_each_listener_serves_only_its_own_services_whatever_was_called_before(
    running: Running,
) -> None:
    """Invariant 9: the handler a listener built for a call never answers on the other listener."""
    admin_port, resolve_port = running.broker.admin_port, running.broker.resolve_port
    created = await running.admin().CreateConnection(db_request(name="cross-served", password="hunter2"))
    await running.admin().GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))

    async def every_service_on_the_wrong_port() -> None:
        # Each with the identity that the service accepts on its own port: only the port is wrong.
        admin_on_resolve = broker_pb2_grpc.AdminServiceStub(
            running.channel(running.identities["admin"], resolve_port)
        )
        resolve_on_admin = broker_pb2_grpc.ResolveServiceStub(
            running.channel(running.identities["executor"], admin_port)
        )
        proxy_on_admin = broker_pb2_grpc.ProxyServiceStub(
            running.channel(running.identities["executor"], admin_port)
        )
        wrong = {
            "AdminService on the resolve port": lambda: admin_on_resolve.ListConnections(
                pb.ListConnectionsRequest()
            ),
            "ProxyService on the admin port": lambda: proxy_on_admin.ProxyHttp(
                pb.ProxyHttpRequest(connection_id=created.id, method="GET", path="/")
            ),
            "ResolveService on the admin port": lambda: resolve_on_admin.Resolve(
                pb.ResolveRequest(connection_id=created.id)
            ),
            "reflection on the resolve port": lambda: running.reflected_services(resolve_port, ask=False),
        }
        for what, call in wrong.items():
            error = await rpc_error(call())
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED, what

    await every_service_on_the_wrong_port()  # nothing called yet on either port
    # Warm every service on its own port...
    assert (await running.admin().ListConnections(pb.ListConnectionsRequest())).connections
    assert (await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))).secrets
    assert "broker.v1.AdminService" in await running.reflected_services(admin_port)
    # ...and none of them answers on the other one.
    await every_service_on_the_wrong_port()
    # Health answers on both: each listener reports its own service.
    for port in (admin_port, resolve_port):
        health = health_pb2_grpc.HealthStub(running.channel(running.identities["executor"], port))
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING


async def test_health_reports_both_services(running: Running) -> None:
    for port, service in (
        (running.broker.admin_port, "broker.v1.AdminService"),
        (running.broker.resolve_port, "broker.v1.ResolveService"),
    ):
        health = health_pb2_grpc.HealthStub(running.channel(running.identities["executor"], port))
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_another_tenants_ids_look_exactly_like_unknown_ids(running: Running) -> None:
    mine = await running.admin().CreateConnection(db_request(name="shared-name"))
    theirs = running.admin("admin_b")
    # The same name is free in the other tenant.
    their_own = await theirs.CreateConnection(db_request(name="shared-name"))
    assert (await theirs.ListConnections(pb.ListConnectionsRequest())).connections == [their_own]

    unknown = "conn_00000000000000000000000000"
    calls = {
        "get": lambda cid: theirs.GetConnection(pb.GetConnectionRequest(id=cid)),
        "update": lambda cid: theirs.UpdateConnection(pb.UpdateConnectionRequest(id=cid, name="stolen")),
        "delete": lambda cid: theirs.DeleteConnection(pb.DeleteConnectionRequest(id=cid)),
        "restore": lambda cid: theirs.RestoreConnection(pb.RestoreConnectionRequest(id=cid)),
        "purge": lambda cid: theirs.PurgeConnection(pb.PurgeConnectionRequest(id=cid)),
        "revoke": lambda cid: theirs.RevokeConnection(pb.RevokeConnectionRequest(id=cid)),
        "grant": lambda cid: theirs.GrantAccess(
            pb.GrantAccessRequest(connection_id=cid, principal=EXECUTOR_B)
        ),
        "ungrant": lambda cid: theirs.RevokeAccess(
            pb.RevokeAccessRequest(connection_id=cid, principal=EXECUTOR_B)
        ),
    }
    for name, call in calls.items():
        cross = await rpc_error(call(mine.id))
        missing = await rpc_error(call(unknown))
        assert cross.code() == missing.code() == grpc.StatusCode.NOT_FOUND, name
        assert cross.details().replace(mine.id, "ID") == missing.details().replace(unknown, "ID"), name
    assert (await theirs.ListGrants(pb.ListGrantsRequest(connection_id=mine.id))).grants == []
    assert (await theirs.ListAuditEvents(pb.ListAuditEventsRequest(connection_id=mine.id))).events == []
    # Nothing of tenant A changed.
    assert await running.admin().GetConnection(pb.GetConnectionRequest(id=mine.id)) == mine
    # Tenant B's executor, even granted in B, cannot resolve A's connection.
    error = await rpc_error(running.resolver("executor_b").Resolve(pb.ResolveRequest(connection_id=mine.id)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_connection_that_never_handshakes_is_closed(make_broker: Any) -> None:
    """Without a deadline on the handshake (gRPC's is 120 s), anyone who can reach a port holds
    sockets, and the broker's file descriptors, without ever presenting a certificate."""
    running: Running = await make_broker(handshake_timeout_seconds=1.0)
    loop = asyncio.get_running_loop()
    began = loop.time()
    silent = [
        await asyncio.open_connection("127.0.0.1", port)
        for port in (running.broker.admin_port, running.broker.resolve_port)
    ]
    for reader, writer in silent:
        async with asyncio.timeout(6):
            assert await reader.read() == b""  # the server closed it
        writer.close()
    assert loop.time() - began >= 0.9
    # A client that does handshake is served as before.
    page = await running.admin().ListConnections(pb.ListConnectionsRequest(), timeout=5)
    assert list(page.connections) == []


async def test_a_certificate_that_expires_on_an_open_connection_stops_working(running: Running) -> None:
    """The TLS layer checks a certificate once, when the connection opens; a short-lived one that
    expires while its connection stays open must not go on identifying its holder."""
    not_after = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)).replace(microsecond=0)
    short_lived = client_cert(
        running.pki.ca, running.pki.ca_key, x509.UniformResourceIdentifier(ADMIN), not_after
    )
    channel = running.channel(short_lived, running.broker.admin_port)
    stub = broker_pb2_grpc.AdminServiceStub(channel)
    await stub.ListConnections(pb.ListConnectionsRequest(), timeout=5)  # valid: served
    await asyncio.sleep((not_after - dt.datetime.now(dt.UTC)).total_seconds() + 1.2)
    # The same connection (nothing made the channel reconnect), past the certificate's end.
    assert channel.get_state() == grpc.ChannelConnectivity.READY
    error = await rpc_error(stub.ListConnections(pb.ListConnectionsRequest(), timeout=5))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == (
        f"the client certificate expired at {not_after:%Y-%m-%dT%H:%M:%SZ}; connect again with a renewed one"
    )
    # A new connection with it fails at the handshake, as it always did.
    fresh = broker_pb2_grpc.AdminServiceStub(running.channel(short_lived, running.broker.admin_port))
    error = await rpc_error(fresh.ListConnections(pb.ListConnectionsRequest(), timeout=5))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
