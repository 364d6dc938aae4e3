"""What an MCP server says of a tool beside its name, description and input schema (title,
annotations, output schema, execution): kept through discovery, the store and both APIs, covered
by the approval's definition hash, and a tool that runs only as an MCP task is shown but never
called. Against the real loopback MCP server of tests/mcpserver.py."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict

from broker._proto import broker_pb2 as pb
from broker.egress import EgressSettings
from broker.testers.mcp import tool_definition_hash
from tests import mcpserver
from tests.conftest import Running
from tests.helpers import EXECUTOR, rpc_error, struct
from tests.integration.test_proxy_api import proxy

TOKEN = "mcp-meta-token-Canary-7713"
OUTPUT: dict[str, Any] = {"type": "object", "properties": {"rows": {"type": "integer"}}}
# What the server says of its tools (the rest, tool_02 among them, are plain).
METADATA: dict[str, dict[str, Any]] = {
    "tool_00": {
        "title": "Drop a table",
        "annotations": {"title": "Table dropper", "readOnlyHint": False, "destructiveHint": True},
        "output_schema": OUTPUT,
        "execution": {"taskSupport": "optional"},
        # Neither kept nor hashed: see `_mcp_client._to_tool`.
        "icons": [{"src": "https://icons.example/drop.svg"}],
        "meta": {"vendor/build": "1"},
    },
    "tool_01": {"annotations": {"readOnlyHint": True, "openWorldHint": False}},
    "tool_03": {"title": "Long export", "execution": {"taskSupport": "required"}},
}
# tool_02's definition hash as the broker computed it before it kept any metadata: an approval
# of a plain tool survives the upgrade (the test server's description and input schema).
PLAIN_TOOL_02 = "e6521d4f32cf445be0d15e7940daa5cb215e981408cd17d218b6ce537931a0de"


@pytest.fixture
async def running(make_broker: Callable[..., object]) -> Running:
    """A broker whose egress policy lets it reach the test MCP server on loopback."""
    broker: Running = await make_broker(egress=EgressSettings(allow_loopback=True))  # type: ignore[misc]
    return broker


async def _connection(running: Running, server: mcpserver.McpTestServer, *tools: str) -> str:
    """An `mcp` connection named "meta", its tools approved, granted in proxy mode to `tools`."""
    admin = running.admin()
    created = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="meta",
            type="mcp",
            config=struct({"server_url": server.url, "auth_type": "bearer"}),
            secrets={"token": TOKEN},
        )
    )
    await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=created.id))
    await admin.GrantAccess(
        pb.GrantAccessRequest(
            connection_id=created.id,
            principal=EXECUTOR,
            mode=pb.GRANT_MODE_PROXY,
            scope=pb.GrantScope(tools=list(tools)),
        )
    )
    return str(created.id)


def _call(running: Running, tool: str) -> Any:
    return proxy(running).CallMcpTool(
        pb.CallMcpToolRequest(name="meta", tool=tool, arguments=struct({"x": 1}))
    )


async def test_the_metadata_reaches_the_admin_answers_and_the_executors_listing(
    running: Running,
) -> None:
    admin = running.admin()
    with mcpserver.running(token=TOKEN, tool_count=4, metadata=METADATA) as server:
        conn = await _connection(running, server, "tool_00", "tool_01", "tool_02")
        answers = {
            "discover": (await admin.DiscoverMcpTools(pb.DiscoverMcpToolsRequest(id=conn))).tools,
            "refresh": (await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=conn))).tools,
            "list": (await admin.ListMcpTools(pb.ListMcpToolsRequest(id=conn))).tools,
        }
        granted = (await proxy(running).ListGrantedMcpTools(pb.ListGrantedMcpToolsRequest(name="meta"))).tools
    for where, tools in answers.items():
        by_name = {t.name: t for t in tools}
        assert list(by_name) == ["tool_00", "tool_01", "tool_02", "tool_03"], where
        assert by_name["tool_00"] == granted[0], where
        assert by_name["tool_01"] == granted[1], where
    drop, read, plain = granted  # tool_03 runs only as a task: not offered to the executor
    assert (drop.title, drop.task_support, drop.not_callable) == ("Drop a table", "optional", "")
    assert MessageToDict(drop.annotations) == {
        "title": "Table dropper",
        "readOnlyHint": False,  # set, and false: not the same as unset
        "destructiveHint": True,
    }
    assert MessageToDict(drop.output_schema) == OUTPUT
    assert not read.HasField("output_schema") and read.title == "" and read.task_support == ""
    assert read.annotations.read_only_hint and read.annotations.HasField("open_world_hint")
    assert not read.annotations.open_world_hint and not read.annotations.HasField("destructive_hint")
    assert not plain.HasField("annotations") and not plain.HasField("output_schema")
    assert plain.definition_hash == PLAIN_TOOL_02
    assert "icons" not in str(drop) and "vendor/build" not in str(drop)


async def test_a_changed_annotation_or_output_schema_voids_the_approval(
    running: Running,
) -> None:
    admin = running.admin()
    with mcpserver.running(token=TOKEN, tool_count=3, metadata=METADATA) as server:
        conn = await _connection(running, server)
        assert not (await _call(running, "tool_00")).is_error
        assert not (await _call(running, "tool_01")).is_error

        # A rug pull: the same tool, now saying it destroys; nothing else about it changed.
        server.metadata["tool_01"]["annotations"] = {"readOnlyHint": False, "destructiveHint": True}
        changed = await rpc_error(_call(running, "tool_01"))
        assert changed.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tool definition changed since it was approved" in (changed.details() or "")
        # Only the result's schema changes.
        server.metadata["tool_00"]["output_schema"] = {
            "type": "object",
            "properties": {"rows": {"type": "string"}},
        }
        changed = await rpc_error(_call(running, "tool_00"))
        assert changed.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tool definition changed since it was approved" in (changed.details() or "")
        # What is not kept is not part of the approval either.
        server.metadata["tool_00"].update(output_schema=OUTPUT, icons=None, meta={"vendor/build": "2"})
        assert not (await _call(running, "tool_00")).is_error
        assert [name for name, _ in server.calls] == ["tool_00", "tool_01", "tool_00"]

        refreshed = await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=conn))
        assert list(refreshed.changed) == ["tool_01"]
        assert not (await _call(running, "tool_01")).is_error  # approved again by the refresh

    await running.broker.services.monitor.settle()
    events = await admin.ListSecurityEvents(pb.ListSecurityEventsRequest(rule="mcp_tool_changed"))
    assert sorted(e.details["tool"] for e in events.events) == ["tool_00", "tool_01"]


async def test_a_tool_that_runs_only_as_a_task_is_shown_but_never_granted_or_called(
    running: Running,
) -> None:
    admin = running.admin()
    with mcpserver.running(token=TOKEN, tool_count=4, metadata=METADATA) as server:
        conn = await _connection(running, server)  # unscoped: every approved tool
        listed = {t.name: t for t in (await admin.ListMcpTools(pb.ListMcpToolsRequest(id=conn))).tools}
        task = listed["tool_03"]
        assert (task.title, task.task_support) == ("Long export", "required")
        assert "does not run MCP tasks" in task.not_callable

        refused = await rpc_error(_call(running, "tool_03"))
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tool_03" in (refused.details() or "") and "MCP task" in (refused.details() or "")
        granted = await proxy(running).ListGrantedMcpTools(pb.ListGrantedMcpToolsRequest(name="meta"))
        assert [t.name for t in granted.tools] == ["tool_00", "tool_01", "tool_02"]

        scoped = pb.GrantScope(tools=["tool_02", "tool_03"])
        grant = await rpc_error(
            admin.GrantAccess(
                pb.GrantAccessRequest(
                    connection_id=conn, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY, scope=scoped
                )
            )
        )
        assert grant.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tool_03" in (grant.details() or "") and "MCP task" in (grant.details() or "")
        assert server.calls == []

    grants = await admin.ListGrants(pb.ListGrantsRequest(connection_id=conn))
    [kept] = grants.grants
    assert list(kept.scope.tools) == []  # the refused grant changed nothing
    audited = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="mcp.call_tool"))
    assert [(e.outcome, e.reason) for e in audited.events] == [("failed", "task_required")]


async def test_after_an_upgrade_only_the_tools_that_carry_metadata_need_approving_again(
    running: Running,
) -> None:
    admin = running.admin()
    with mcpserver.running(token=TOKEN, tool_count=3, metadata=METADATA) as server:
        conn = await _connection(running, server)
        # The rows as an older broker left them, migrated: no metadata, hashed without it.
        with sqlite3.connect(running.broker.settings.storage_path, timeout=10) as db:
            for name, description in (("tool_01", "Tool number 1."), ("tool_02", "Tool number 2.")):
                db.execute(
                    "UPDATE mcp_tools SET title = '', annotations = NULL, output_schema = NULL,"
                    " execution = NULL, definition_hash = ? WHERE connection_id = ? AND name = ?",
                    (tool_definition_hash(name, description, mcpserver.SCHEMA), conn, name),
                )
        assert not (await _call(running, "tool_02")).is_error  # plain: its approval holds
        changed = await rpc_error(_call(running, "tool_01"))  # it has hints the approval did not see
        assert "tool definition changed since it was approved" in (changed.details() or "")
        refreshed = await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=conn))
        assert list(refreshed.changed) == ["tool_01"]
        assert not (await _call(running, "tool_01")).is_error
