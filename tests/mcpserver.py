"""A real MCP server on loopback for the MCP tester's integration tests.

The SDK's low-level `Server` serves a paginated tool list (the cursor is the
offset of the next page) and answers every tool call with what it was called with and,
as a careless server might, its token, over Streamable HTTP at `/mcp`, in JSON or SSE
response mode, and over the older HTTP+SSE transport at `/sse` +
`/messages/`. A small ASGI middleware records every request and, when a token
is set, answers 401 without it. With `echo_header`, the server behaves like one that
reflects what it was sent: that header's value goes into its name and into an extra
tool's name, description, input schema, title and annotation title. With `metadata`, a tool is
listed with what MCP lets a server say of it beside those (title, annotations, output schema,
execution), changeable while the server runs. With `behaviours`, extra tools
(listed first, with an open input schema) do what a real server's tools do: ask the client to
sample or elicit, send progress or log notifications, answer at length or slowly. `/html` and
`/notjsonrpc` are plain HTTP endpoints that are not MCP servers. With `protected_resource` (RFC 9728
metadata, settable once the port is known), the server serves it, without authentication, at
the well-known URIs in `prm_paths` and names the first in its 401 challenges' `resource_metadata`
(unless `challenge_metadata` is off), with `challenge_scope` as their `scope`. uvicorn runs in a
background thread on a port chosen by the kernel and is stopped, and its socket closed, by `stop()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.sse import SseServerTransport
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.asgithread import ThreadedUvicorn

SERVER_NAME = "broker-test-mcp"
SERVER_VERSION = "1.2.3"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"x": {"type": "integer", "description": "a number"}},
    "required": ["x"],
}
OPEN_SCHEMA: dict[str, Any] = {"type": "object"}

# What an extra tool does when called: the request's context and its arguments in, its result out.
ToolBehaviour = Callable[[ServerRequestContext[Any], dict[str, Any]], Awaitable[types.CallToolResult]]


@dataclass(frozen=True)
class Seen:
    """One HTTP request the server received."""

    method: str
    path: str
    session_id: str | None
    headers: dict[str, str]


@dataclass(frozen=True)
class Answered:
    """One HTTP response the server sent."""

    method: str
    path: str
    status: int
    content_type: str


class _Gate:
    """ASGI middleware: records requests, and answers 401 unless the bearer token matches."""

    def __init__(self, app: ASGIApp, owner: McpTestServer) -> None:
        self._app = app
        self._owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self._owner.seen.append(Seen(scope["method"], scope["path"], headers.get("mcp-session-id"), headers))
        echoed = headers.get(self._owner.echo_header or "")
        if echoed:
            self._owner.echo(echoed)
        owner = self._owner
        if owner.protected_resource is not None and scope["path"] in owner.prm_paths:
            await JSONResponse(owner.protected_resource)(scope, receive, send)
            return
        token = self._owner.token
        if token is not None and headers.get("authorization") != f"Bearer {token}":
            status = self._owner.reject_status
            await JSONResponse({"error": "no"}, status_code=status)(scope, receive, send)
            return
        accepts = self._owner.accepts
        bearer = headers.get("authorization", "")
        if accepts is not None and not accepts(bearer[7:] if bearer.startswith("Bearer ") else None):
            challenge = {"WWW-Authenticate": owner.challenge()}
            await JSONResponse({"error": "invalid_token"}, status_code=401, headers=challenge)(
                scope, receive, send
            )
            return
        answered = self._owner.responses

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])
                }
                answered.append(
                    Answered(scope["method"], scope["path"], message["status"], sent.get("content-type", ""))
                )
            await send(message)

        await self._app(scope, receive, recording_send)


class McpTestServer:
    """An MCP server with `tool_count` tools served `page_size` at a time.

    With `token`, requests without `Authorization: Bearer <token>` get `reject_status`.
    With `accepts`, a request is served only if `accepts(bearer token or None)` is true, as a
    resource server asks its authorization server; otherwise it gets 401 with `WWW-Authenticate:
    Bearer` (RFC 6750).
    With `loop_cursor`, every page points to the second one (a broken server).
    With `tls` (certificate file, key file), it serves HTTPS.
    With `echo_header`, that request header is echoed into the server name and an extra tool.
    With `behaviours`, each named tool is listed first and does what its behaviour does.
    With `metadata`, a tool is listed with those `types.Tool` fields too (`title`, `annotations`,
    `output_schema`, `execution`, `icons`, `meta`); `self.metadata` may be changed at any time.
    """

    def __init__(
        self,
        *,
        tool_count: int = 25,
        page_size: int = 10,
        json_response: bool = False,
        token: str | None = None,
        reject_status: int = 401,
        accepts: Callable[[str | None], bool] | None = None,
        loop_cursor: bool = False,
        tls: tuple[str, str] | None = None,
        echo_header: str | None = None,
        behaviours: Mapping[str, ToolBehaviour] | None = None,
        metadata: Mapping[str, dict[str, Any]] | None = None,
        protected_resource: dict[str, Any] | None = None,
        prm_paths: tuple[str, ...] = ("/.well-known/oauth-protected-resource/mcp",),
        challenge_metadata: bool = True,
        challenge_scope: str | None = None,
    ) -> None:
        self.page_size = page_size
        self.echo_header = echo_header.lower() if echo_header else None
        self.echoed: str | None = None
        self.token = token
        self.reject_status = reject_status
        self.accepts = accepts
        self.protected_resource = protected_resource
        self.prm_paths = prm_paths
        self.challenge_metadata = challenge_metadata
        self.challenge_scope = challenge_scope
        self.loop_cursor = loop_cursor
        self.tls = tls
        self.descriptions = {f"tool_{i:02d}": f"Tool number {i}." for i in range(tool_count)}
        self.behaviours = dict(behaviours or {})
        self.metadata = {name: dict(fields) for name, fields in (metadata or {}).items()}
        self.seen: list[Seen] = []
        self.responses: list[Answered] = []
        self.list_calls = 0
        self.legacy_streams_closed = 0
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._server: Server[Any] = Server(
            SERVER_NAME, version=SERVER_VERSION, on_list_tools=self._list_tools, on_call_tool=self._call_tool
        )
        self._app = _Gate(self._build_app(json_response), self)
        self._http: ThreadedUvicorn | None = None
        self.port = 0

    def echo(self, value: str) -> None:
        """Reflect `value` from now on: the server's name and version, and the echo tool."""
        self.echoed = value
        self._server.name = f"echo {value}"
        self._server.version = value

    def challenge(self) -> str:
        """The `WWW-Authenticate` value of a 401 (RFC 6750 3, RFC 9728 5.1)."""
        params = ['error="invalid_token"']
        if self.protected_resource is not None and self.challenge_metadata:
            params.append(f'resource_metadata="{self.base}{self.prm_paths[0]}"')
        if self.challenge_scope is not None:
            params.append(f'scope="{self.challenge_scope}"')
        return "Bearer " + ", ".join(params)

    @property
    def base(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The Streamable HTTP endpoint."""
        return f"{self.base}/mcp"

    @property
    def sse_url(self) -> str:
        """The legacy HTTP+SSE endpoint."""
        return f"{self.base}/sse"

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        self.list_calls += 1
        start = int(params.cursor) if params is not None and params.cursor else 0
        names = sorted(self.descriptions)
        page = names[start : start + self.page_size]
        tools = [
            types.Tool(
                name=n, description=self.descriptions[n], input_schema=SCHEMA, **self.metadata.get(n, {})
            )
            for n in page
        ]
        if start == 0:
            tools[:0] = [
                types.Tool(
                    name=n,
                    description=f"Edge case: {n}.",
                    input_schema=OPEN_SCHEMA,
                    **self.metadata.get(n, {}),
                )
                for n in sorted(self.behaviours)
            ]
        if self.echoed is not None and start == 0:
            value = self.echoed
            schema = {
                "type": "object",
                "properties": {value: {"type": "string", "default": value, "description": f"send {value}"}},
                "required": [value],
            }
            tools.append(
                types.Tool(
                    name=f"echo_{value}",
                    description=f"Uses {value} for you.",
                    input_schema=schema,
                    title=f"Echo {value}",
                    annotations=types.ToolAnnotations(title=f"Echoes {value}", read_only_hint=True),
                )
            )
        following = start + self.page_size
        cursor = str(following) if following < len(names) else None
        if self.loop_cursor:
            cursor = str(self.page_size)
        return types.ListToolsResult(tools=tools, next_cursor=cursor)

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        """Every tool answers with what it was called with, and (like a careless server) the token."""
        arguments = dict(params.arguments or {})
        self.calls.append((params.name, arguments))
        behaviour = self.behaviours.get(params.name)
        if behaviour is not None:
            return await behaviour(ctx, arguments)
        text = f"{params.name} called with {arguments} using token {self.token}"
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)],
            structured_content={"tool": params.name, "arguments": arguments, "token": self.token},
            is_error=params.name not in self.descriptions,
        )

    def _build_app(self, json_response: bool) -> Starlette:
        streamable = self._server.streamable_http_app(json_response=json_response)
        legacy = SseServerTransport("/messages/")

        async def handle_sse(request: Request) -> Response:
            async with legacy.connect_sse(request.scope, request.receive, request._send) as (read, write):
                await self._server.run(read, write, self._server.create_initialization_options())
            self.legacy_streams_closed += 1
            return Response()

        async def html(request: Request) -> Response:
            return HTMLResponse("<html><body>Welcome to nginx!</body></html>")

        async def not_jsonrpc(request: Request) -> Response:
            return JSONResponse({"status": "ok", "items": []})

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            async with self._server.session_manager.run():
                yield

        return Starlette(
            routes=[
                Route("/sse", endpoint=handle_sse, methods=["GET"]),
                Mount("/messages/", app=legacy.handle_post_message),
                Route("/html", endpoint=html, methods=["GET", "POST", "DELETE"]),
                Route("/notjsonrpc", endpoint=not_jsonrpc, methods=["GET", "POST", "DELETE"]),
                Mount("/", app=streamable),
            ],
            lifespan=lifespan,
        )

    def start(self) -> None:
        """Serve on a free loopback port in a background thread; return once it accepts connections."""
        self._http = ThreadedUvicorn(self._app, "MCP test server", lifespan="on", tls=self.tls)
        self._http.start()
        self.port = self._http.port

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._http is not None:
            self._http.stop()


@contextlib.contextmanager
def running(**options: Any) -> Iterator[McpTestServer]:
    """An `McpTestServer` started for the duration of the block."""
    server = McpTestServer(**options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
