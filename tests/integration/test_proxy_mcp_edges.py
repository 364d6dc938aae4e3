"""CallMcpTool against what real MCP servers do beyond answering with text: content of every kind,
notifications during a call, requests of the client (sampling, elicitation, roots), JSON-RPC
errors, answers over the byte cap, and tools slower than the caller's deadline. Found by driving
the broker against the TypeScript SDK's reference server; reproduced here with the Python SDK's
server (tests/mcpserver.py), so no Node is needed."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import grpc
import mcp_types as types
import pytest
from google.protobuf.json_format import MessageToDict
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata

from broker._proto import broker_pb2 as pb
from broker.catalog import MAX_JSON_DEPTH
from broker.egress import EgressPolicy, EgressSettings
from broker.sensitive import SecretFields
from broker.testers import Target, run_discovery
from broker.testers import _mcp_client as mcp_tester
from tests import mcpserver
from tests.conftest import Running
from tests.helpers import EXECUTOR, base64_reveals, field_violations, rpc_error, struct
from tests.httpservers import Answer, Seen, serve
from tests.integration.test_proxy_api import proxy

TOKEN = "mcp-edge-token-Canary-5150"


def _text(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)])


async def _tools_connection(
    running: Running, server: mcpserver.McpTestServer, transport: str, **more: Any
) -> None:
    """An `mcp` connection named "edge" to `server`, its tools approved, granted in proxy mode."""
    admin = running.admin()
    url = server.sse_url if transport == "sse" else server.url
    config = {"server_url": url, "auth_type": "bearer", "transport": transport, **more}
    created = await admin.CreateConnection(
        pb.CreateConnectionRequest(name="edge", type="mcp", config=struct(config), secrets={"token": TOKEN})
    )
    await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=created.id))
    await admin.GrantAccess(
        pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY)
    )


def _related(ctx: ServerRequestContext[Any]) -> ServerMessageMetadata:
    return ServerMessageMetadata(related_request_id=ctx.request_id)


def _call(running: Running, tool: str, timeout: float | None = None, **arguments: Any) -> Any:
    request = pb.CallMcpToolRequest(name="edge", tool=tool, arguments=struct(arguments))
    return proxy(running).CallMcpTool(request, timeout=timeout)


async def _audited(running: Running) -> list[tuple[str, str]]:
    events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="mcp.call_tool"))
    return [(e.outcome, e.reason) for e in reversed(events.events)]


async def _started(make_broker: Callable[..., object], **egress: Any) -> Running:
    settings = EgressSettings(**{"allow_loopback": True, **egress})
    running: Running = await make_broker(egress=settings)  # type: ignore[misc]
    return running


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
async def test_a_tool_that_asks_the_client_for_sampling_elicitation_or_roots_is_refused_by_name(
    make_broker: Callable[..., object], transport: str
) -> None:
    """The broker has no model, user or roots: it tells the server so, by name, and the executor
    hears which feature the tool wanted (before: UNAVAILABLE "protocol_error")."""
    running = await _started(make_broker)
    told: list[str] = []

    async def sample(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text="hi"))
        request = types.CreateMessageRequest(
            params=types.CreateMessageRequestParams(messages=[message], max_tokens=5)
        )
        try:  # `send_request`: the SDK's `create_message` warns that sampling is deprecated
            await ctx.session.send_request(request, types.CreateMessageResult, metadata=_related(ctx))
        except MCPError as refused:
            told.append(refused.message)
            raise
        return _text("sampled")

    async def elicit(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        schema: dict[str, Any] = {"type": "object", "properties": {"name": {"type": "string"}}}
        await ctx.session.elicit_form("Your name?", schema, related_request_id=ctx.request_id)
        return _text("elicited")

    async def roots(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        await ctx.session.send_request(types.ListRootsRequest(), types.ListRootsResult)
        return _text("rooted")

    behaviours = {"sample": sample, "elicit": elicit, "roots": roots}
    with mcpserver.running(token=TOKEN, tool_count=1, behaviours=behaviours) as server:
        await _tools_connection(running, server, transport)
        for tool, feature in [
            ("sample", "sampling (sampling/createMessage)"),
            ("elicit", "elicitation (elicitation/create)"),
            ("roots", "roots (roots/list)"),
        ]:
            error = await rpc_error(_call(running, tool, timeout=20))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
            assert f"the tool asked the client for {feature}" in (error.details() or "")
            assert "do not support" in (error.details() or "")
    assert told == [
        "sampling (sampling/createMessage) is not supported: the client is a secrets broker"
        " calling tools for an executor, with no model, user or roots to offer"
    ]
    assert await _audited(running) == [("failed", "client_feature_unsupported")] * 3


async def test_a_json_rpc_error_for_the_call_is_told_scrubbed_and_bad_arguments_name_the_field(
    make_broker: Callable[..., object],
) -> None:
    """The server answered (before: UNAVAILABLE "protocol_error", as if it had not)."""
    running = await _started(make_broker)

    async def raises(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        raise RuntimeError(f"database down, token {TOKEN}")

    async def picky(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        raise MCPError(code=types.INVALID_PARAMS, message=f"x must be a number\n(auth {TOKEN})")

    # -32000 and -32001 are JSON-RPC's generic server errors too, not only the SDK's own codes for a
    # closed connection and a timeout: sent by the server, they answered the call.
    async def generic(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        raise MCPError(code=types.CONNECTION_CLOSED, message="quota exceeded for this project")

    async def upstream(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        raise MCPError(code=types.REQUEST_TIMEOUT, message="the search backend timed out")

    behaviours = {"raises": raises, "picky": picky, "generic": generic, "upstream": upstream}
    with mcpserver.running(token=TOKEN, tool_count=1, behaviours=behaviours) as server:
        await _tools_connection(running, server, "streamable_http")
        failed = await rpc_error(_call(running, "raises", timeout=20))
        refused = await rpc_error(_call(running, "picky", timeout=20, x="seven"))
        told = [await rpc_error(_call(running, tool, timeout=20)) for tool in ("generic", "upstream")]
    assert [(e.code(), e.details()) for e in told] == [
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "the MCP server answered the call with error -32000: quota exceeded for this project",
        ),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "the MCP server answered the call with error -32001: the search backend timed out",
        ),
    ]
    assert failed.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the MCP server answered the call with error" in (failed.details() or "")
    assert "database down, token [redacted]" in (failed.details() or "")
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(refused)["arguments"] == (
        f"the MCP server refused the arguments with error {types.INVALID_PARAMS}: x must be a number"
    )
    assert TOKEN not in str(failed.details()) + str(refused.details())
    # The only log line with the token is the test server's own (it runs in this process).
    logged = [line for line in running.logs.getvalue().splitlines() if TOKEN in line]
    assert all("handler for 'tools/call' raised" in line for line in logged), logged
    assert await _audited(running) == [
        ("failed", "mcp_error"),
        ("failed", "invalid_arguments"),
        ("failed", "mcp_error"),
        ("failed", "mcp_error"),
    ]


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
async def test_a_server_that_does_not_answer_in_time_is_no_answer_from_it(
    make_broker: Callable[..., object], transport: str
) -> None:
    """The SDK gives up on the call with the codes a server may send too (-32000, -32001) and a
    message of its own: that is a failure to reach the server, not an answer to tell."""
    running = await _started(make_broker)

    async def slow(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        await asyncio.sleep(4)
        return _text("too late")

    with mcpserver.running(token=TOKEN, tool_count=1, behaviours={"slow": slow}) as server:
        await _tools_connection(running, server, transport, timeout_seconds=1)
        error = await rpc_error(_call(running, "slow", timeout=20))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert "answered the call" not in (error.details() or "")
    [(outcome, reason)] = await _audited(running)
    assert outcome == "failed" and reason != "mcp_error"


@pytest.mark.parametrize("transport", ["streamable_http", "sse"])
async def test_an_answer_over_the_byte_cap_names_the_limit(
    make_broker: Callable[..., object], transport: str
) -> None:
    """Before: UNAVAILABLE "unexpected_response", which says neither what nor which setting."""
    running = await _started(make_broker, max_response_bytes=64 * 1024)

    async def big(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        return _text("z" * int(arguments["n"]))

    with mcpserver.running(token=TOKEN, tool_count=1, behaviours={"big": big}) as server:
        await _tools_connection(running, server, transport)
        assert (await _call(running, "big", timeout=20, n=1000)).content[0]["text"] == "z" * 1000
        error = await rpc_error(_call(running, "big", timeout=20, n=200_000))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        "the MCP server's answer was over the broker's limit of 65536 bytes ([egress] max_response_bytes)"
    )
    assert await _audited(running) == [("allowed", ""), ("failed", "answer_too_large")]


async def test_a_tool_call_cut_short_by_the_callers_deadline_is_audited_and_not_an_internal_error(
    make_broker: Callable[..., object],
) -> None:
    """The tool was called with the credential, so the call is audited even though no answer is
    sent (before: no audit record, and an `unexpected_error` traceback with INTERNAL)."""
    running = await _started(make_broker)
    called = asyncio.Event()

    async def slow(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        called.set()
        await asyncio.sleep(3)
        return _text("too late")

    with mcpserver.running(token=TOKEN, tool_count=1, behaviours={"slow": slow}) as server:
        await _tools_connection(running, server, "streamable_http")
        error = await rpc_error(_call(running, "slow", timeout=1.0))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert [name for name, _ in server.calls] == ["slow"]
        for _ in range(50):  # the audit append may finish after the caller's own deadline fired
            if await _audited(running):
                break
            await asyncio.sleep(0.05)
    [(outcome, reason)] = await _audited(running)
    assert outcome == "failed" and reason in ("deadline_exceeded", "cancelled")
    assert "unexpected_error" not in running.logs.getvalue()


async def test_a_proxied_http_call_cut_short_by_the_callers_deadline_is_audited(
    make_broker: Callable[..., object],
) -> None:
    running = await _started(make_broker)

    def slow(seen: Seen) -> Answer:
        time.sleep(2)
        return Answer.json({"late": True})

    with serve(slow) as upstream:
        admin = running.admin()
        config = {"base_url": upstream.url, "auth_type": "bearer"}
        created = await admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="api", type="http", config=struct(config), secrets={"token": TOKEN}
            )
        )
        await admin.GrantAccess(
            pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY)
        )
        request = pb.ProxyHttpRequest(name="api", method="GET", path="/slow")
        error = await rpc_error(proxy(running).ProxyHttp(request, timeout=1.0))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        events: list[Any] = []
        for _ in range(50):
            listed = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="connection.proxy"))
            events = list(listed.events)
            if events:
                break
            await asyncio.sleep(0.05)
    assert [(e.outcome, e.reason) for e in events] in (
        [("failed", "deadline_exceeded")],
        [("failed", "cancelled")],
    )
    assert "unexpected_error" not in running.logs.getvalue()


async def test_content_of_every_kind_and_notifications_during_the_call_come_through(
    make_broker: Callable[..., object],
) -> None:
    """Images, audio, embedded resources (text and blob), resource links and annotations pass
    through as the server sent them, scrubbed; progress, log and list-changed notifications sent
    during the call change nothing."""
    running = await _started(make_broker)

    async def kinds(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        for step in range(3):
            await ctx.session.send_progress_notification(
                "unasked", step, 3, related_request_id=ctx.request_id
            )
        log = types.LoggingMessageNotificationParams(level="info", data=f"using {TOKEN}")
        await ctx.session.send_notification(
            types.LoggingMessageNotification(params=log), related_request_id=ctx.request_id
        )
        await ctx.session.send_tool_list_changed()
        return types.CallToolResult(
            content=[
                types.ImageContent(
                    type="image",
                    data="aGVsbG8=",
                    mime_type="image/png",
                    annotations=types.Annotations(audience=["user"], priority=0.5),
                ),
                types.AudioContent(type="audio", data="aGVsbG8=", mime_type="audio/wav"),
                types.EmbeddedResource(
                    type="resource",
                    resource=types.TextResourceContents(
                        uri="file:///a", text=f"key {TOKEN}", mime_type="text/plain"
                    ),
                ),
                types.EmbeddedResource(
                    type="resource", resource=types.BlobResourceContents(uri="file:///b", blob="AAEC")
                ),
                types.ResourceLink(type="resource_link", uri="file:///c", name="c", mime_type="text/plain"),
            ],
            structured_content={"temperature": 21.5, "conditions": "dry"},
        )

    with mcpserver.running(token=TOKEN, tool_count=1, behaviours={"kinds": kinds}) as server:
        await _tools_connection(running, server, "streamable_http")
        answer = await _call(running, "kinds", timeout=20)
    image, audio, text, blob, link = (MessageToDict(item) for item in answer.content)
    assert image == {
        "type": "image",
        "data": "aGVsbG8=",
        "mimeType": "image/png",
        "annotations": {"audience": ["user"], "priority": 0.5},
    }
    assert audio == {"type": "audio", "data": "aGVsbG8=", "mimeType": "audio/wav"}
    assert text["resource"] == {"uri": "file:///a", "text": "key [redacted]", "mimeType": "text/plain"}
    assert blob["resource"] == {"uri": "file:///b", "blob": "AAEC"}
    assert link == {"type": "resource_link", "uri": "file:///c", "name": "c", "mimeType": "text/plain"}
    assert MessageToDict(answer.structured_content) == {"temperature": 21.5, "conditions": "dry"}
    assert not answer.is_error


async def test_a_tool_result_echoing_the_token_nested_or_inside_base64_gives_nothing_away(
    make_broker: Callable[..., object],
) -> None:
    running = await _started(make_broker)

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    claim = json.dumps({"t": TOKEN})

    async def leaky(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        return types.CallToolResult(
            content=[
                types.ImageContent(type="image", data=b64(f"x{TOKEN}y"), mime_type="image/png"),
                types.EmbeddedResource(
                    type="resource",
                    resource=types.BlobResourceContents(
                        uri="file:///req",
                        blob=b64(f"GET / HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"),
                    ),
                ),
                types.TextContent(type="text", text=f"jwt-ish {b64(claim).rstrip('=')}"),
            ],
            structured_content={"deep": {"list": [{"token": TOKEN}, b64(f"ab{TOKEN}")]}, TOKEN: 1},
        )

    with mcpserver.running(token=TOKEN, tool_count=1, behaviours={"leaky": leaky}) as server:
        await _tools_connection(running, server, "streamable_http")
        answer = await _call(running, "leaky", timeout=20)
    said = str(MessageToDict(answer))
    assert TOKEN not in said and not base64_reveals(said, TOKEN)
    assert MessageToDict(answer.structured_content)["deep"]["list"][0] == {"token": "[redacted]"}
    assert await _audited(running) == [("allowed", "")]


async def test_a_streamed_call_cut_short_by_the_callers_deadline_is_audited(
    make_broker: Callable[..., object],
) -> None:
    """A slow head (the upstream has the request, with the credential) and a slow body: both
    calls are audited, as failed, and neither is an internal error."""
    running = await _started(make_broker)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        path = (await reader.readline()).split()[1]
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        if path == b"/slow-head":
            await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()  # slow-loris: the rest of the body never comes in time
        writer.close()

    release = asyncio.Event()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        admin = running.admin()
        config = {"base_url": f"http://127.0.0.1:{port}", "auth_type": "bearer"}
        created = await admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="api", type="http", config=struct(config), secrets={"token": TOKEN}
            )
        )
        await admin.GrantAccess(
            pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY)
        )
        for path in ("/slow-head", "/slow-body"):
            request = pb.ProxyHttpRequest(name="api", method="GET", path=path)
            with pytest.raises(grpc.aio.AioRpcError) as cut:
                async for _ in proxy(running).ProxyHttpStream(request, timeout=1.0):
                    pass
            assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, path
        events: list[Any] = []
        for _ in range(60):
            listed = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="connection.proxy"))
            events = list(reversed(listed.events))
            if len(events) >= 3:
                break
            await asyncio.sleep(0.05)
    finally:
        release.set()
        await asyncio.sleep(0.1)
        server.close()
        await server.wait_closed()
    outcomes = [(e.details["path"], e.outcome, e.reason) for e in events]
    assert outcomes[0] in (
        ("/slow-head", "failed", "deadline_exceeded"),
        ("/slow-head", "failed", "cancelled"),
    )
    assert outcomes[1] == ("/slow-body", "allowed", "")  # the head came: audited before it was sent
    assert outcomes[2] in (
        ("/slow-body", "failed", "deadline_exceeded"),
        ("/slow-body", "failed", "cancelled"),
    )
    assert "unexpected_error" not in running.logs.getvalue()


@pytest.mark.parametrize("coding", ["gzip", "gzip, gzip"])
async def test_a_compressed_answer_from_an_mcp_server_is_capped_decoded_not_inflated_whole(
    coding: str,
) -> None:
    """The byte cap counts what the SDK parses: a small compressed answer (one layer or two) is not
    inflated to hundreds of megabytes before anything looks at its size."""
    inner = gzip.compress(b" " * 90_000_000, compresslevel=9)  # ~90 kB: under the cap as sent
    bomb = gzip.compress(inner) if coding == "gzip, gzip" else inner

    def answers(seen: Seen) -> Answer:
        return Answer(200, bomb, {"Content-Type": "application/json", "Content-Encoding": coding})

    policy = EgressPolicy(EgressSettings(allow_loopback=True, max_response_bytes=100_000))
    with serve(answers) as server:
        target = Target(
            "mcp", "", {"server_url": f"{server.url}/mcp", "timeout_seconds": 10}, SecretFields({})
        )
        tracemalloc.start()
        try:
            result, tools = await run_discovery(mcp_tester.discover_tools, target, policy)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert not result.success and tools == []
    assert peak < 30_000_000


async def test_a_result_nested_deeper_than_an_executor_can_read_is_refused_and_audited(
    make_broker: Callable[..., object],
) -> None:
    """Protobuf readers stop at 100 levels of messages (a JSON level is two): the broker used to
    send such a result, audited as allowed, and the executor's SDK could not read it."""
    running = await _started(make_broker)

    def nested(depth: int) -> Any:
        value: Any = "leaf"
        for level in range(depth - 1):
            value = {"a": value} if level % 2 else [value]
        return value

    async def deep(ctx: ServerRequestContext[Any], arguments: dict[str, Any]) -> types.CallToolResult:
        return types.CallToolResult(
            content=[types.TextContent(type="text", text="x")],
            structured_content={"d": nested(int(arguments["depth"]))},
        )

    with mcpserver.running(token=TOKEN, tool_count=1, behaviours={"deep": deep}) as server:
        await _tools_connection(running, server, "streamable_http")
        fine = await _call(running, "deep", timeout=20, depth=MAX_JSON_DEPTH)
        error = await rpc_error(_call(running, "deep", timeout=20, depth=MAX_JSON_DEPTH + 1))
        far = await rpc_error(_call(running, "deep", timeout=20, depth=60))
    assert "leaf" in str(fine.structured_content)
    for refused in (error, far):
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"nested more than {MAX_JSON_DEPTH} levels" in (refused.details() or "")
    assert await _audited(running) == [
        ("allowed", ""),
        ("failed", "answer_too_deep"),
        ("failed", "answer_too_deep"),
    ]
