"""The broker against the MCP project's own reference server, written with the TypeScript SDK.

Our other MCP tests talk to tests/mcpserver.py, which is built with the Python SDK, the same SDK
the broker's client uses: a disagreement between the two SDKs would not show there. This server
(`@modelcontextprotocol/server-everything`, pinned) is what an MCP client is expected to work
with. It runs under Node.js, installed by tests/nodeservers.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf.json_format import MessageToDict

from broker._proto import broker_pb2 as pb
from broker.egress import EgressSettings
from tests import nodeservers
from tests.conftest import Running
from tests.helpers import EXECUTOR, free_port, rpc_error, struct
from tests.integration.test_proxy_api import proxy

pytestmark = pytest.mark.integration

PACKAGE, VERSION = "@modelcontextprotocol/server-everything", "2026.8.31"
CALLABLE = ["echo", "get-sum", "get-structured-content"]
TASK_ONLY = "simulate-research-query"


@pytest.fixture(scope="module")
def reference() -> Iterator[Callable[[str], str]]:
    """The server's URL for a transport ("streamableHttp": /mcp, "sse": /sse), one process each."""
    home = nodeservers.installed(PACKAGE, VERSION)
    entry = home / "node_modules" / PACKAGE / "dist" / "index.js"
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as running:

        def url(transport: str) -> str:
            if transport not in urls:
                port = free_port()
                running.enter_context(nodeservers.serving(home, [str(entry), transport], port))
                path = "mcp" if transport == "streamableHttp" else "sse"
                urls[transport] = f"http://127.0.0.1:{port}/{path}"
            return urls[transport]

        yield url


@pytest.fixture
async def running(make_broker: Callable[..., object]) -> Running:
    broker: Running = await make_broker(egress=EgressSettings(allow_loopback=True))  # type: ignore[misc]
    return broker


async def _approved(
    running: Running, name: str, url: str, transport: str
) -> tuple[str, pb.RefreshMcpToolsResponse]:
    """An `mcp` connection to `url` (its id), its tools approved, and CALLABLE granted in proxy mode."""
    admin = running.admin()
    created = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name=name,
            type="mcp",
            config=struct({"server_url": url, "transport": transport, "auth_type": "none"}),
            test_before_save=True,
        )
    )
    assert created.last_test.success, created.last_test
    refreshed = await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=created.id))
    await admin.GrantAccess(
        pb.GrantAccessRequest(
            connection_id=created.id,
            principal=EXECUTOR,
            mode=pb.GRANT_MODE_PROXY,
            scope=pb.GrantScope(tools=CALLABLE),
        )
    )
    return created.id, refreshed


def _call(running: Running, name: str, tool: str, **arguments: object) -> object:
    return proxy(running).CallMcpTool(
        pb.CallMcpToolRequest(name=name, tool=tool, arguments=struct(arguments))
    )


def _text(answer: pb.CallMcpToolResponse) -> str:
    return " ".join(MessageToDict(item).get("text", "") for item in answer.content)


async def test_streamable_http_discovery_and_calls(running: Running, reference: Callable[[str], str]) -> None:
    connection_id, refreshed = await _approved(
        running, "everything", reference("streamableHttp"), "streamable_http"
    )
    tools = {tool.name: tool for tool in refreshed.tools}
    assert set(CALLABLE) <= set(tools)
    assert tools["echo"].annotations.read_only_hint
    assert tools["get-structured-content"].HasField("output_schema")
    assert tools[TASK_ONLY].task_support == "required" and tools[TASK_ONLY].not_callable

    echoed = await _call(running, "everything", "echo", message="hello from the broker")
    assert not echoed.is_error and _text(echoed) == "Echo: hello from the broker"
    summed = await _call(running, "everything", "get-sum", a=2, b=3)
    assert "5" in _text(summed)
    weather = await _call(running, "everything", "get-structured-content", location="Chicago")
    assert not weather.is_error
    assert set(MessageToDict(weather.structured_content)) >= {"temperature", "conditions", "humidity"}

    # The TypeScript SDK answers arguments its schema refuses with a tool error, not a JSON-RPC one.
    refused = await _call(running, "everything", "get-structured-content", location="Atlantis")
    assert refused.is_error and "location" in _text(refused)

    granted = await proxy(running).ListGrantedMcpTools(pb.ListGrantedMcpToolsRequest(name="everything"))
    assert sorted(tool.name for tool in granted.tools) == sorted(CALLABLE)
    # The scope names only what was approved; a task-only tool cannot be granted at all.
    error = await rpc_error(
        running.admin().GrantAccess(
            pb.GrantAccessRequest(
                connection_id=connection_id,
                principal=EXECUTOR,
                mode=pb.GRANT_MODE_PROXY,
                scope=pb.GrantScope(tools=[TASK_ONLY]),
            )
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and TASK_ONLY in (error.details() or "")


async def test_the_older_http_sse_transport(running: Running, reference: Callable[[str], str]) -> None:
    await _approved(running, "everything-sse", reference("sse"), "sse")
    echoed = await _call(running, "everything-sse", "echo", message="over SSE")
    assert not echoed.is_error and _text(echoed) == "Echo: over SSE"
