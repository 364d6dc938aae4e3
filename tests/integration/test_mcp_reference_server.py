"""The broker against the MCP project's own reference server, written with the TypeScript SDK.

Our other MCP tests talk to tests/mcpserver.py, which is built with the Python SDK, the same SDK
the broker's client uses: a disagreement between the two SDKs would not show there. This server
(`@modelcontextprotocol/server-everything`, pinned) is what an MCP client is expected to work
with. It is installed from the npm registry once per machine into ~/.cache; without Node.js, or
when the install fails, these tests skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.json_format import MessageToDict

from broker._proto import broker_pb2 as pb
from broker.egress import EgressSettings
from tests.conftest import Running
from tests.helpers import EXECUTOR, free_port, rpc_error, struct
from tests.integration.test_proxy_api import proxy

pytestmark = pytest.mark.integration

PACKAGE = "@modelcontextprotocol/server-everything@2026.8.31"
CACHE = Path.home() / ".cache" / "broker-tests" / "mcp-everything-2026.8.31"
ENTRY = CACHE / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
# The server listens on every interface and has a tool that prints its environment: loaded
# before it, this makes its listen() bind loopback only.
LOOPBACK_ONLY = """
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" || /^[0-9]+$/.test(String(args[0]))) {
    if (typeof args[1] !== "string") args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};
"""
CALLABLE = ["echo", "get-sum", "get-structured-content"]
TASK_ONLY = "simulate-research-query"


@pytest.fixture(scope="module")
def installed() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js (node and npm) is not installed: the reference MCP server cannot run")
    if not ENTRY.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [npm, "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(CACHE), PACKAGE],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        if done.returncode != 0 or not ENTRY.exists():
            pytest.skip(f"npm could not install {PACKAGE}: {done.stderr.strip()[-500:]}")
    (CACHE / "loopback-only.cjs").write_text(LOOPBACK_ONLY)
    return ENTRY


@pytest.fixture(scope="module")
def reference(installed: Path) -> Iterator[Callable[[str], str]]:
    """The server's URL for a transport ("streamableHttp": /mcp, "sse": /sse), one process each."""
    processes: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}

    def url(transport: str) -> str:
        if transport not in urls:
            port = free_port()
            processes.append(
                subprocess.Popen(
                    ["node", "--require", str(CACHE / "loopback-only.cjs"), str(installed), transport],
                    env={"PATH": os.environ.get("PATH", ""), "PORT": str(port)},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            _wait_for_port(port)
            urls[transport] = f"http://127.0.0.1:{port}/" + (
                "mcp" if transport == "streamableHttp" else "sse"
            )
        return urls[transport]

    yield url
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"the reference MCP server did not listen on 127.0.0.1:{port} within 20 s")


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
