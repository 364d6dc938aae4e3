"""MCP tool servers: connect, initialize, list every tool, close the session.

Built on the `mcp` SDK's client (`ClientSession` over its Streamable HTTP or
legacy HTTP+SSE transport); all of its HTTP traffic goes through the egress
policy by way of `EgressTransport`. `discover_tools` returns the result and
the tools, each with a hash of its definition so a silent change is visible;
`test_mcp` is the same steps as a connection tester.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import httpx2
import mcp_types as types
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from broker.catalog import MAX_JSON_DEPTH
from broker.egress import Blocked, DnsFailure, EgressPolicy
from broker.egress.http import http_client
from broker.model import McpTool, TestCategory, TestResult, TestStage, json_depth
from broker.scrub import Scrubber
from broker.testers._mcp_transport import EgressTransport, ExchangeLog
from broker.testers.base import Target, TestFailure, passed
from broker.testers.mcp import ToolCall, ToolChanged, ToolError, hashed, scrub_tools, tool_definition_hash

# Bounds on one listing: a server that pages forever must not hold a test open.
MAX_PAGES = 50
MAX_TOOLS = 5000

_CLIENT_INFO = types.Implementation(name="broker", version="1")
_Streams = tuple[Any, Any]
# What a server may ask of its client, which the broker has none of: a model, a user, roots.
_CLIENT_FEATURES: tuple[tuple[type[Any], str], ...] = (
    (types.CreateMessageRequest, "sampling (sampling/createMessage)"),
    (types.ElicitRequest, "elicitation (elicitation/create)"),
    (types.ListRootsRequest, "roots (roots/list)"),
)


class _BrokerSession(ClientSession):
    """A client session that declares no client capability (no callbacks are given) and refuses
    each request a server makes of its client with an error naming what is not supported, rather
    than the SDK's anonymous one. What was refused is kept in `refused`, so a call that failed for
    it can say so."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused: list[str] = []

    async def dispatch_input_request(self, ctx: Any, request: Any) -> types.ErrorData:
        """Refuse: the broker calls tools for an executor and has no model, user or roots to offer."""
        feature = next((name for kind, name in _CLIENT_FEATURES if isinstance(request, kind)), "this request")
        self.refused.append(feature)
        return types.ErrorData(
            code=types.INVALID_REQUEST,
            message=f"{feature} is not supported: the client is a secrets broker calling tools for an"
            " executor, with no model, user or roots to offer",
        )


def _to_tool(tool: types.Tool) -> McpTool:
    """The tool as the broker keeps it: what a caller needs to judge it, in the spec's spelling.

    Annotations and execution keep only the fields the spec defines (the SDK's models drop any
    other) and only those the server set: an absent hint and a hint at its default are different
    statements. `icons` and `_meta` are dropped: icons are addresses (or data) for a user
    interface to fetch and draw, which the broker does not do and would not send through its
    egress policy, and `_meta` is free-form data for the protocol's own extensions; neither
    changes what a call does.
    """
    wire = tool.model_dump(mode="json", by_alias=True, exclude_none=True)
    described = McpTool(
        tool.name,
        tool.description or "",
        wire.get("inputSchema") or {},
        "",
        title=tool.title or "",
        annotations=wire.get("annotations") or None,
        output_schema=wire.get("outputSchema"),
        execution=wire.get("execution") or None,
    )
    return hashed(described)


def _auth_headers(target: Target) -> dict[str, str]:
    config = target.config
    auth = config.get("auth_type", "none")
    if auth == "api_key":
        return {str(config.get("api_key_header") or "X-API-Key"): target.secret("api_key")}
    if auth == "bearer":
        return {"Authorization": target.sent.bearer(target.secret("token"))}
    if auth == "basic":
        return {
            "Authorization": target.sent.basic(str(config.get("username", "")), target.secret("password"))
        }
    if auth == "oauth2":  # the linked oauth2 connection's access token (`service.linked`)
        return {"Authorization": target.sent.bearer(target.secret("access_token"))}
    return {}


def _endpoint(url: str) -> str:
    """The URL without userinfo, query or fragment: safe to show."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class _Progress:
    """How far a discovery got, for the stage of a failure."""

    stage: TestStage = TestStage.CONNECT
    pages: int = 0
    details: dict[str, str] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def _open(target: Target, url: str, transport: EgressTransport) -> AsyncIterator[_Streams]:
    """The SDK transport named by the config, to `url` over `transport`.

    Streamable HTTP sends DELETE on exit.
    """
    if target.config.get("transport", "streamable_http") == "sse":

        def factory(
            headers: dict[str, str] | None = None,
            timeout: httpx2.Timeout | None = None,
            auth: httpx2.Auth | None = None,
        ) -> httpx2.AsyncClient:
            # An auth flow (OAuth discovery) would make requests of its own; we never ask for one.
            if auth is not None:
                raise ValueError("MCP client auth flows are not supported")
            return transport.client(headers, timeout)

        async with sse_client(url, httpx_client_factory=factory) as streams:
            yield streams
    else:
        async with (
            transport.client() as client,
            streamable_http_client(url, http_client=client, terminate_on_close=True) as streams,
        ):
            yield streams


async def _list_all(session: ClientSession, progress: _Progress) -> list[McpTool]:
    tools: dict[str, McpTool] = {}
    cursor: str | None = None
    seen_cursors: set[str] = set()
    while True:
        if progress.pages >= MAX_PAGES:
            raise TestFailure(
                TestCategory.UNEXPECTED_RESPONSE,
                TestStage.SAMPLE_OPERATION,
                f"the server listed more than {MAX_PAGES} pages of tools",
            )
        params = types.PaginatedRequestParams(cursor=cursor) if cursor is not None else None
        page = await session.list_tools(params=params)
        progress.pages += 1
        for tool in page.tools:
            if tool.name in tools:
                raise TestFailure(
                    TestCategory.PROTOCOL_ERROR,
                    TestStage.SAMPLE_OPERATION,
                    f"the server listed the tool {tool.name!r} twice",
                )
            described = _to_tool(tool)
            if max(json_depth(described.input_schema), json_depth(described.output_schema)) > MAX_JSON_DEPTH:
                raise TestFailure(
                    TestCategory.PROTOCOL_ERROR,
                    TestStage.SAMPLE_OPERATION,
                    f"the server describes the tool {tool.name!r} nested more than {MAX_JSON_DEPTH}"
                    " levels deep, more than the broker's clients can read",
                )
            tools[tool.name] = described
        if len(tools) > MAX_TOOLS:
            raise TestFailure(
                TestCategory.UNEXPECTED_RESPONSE,
                TestStage.SAMPLE_OPERATION,
                f"the server listed more than {MAX_TOOLS} tools",
            )
        cursor = page.next_cursor
        if cursor is None:
            return list(tools.values())
        if cursor in seen_cursors:
            raise TestFailure(
                TestCategory.PROTOCOL_ERROR, TestStage.SAMPLE_OPERATION, "the server repeated a page cursor"
            )
        seen_cursors.add(cursor)


@contextlib.asynccontextmanager
async def _session(
    target: Target, egress: EgressPolicy, progress: _Progress
) -> AsyncIterator[tuple[_BrokerSession, types.InitializeResult, EgressTransport]]:
    """An initialized session with the connection's server; any failure classified (`_classify`)."""
    timeout = float(target.config.get("timeout_seconds", 30.0))
    # The SDK's httpx2 would refuse some spellings of an address before the policy saw them.
    url = egress.check_url(str(target.config["server_url"])).text
    progress.details.update(
        endpoint=_endpoint(url), transport=str(target.config.get("transport", "streamable_http"))
    )
    connect = min(egress.settings.connect_timeout, timeout)
    # Each read and write may take `timeout`; the runner bounds the whole test.
    limits = httpx.Timeout(timeout, connect=connect)
    async with http_client(egress, headers=_auth_headers(target), timeout=limits) as egress_client:
        transport = EgressTransport(egress_client, egress.settings.max_response_bytes)
        try:
            async with (
                _open(target, url, transport) as (read, write),
                _BrokerSession(
                    read, write, read_timeout_seconds=timeout, client_info=_CLIENT_INFO
                ) as session,
            ):
                init = await session.initialize()
                progress.stage = TestStage.SAMPLE_OPERATION
                yield session, init, transport
        except TestFailure:
            raise
        except Exception as exc:
            # The SDK's task groups wrap the real cause in exception groups; `_classify` digs it out.
            raise _classify(exc, transport.log, progress) from None


async def discover_tools(target: Target, egress: EgressPolicy) -> tuple[TestResult, list[McpTool]]:
    """Connect, initialize, list every tool (following cursors) and close the session.

    Raises `TestFailure` with a category, or lets the policy's `Blocked` / `DnsFailure`
    through; run it under `run_tester` for the timeout, classification and scrubbing.
    """
    progress = _Progress()
    async with _session(target, egress, progress) as (session, init, transport):
        tools = await _list_all(session, progress)
    details = {
        **progress.details,
        "server_name": init.server_info.name,
        "server_version": init.server_info.version,
        "protocol_version": init.protocol_version,
        "tool_count": str(len(tools)),
        "pages": str(progress.pages),
    }
    if any(e.method == "DELETE" and e.status < 300 for e in transport.log.exchanges):
        details["session_closed"] = "true"
    auth = target.config.get("auth_type", "none")
    result = passed(
        f"MCP server {init.server_info.name} {init.server_info.version} lists {len(tools)} tools",
        TestStage.SAMPLE_OPERATION,
        details,
        verified=("connection", "mcp initialize", "tools/list")
        + (("credentials",) if auth != "none" else ()),
        not_verified=("tool calls",),
    )
    return result, tools


def _leaves(exc: BaseException) -> list[BaseException]:
    """Every exception in `exc`'s groups and cause chains, outermost first."""
    found: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending and len(found) < 200:
        current = pending.pop(0)
        if current in found:
            continue
        found.append(current)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)
    return found


_STATUS = {
    401: (TestCategory.AUTH_FAILED, TestStage.AUTHENTICATE, "the server rejected the credentials (HTTP 401)"),
    403: (TestCategory.PERMISSION_DENIED, TestStage.AUTHENTICATE, "the server denied access (HTTP 403)"),
    404: (TestCategory.NOT_FOUND, TestStage.CONNECT, "no MCP endpoint at this URL (HTTP 404)"),
}


def _classify(exc: Exception, log: ExchangeLog, progress: _Progress) -> Exception:
    """The policy error inside `exc`, or a `TestFailure` naming what went wrong."""
    errors = _leaves(exc)
    for error in errors:
        if isinstance(error, Blocked | DnsFailure | TestFailure | ToolChanged | ToolError):
            return error
    details = dict(progress.details)

    def failure(category: TestCategory, stage: TestStage, message: str) -> TestFailure:
        return TestFailure(category, stage, message, details)

    bad = log.first_error()
    if bad is None:
        status_error = next((e for e in errors if isinstance(e, httpx2.HTTPStatusError)), None)
        if status_error is not None:
            details["http_status"] = str(status_error.response.status_code)
            bad_status = status_error.response.status_code
        else:
            bad_status = 0
    else:
        details["http_status"] = str(bad.status)
        bad_status = bad.status
    if bad_status in _STATUS:
        category, stage, message = _STATUS[bad_status]
        if bad_status == 401 and progress.stage is not TestStage.CONNECT:
            stage = progress.stage  # the session had begun: refused mid-way, not at the start
        return failure(category, stage, message)
    if bad_status:
        return failure(
            TestCategory.UNEXPECTED_RESPONSE, progress.stage, f"the server answered HTTP {bad_status}"
        )
    if log.too_large:
        return failure(
            TestCategory.UNEXPECTED_RESPONSE, progress.stage, "the server's response was too large"
        )
    if any(isinstance(e, ssl.SSLError) for e in errors):
        return failure(TestCategory.TLS_ERROR, TestStage.TLS, "TLS handshake failed")
    if any(isinstance(e, httpx2.TimeoutException | TimeoutError) for e in errors) or any(
        isinstance(e, MCPError) and e.code == types.REQUEST_TIMEOUT for e in errors
    ):
        return failure(TestCategory.TIMEOUT, progress.stage, "the MCP server did not answer in time")
    if any(isinstance(e, ConnectionRefusedError) for e in errors):
        return failure(TestCategory.CONNECTION_REFUSED, TestStage.CONNECT, "connection refused")
    if any(isinstance(e, httpx2.ConnectError) for e in errors):
        return failure(TestCategory.CONNECTION_REFUSED, TestStage.CONNECT, "cannot connect to the server")
    foreign = log.first_foreign()
    if foreign is not None:
        details["content_type"] = foreign.content_type.partition(";")[0]
        return failure(
            TestCategory.PROTOCOL_ERROR,
            progress.stage,
            f"not an MCP server: it answered with {details['content_type']}",
        )
    mcp_error = next((e for e in errors if isinstance(e, MCPError)), None)
    if mcp_error is not None and mcp_error.code == types.PARSE_ERROR:
        return failure(
            TestCategory.PROTOCOL_ERROR, progress.stage, "not an MCP server: its answer is not JSON-RPC"
        )
    if mcp_error is not None:
        return failure(
            TestCategory.PROTOCOL_ERROR, progress.stage, f"MCP error: {_first_line(mcp_error.message)}"
        )
    if any(isinstance(e, ValidationError) for e in errors):
        return failure(TestCategory.PROTOCOL_ERROR, progress.stage, "the server sent an invalid MCP message")
    if any(isinstance(e, httpx2.TransportError) for e in errors):
        return failure(TestCategory.PROTOCOL_ERROR, progress.stage, "the connection failed mid-exchange")
    cause = next((e for e in errors if not isinstance(e, BaseExceptionGroup)), exc)
    return failure(
        TestCategory.PROTOCOL_ERROR,
        progress.stage,
        f"MCP client error: {type(cause).__name__}: {_first_line(str(cause))}",
    )


# How the SDK resolves a call it gave up on (the connection closed, its own timeout, an SSE stream
# that ended or failed), with code CONNECTION_CLOSED or REQUEST_TIMEOUT. A server may send those
# codes itself (-32000 is JSON-RPC's generic server error): then it answered the call, and its
# message is told. A test of a server too slow to answer pins the timeout's message.
_SDK_GAVE_UP = re.compile(
    r"Connection closed|Request '.*' timed out|SSE stream |server answered a request with 202"
)


def _tool_error(exc: MCPError, refused: list[str], log: ExchangeLog, scrubber: Scrubber) -> Exception:
    """What a JSON-RPC error answering `tools/call` means for the executor; a failure of the exchange
    itself (the connection, a timeout, the byte cap) is left to `_classify`."""
    gave_up = exc.code in (types.CONNECTION_CLOSED, types.REQUEST_TIMEOUT) and _SDK_GAVE_UP.match(exc.message)
    if log.too_large or gave_up:
        return exc
    said = f"error {exc.code}: {_first_line(scrubber.text(exc.message))}"
    if refused:
        return ToolError(
            "client_feature_unsupported",
            f"the tool asked the client for {refused[0]}, which tool calls through the broker do not"
            f" support (the server then answered error {exc.code})",
        )
    if exc.code == types.INVALID_PARAMS:
        return ToolError(
            "invalid_arguments", f"the MCP server refused the arguments with {said}", arguments=True
        )
    return ToolError("mcp_error", f"the MCP server answered the call with {said}")


def _first_line(text: str) -> str:
    return text.strip().partition("\n")[0][:200]


async def test_mcp(target: Target, egress: EgressPolicy) -> TestResult:
    """Test an MCP connection: initialize, list every tool, close the session."""
    result, _tools = await discover_tools(target, egress)
    return result


__all__ = ["MAX_PAGES", "MAX_TOOLS", "discover_tools", "test_mcp", "tool_definition_hash"]


async def call_tool(
    target: Target, egress: EgressPolicy, name: str, arguments: dict[str, Any], approved_hash: str
) -> ToolCall:
    """Call one tool, only if the server still describes it as it was approved.

    The server's tool list is read and scrubbed as discovery stores it (the runner's scrubber:
    the secrets and what was composed from them), so the hash compared is of the same form; a
    tool that is gone or described differently raises `ToolChanged` and is not called. The
    result is scrubbed the same way. A JSON-RPC error for the call, or an answer over the egress
    policy's byte cap, raises `ToolError`.
    """
    progress = _Progress()
    log: ExchangeLog | None = None
    try:
        async with _session(target, egress, progress) as (session, _init, transport):
            log = transport.log
            scrubber = Scrubber(target.secrets.reveal().values(), target.sent.forms)
            current, _ = scrub_tools(await _list_all(session, progress), scrubber)
            tool = next((t for t in current if t.name == name), None)
            if tool is None or tool.definition_hash != approved_hash:
                raise ToolChanged(name, tool)
            try:
                result = await session.call_tool(name, arguments)
            except MCPError as exc:
                raise _tool_error(exc, session.refused, log, scrubber) from None
    except TestFailure:
        if log is not None and log.too_large:
            limit = egress.settings.max_response_bytes
            raise ToolError(
                "answer_too_large",
                f"the MCP server's answer was over the broker's limit of {limit} bytes"
                " ([egress] max_response_bytes)",
            ) from None
        raise
    if not isinstance(result, types.CallToolResult):
        raise TestFailure(
            TestCategory.PROTOCOL_ERROR, progress.stage, "the server did not answer with a tool result"
        )
    content = [
        scrubber.json(item.model_dump(mode="json", by_alias=True, exclude_none=True))
        for item in result.content
    ]
    structured = None if result.structured_content is None else scrubber.json(result.structured_content)
    return ToolCall(content, bool(result.is_error), structured)
