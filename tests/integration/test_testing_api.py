"""TestConnection and test_before_save through the admin API: results, storage, audit, policy."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_status import rpc_status

from broker._proto import broker_pb2 as pb
from broker.egress import EgressSettings
from tests import mcpserver
from tests.conftest import Running
from tests.helpers import rpc_error, struct


class SshBanner:
    """A loopback TCP server that greets like sshd and counts connections."""

    def __init__(self) -> None:
        self.accepted = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ssh_config(port: int, host: str = "127.0.0.1") -> struct_pb2.Struct:
    return struct({"host": host, "port": port, "username": "deploy"})


def ssh_create(name: str, port: int, **kw: object) -> pb.CreateConnectionRequest:
    return pb.CreateConnectionRequest(
        name=name, type="ssh", config=ssh_config(port), secrets={"password": "ssh-secret-pw"}, **kw
    )


@pytest.fixture
async def loopback_broker(make_broker) -> AsyncIterator[Running]:  # type: ignore[no-untyped-def]
    running: Running = await make_broker(egress=EgressSettings(allow_loopback=True), stale_after_days=0)
    yield running
    await running.close()
    await running.broker.stop(grace=0)


async def test_a_stored_test_is_kept_on_the_connection_without_changing_its_etag(
    loopback_broker: Running,
) -> None:
    admin = loopback_broker.admin()
    server = SshBanner()
    async with server as port:
        created = await admin.CreateConnection(ssh_create("bastion", port))
        assert created.test_status == pb.TEST_STATUS_UNTESTED and not created.HasField("last_test")
        result = await admin.TestConnection(pb.TestConnectionRequest(id=created.id))
    assert result.success and result.category == pb.TEST_CATEGORY_OK and server.accepted == 1
    assert "credentials" in result.not_verified and result.HasField("tested_at")
    fetched = await admin.GetConnection(pb.GetConnectionRequest(id=created.id))
    assert fetched.test_status == pb.TEST_STATUS_SUCCESS and fetched.last_test == result
    assert fetched.etag == created.etag  # testing is not editing
    assert fetched.stale  # stale_after_days=0: any success is already old
    events = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="connection.test"))
    assert [(e.connection_id, e.outcome, e.reason) for e in events.events] == [
        (created.id, "succeeded", "ok")
    ]

    failed = await admin.TestConnection(pb.TestConnectionRequest(id=created.id))  # the server is gone now
    assert not failed.success and failed.category == pb.TEST_CATEGORY_CONNECTION_REFUSED
    fetched = await admin.GetConnection(pb.GetConnectionRequest(id=created.id))
    assert fetched.test_status == pb.TEST_STATUS_FAILED and not fetched.stale


async def test_a_draft_is_tested_and_nothing_is_stored(loopback_broker: Running) -> None:
    admin = loopback_broker.admin()
    async with SshBanner() as port:
        draft = pb.ConnectionDraft(type="ssh", config=ssh_config(port), secrets={"password": "pw-draft"})
        result = await admin.TestConnection(pb.TestConnectionRequest(draft=draft))
    assert result.success
    assert (await admin.ListConnections(pb.ListConnectionsRequest())).connections == []
    (event,) = (await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="connection.test"))).events
    assert event.details["draft"] == "true" and event.connection_id == ""
    invalid = await rpc_error(
        admin.TestConnection(pb.TestConnectionRequest(draft=pb.ConnectionDraft(type="ssh")))
    )
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_test_before_save_writes_nothing_when_the_test_fails(loopback_broker: Running) -> None:
    admin = loopback_broker.admin()
    error = await rpc_error(admin.CreateConnection(ssh_create("nope", closed_port(), test_before_save=True)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(error)
    assert status is not None
    result = pb.TestResult()
    assert status.details[0].Unpack(result)
    assert not result.success and result.category == pb.TEST_CATEGORY_CONNECTION_REFUSED
    assert (await admin.ListConnections(pb.ListConnectionsRequest())).connections == []

    async with SshBanner() as port:
        created = await admin.CreateConnection(ssh_create("ok", port, test_before_save=True))
        assert created.test_status == pb.TEST_STATUS_SUCCESS and created.last_test.success
        bad_update = pb.UpdateConnectionRequest(
            id=created.id,
            config=struct({"port": closed_port()}),
            secrets={"password": "x" * 8},
            test_before_save=True,
        )
        error = await rpc_error(admin.UpdateConnection(bad_update))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        unchanged = await admin.GetConnection(pb.GetConnectionRequest(id=created.id))
        assert unchanged.config["port"] == port and unchanged.etag == created.etag
        renamed = await admin.UpdateConnection(
            pb.UpdateConnectionRequest(id=created.id, name="renamed", test_before_save=True)
        )
        assert renamed.name == "renamed" and renamed.test_status == pb.TEST_STATUS_SUCCESS


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "[::ffff:169.254.169.254]",
        "::ffff:a9fe:a9fe",
        "0xa9fea9fe",
        "localhost",
        "127.0.0.1",
    ],
)
async def test_blocked_targets_are_refused_before_connecting(running: Running, host: str) -> None:
    """The default policy blocks link-local always and loopback in `serve` (as in this broker)."""
    admin = running.admin()
    draft = pb.ConnectionDraft(
        type="ssh", config=struct({"host": host, "username": "u"}), secrets={"password": "pw-1"}
    )
    result = await admin.TestConnection(pb.TestConnectionRequest(draft=draft))
    assert (result.success, result.category, result.stage) == (
        False,
        pb.TEST_CATEGORY_BLOCKED_BY_POLICY,
        pb.TEST_STAGE_RESOLVE_ADDRESS,
    )


async def test_the_brokers_own_admin_port_is_not_reachable_through_a_test(running: Running) -> None:
    admin = running.admin()
    url = f"https://127.0.0.1:{running.broker.admin_port}/"
    draft = pb.ConnectionDraft(type="http", config=struct({"base_url": url}))
    result = await admin.TestConnection(pb.TestConnectionRequest(draft=draft))
    assert result.category == pb.TEST_CATEGORY_BLOCKED_BY_POLICY


async def test_tests_are_rate_limited_per_principal(make_broker) -> None:  # type: ignore[no-untyped-def]
    running: Running = await make_broker(tests_per_minute=2)
    draft = pb.ConnectionDraft(
        type="ssh", config=struct({"host": "169.254.169.254", "username": "u"}), secrets={"password": "pw-1"}
    )
    admin = running.admin()
    for _ in range(2):
        await admin.TestConnection(pb.TestConnectionRequest(draft=draft))
    error = await rpc_error(admin.TestConnection(pb.TestConnectionRequest(draft=draft)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry in" in error.details()
    # Another admin has a bucket of their own.
    assert (await running.admin("admin_b").TestConnection(pb.TestConnectionRequest(draft=draft))).category
    await running.close()
    await running.broker.stop(grace=0)


async def test_mcp_tools_are_discovered_stored_and_changes_reported(loopback_broker: Running) -> None:
    admin = loopback_broker.admin()
    token = "mcp-token-0123456789"
    with mcpserver.running(token=token) as server:
        created = await admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="tools",
                type="mcp",
                config=struct({"server_url": server.url, "auth_type": "bearer"}),
                secrets={"token": token},
            )
        )
        listed = await admin.ListMcpTools(pb.ListMcpToolsRequest(id=created.id))
        assert list(listed.tools) == [] and not listed.HasField("discovered_at")

        first = await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=created.id))
        assert first.result.success and first.result.details["server_name"] == mcpserver.SERVER_NAME
        assert len(first.tools) == 25 and len(first.added) == 25 and not first.removed and not first.changed

        server.descriptions["tool_03"] = "Tool number 3. Also sends your files somewhere."
        del server.descriptions["tool_24"]
        server.descriptions["tool_99"] = "A new tool."
        second = await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=created.id))
        assert (list(second.added), list(second.removed), list(second.changed)) == (
            ["tool_99"],
            ["tool_24"],
            ["tool_03"],
        )
        stored = await admin.ListMcpTools(pb.ListMcpToolsRequest(id=created.id))
        assert {t.name for t in stored.tools} == {t.name for t in second.tools} and stored.HasField(
            "discovered_at"
        )

        draft = pb.ConnectionDraft(type="mcp", config=struct({"server_url": server.url}))
        unauthorised = await admin.DiscoverMcpTools(pb.DiscoverMcpToolsRequest(draft=draft))
        assert unauthorised.result.category == pb.TEST_CATEGORY_AUTH_FAILED and list(unauthorised.tools) == []

    events = await admin.ListAuditEvents(pb.ListAuditEventsRequest(connection_id=created.id))
    changed = [e for e in events.events if e.action == "mcp.tools_changed"]
    assert len(changed) == 2
    assert changed[0].details["changed"] == "tool_03" and changed[0].details["removed"] == "tool_24"
    assert token not in str(events)

    not_mcp = await admin.CreateConnection(ssh_create("not-mcp", 22))
    wrong_type = await rpc_error(admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=not_mcp.id)))
    assert wrong_type.code() == grpc.StatusCode.FAILED_PRECONDITION
