"""Executor SDK: fetch a connection's config and secrets from the Resolve API, with a TTL cache.

    async with ResolveClient("broker:50052", ca=ca, cert=cert, key=key) as broker:
        db = await broker.resolve(name="orders-db", purpose="nightly export")
        connect(host=db.config["host"], password=db.secrets["password"])

For a connection granted in PROXY mode the executor never holds the secret: it makes
plain httpx calls through `proxy_transport`, and the broker injects the credential:

    async with ResolveClient("broker:50052", ca=ca, cert=cert, key=key) as broker:
        transport = broker.proxy_transport(name="github", purpose="triage")
        async with httpx.AsyncClient(transport=transport, base_url="https://github") as http:
            user = (await http.get("/user")).json()

The URL's scheme and host are not used: the path (and query) go to the connection's
base URL. The answer's headers and body come with every form of the secret masked;
redirects are not followed (see the README's "Proxy mode").

`SyncResolveClient` has the same API without `await`. The client authenticates with
its certificate (its URI SAN is the executor's SPIFFE id) and sees only connections
granted to it. Errors from the broker propagate unchanged as `grpc.RpcError`
(`NOT_FOUND`, `PERMISSION_DENIED` when there is no live grant, `UNAVAILABLE`, ...).

A reply is cached for its `cache_ttl_seconds` (the broker's choice; 0 means not at
all) and never past its `expires_at`. Cached replies skip the broker, so they also
skip its audit trail: the first resolve in each TTL window is the one recorded.

When a ref is resolved again (its TTL ran out, it was invalidated, or `refresh=True`),
the client tells the broker which `secret_version` it received last, and the answer's
`superseded_at` says when that secret was replaced (an executor rebuilds its pools then).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self, TypedDict

import grpc
import grpc.aio
import httpx
from google.protobuf import json_format, struct_pb2

from broker._proto import broker_pb2, broker_pb2_grpc

CacheKey = tuple[str, str]
Clock = Callable[[], float]


@dataclass(frozen=True, repr=False)
class Resolved:
    """A resolved connection. `repr` masks the secret values; pickling is refused.

    `secret_version` rises each time the connection's secrets change. `superseded_at`
    is set on the first answer after a change: the secret this client held for the
    same ref (and connection) was replaced at that time. It is None on a first resolve,
    on answers served from the cache, and once the broker no longer remembers the old
    version (`resolve.superseded_grace_seconds`); compare `secret_version` to be sure.
    """

    connection_id: str
    name: str
    type: str
    provider: str
    config: dict[str, Any]
    secrets: dict[str, str]
    expires_at: dt.datetime | None
    cache_ttl_seconds: int
    secret_version: int = 0
    superseded_at: dt.datetime | None = None

    def __repr__(self) -> str:
        masked = {k: "***" for k in self.secrets}
        return (
            f"Resolved(connection_id={self.connection_id!r}, name={self.name!r}, type={self.type!r}, "
            f"provider={self.provider!r}, config={self.config!r}, secrets={masked!r}, "
            f"expires_at={self.expires_at!r}, cache_ttl_seconds={self.cache_ttl_seconds!r}, "
            f"secret_version={self.secret_version!r}, superseded_at={self.superseded_at!r})"
        )

    def __reduce__(self) -> NoReturn:
        # Pickles end up on disk and in queues; secrets should not travel that way by accident.
        raise TypeError("a Resolved holds secrets and cannot be pickled")


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a dict, whole numbers as ints (protobuf stores every number as a double)."""
    result: dict[str, Any] = _plain(json_format.MessageToDict(struct))
    return result


class ResolvedCache:
    """Resolved replies by ("id", x) or ("name", x), each until its TTL or its expiry, whichever is first.

    `clock` is monotonic and measures the TTL; `wall_clock` (seconds since the epoch)
    is only used to turn `expires_at` into a deadline on the monotonic clock.
    """

    def __init__(self, clock: Clock = time.monotonic, wall_clock: Clock = time.time) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._entries: dict[CacheKey, tuple[float, Resolved]] = {}

    def get(self, key: CacheKey) -> Resolved | None:
        """The cached reply while it is fresh; a stale one is dropped."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        deadline, value = entry
        if self._clock() < deadline:
            return value
        self._entries.pop(key, None)
        return None

    def put(self, key: CacheKey, value: Resolved) -> None:
        """Keep `value` for its TTL, cut short by its `expires_at`; a TTL of 0 keeps nothing."""
        if value.cache_ttl_seconds <= 0:
            return
        now = self._clock()
        deadline = now + value.cache_ttl_seconds
        if value.expires_at is not None:
            remaining = value.expires_at.timestamp() - self._wall_clock()
            if remaining <= 0:
                return
            deadline = min(deadline, now + remaining)
        self._entries[key] = (deadline, value)

    def invalidate(self, key: CacheKey | None = None) -> None:
        """Forget one key, or everything."""
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(key, None)


MAX_HELD = 10_000  # refs whose last secret version the client remembers


class _Base:
    def __init__(
        self,
        channel: Any,
        *,
        cache: bool = True,
        timeout: float | None = 10.0,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self._channel = channel
        self._stub = broker_pb2_grpc.ResolveServiceStub(channel)  # type: ignore[no-untyped-call]
        self._timeout = timeout
        self._cache = ResolvedCache(clock, wall_clock) if cache else None
        # (connection_id, secret_version) last received per ref; outlives cache entries, so a
        # re-resolve can name the version it held. Bounded: past MAX_HELD refs the oldest go
        # (a forgotten ref is sent as version 0, which only costs it one superseded_at).
        self._held: dict[CacheKey, tuple[str, int]] = {}

    @classmethod
    def from_channel(
        cls,
        channel: Any,
        *,
        cache: bool = True,
        timeout: float | None = 10.0,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> Self:
        """A client over a channel you built (for credentials from a SPIFFE workload API, say)."""
        client = cls.__new__(cls)
        _Base.__init__(client, channel, cache=cache, timeout=timeout, clock=clock, wall_clock=wall_clock)
        return client

    def invalidate(self, connection_id: str | None = None, *, name: str | None = None) -> None:
        """Drop a cached reply (after the secret was rotated, say), or all of them when no ref is given.

        The secret version last received is kept, so the next resolve still learns `superseded_at`.
        """
        if self._cache is None:
            return
        if connection_id is None and name is None:
            self._cache.invalidate()
        else:
            self._cache.invalidate(_key(connection_id, name))

    def _cached(self, key: CacheKey, refresh: bool) -> Resolved | None:
        return self._cache.get(key) if self._cache is not None and not refresh else None

    def _request_for(self, key: CacheKey, purpose: str) -> Any:
        held = self._held.get(key)
        return _request(key, purpose, held[1] if held is not None else 0)

    def _remember(self, key: CacheKey, reply: Any) -> Resolved:
        value = _from_reply(reply)
        held = self._held.get(key)
        if held is not None and held[0] == value.connection_id:
            # Concurrent resolves may answer out of order; versions only rise.
            self._held[key] = (value.connection_id, max(held[1], value.secret_version))
        else:
            if key not in self._held and len(self._held) >= MAX_HELD:
                del self._held[next(iter(self._held))]
            self._held[key] = (value.connection_id, value.secret_version)
            if value.superseded_at is not None:
                # A name now pointing at another connection: the time is of that one's history.
                value = replace(value, superseded_at=None)
        if self._cache is not None:
            # The news is for this caller; later cache hits must not report it again.
            cached = value if value.superseded_at is None else replace(value, superseded_at=None)
            self._cache.put(key, cached)
        return value


# What httpx adds to frame a request; the broker frames the upstream request itself.
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def _proxy_request(request: httpx.Request, body: bytes, key: CacheKey, purpose: str) -> Any:
    path, _, query = request.url.raw_path.decode("ascii").partition("?")
    headers = [
        broker_pb2.HttpHeader(name=name, value=value)
        for name, value in request.headers.multi_items()
        if name.lower() not in _FRAMING
    ]
    return broker_pb2.ProxyHttpRequest(
        method=request.method,
        path=path,
        query=query,
        headers=headers,
        body=body,
        purpose=purpose,
        **_ref(key),
    )


def _proxy_response(reply: Any, request: httpx.Request) -> httpx.Response:
    headers = [(h.name, h.value) for h in reply.headers]
    return httpx.Response(reply.status, headers=headers, content=reply.body, request=request)


@dataclass(frozen=True)
class ToolResult:
    """An MCP tool's result as the broker returns it, scrubbed of the connection's secrets."""

    content: list[dict[str, Any]]
    is_error: bool
    structured_content: dict[str, Any] | None


def _tool_request(key: CacheKey, tool: str, arguments: dict[str, Any] | None, purpose: str) -> Any:
    request = broker_pb2.CallMcpToolRequest(tool=tool, purpose=purpose, **_ref(key))
    request.arguments.update(arguments or {})
    return request


def _tool_result(reply: Any) -> ToolResult:
    structured = struct_to_dict(reply.structured_content) if reply.HasField("structured_content") else None
    return ToolResult([struct_to_dict(item) for item in reply.content], reply.is_error, structured)


class _AsyncProxyTransport(httpx.AsyncBaseTransport):
    def __init__(self, stub: Any, key: CacheKey, purpose: str, timeout: float | None) -> None:
        self._stub, self._key, self._purpose, self._timeout = stub, key, purpose, timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        proxied = _proxy_request(request, await request.aread(), self._key, self._purpose)
        return _proxy_response(await self._stub.ProxyHttp(proxied, timeout=self._timeout), request)


class _SyncProxyTransport(httpx.BaseTransport):
    def __init__(self, stub: Any, key: CacheKey, purpose: str, timeout: float | None) -> None:
        self._stub, self._key, self._purpose, self._timeout = stub, key, purpose, timeout

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        proxied = _proxy_request(request, request.read(), self._key, self._purpose)
        return _proxy_response(self._stub.ProxyHttp(proxied, timeout=self._timeout), request)


class ResolveClient(_Base):
    """Async (grpc.aio) client of the Resolve API; create it inside a running event loop."""

    def __init__(
        self,
        target: str,
        *,
        ca: Path,
        cert: Path,
        key: Path,
        cache: bool = True,
        timeout: float | None = 10.0,
        server_name: str | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        channel = grpc.aio.secure_channel(target, _credentials(ca, cert, key), options=_options(server_name))
        super().__init__(channel, cache=cache, timeout=timeout, clock=clock, wall_clock=wall_clock)

    async def resolve(
        self,
        connection_id: str | None = None,
        *,
        name: str | None = None,
        purpose: str = "",
        refresh: bool = False,
    ) -> Resolved:
        """Resolve by id or by name (exactly one); `purpose` is recorded in the audit trail.

        `refresh=True` skips the cache and asks the broker. Raises ValueError for a bad
        reference and grpc.RpcError for what the broker refuses.
        """
        key = _key(connection_id, name)
        cached = self._cached(key, refresh)
        if cached is not None:
            return cached
        reply = await self._stub.Resolve(self._request_for(key, purpose), timeout=self._timeout)
        return self._remember(key, reply)

    def proxy_transport(
        self, connection_id: str | None = None, *, name: str | None = None, purpose: str = ""
    ) -> httpx.AsyncBaseTransport:
        """An httpx transport that sends each request through the broker's proxy (see the module
        docstring); errors from the broker are `grpc.RpcError`, as for `resolve`."""
        stub = broker_pb2_grpc.ProxyServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return _AsyncProxyTransport(stub, _key(connection_id, name), purpose, self._timeout)

    async def call_tool(
        self,
        connection_id: str | None = None,
        *,
        name: str | None = None,
        tool: str,
        arguments: dict[str, Any] | None = None,
        purpose: str = "",
    ) -> ToolResult:
        """Call an approved tool of an MCP connection through the broker (PROXY or RESOLVE grant)."""
        stub = broker_pb2_grpc.ProxyServiceStub(self._channel)  # type: ignore[no-untyped-call]
        request = _tool_request(_key(connection_id, name), tool, arguments, purpose)
        return _tool_result(await stub.CallMcpTool(request, timeout=self._timeout))

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class SyncResolveClient(_Base):
    """Blocking client of the Resolve API, with the same API as `ResolveClient`."""

    def __init__(
        self,
        target: str,
        *,
        ca: Path,
        cert: Path,
        key: Path,
        cache: bool = True,
        timeout: float | None = 10.0,
        server_name: str | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        channel = grpc.secure_channel(target, _credentials(ca, cert, key), options=_options(server_name))
        super().__init__(channel, cache=cache, timeout=timeout, clock=clock, wall_clock=wall_clock)

    def resolve(
        self,
        connection_id: str | None = None,
        *,
        name: str | None = None,
        purpose: str = "",
        refresh: bool = False,
    ) -> Resolved:
        """Resolve by id or by name (exactly one); `purpose` is recorded in the audit trail.

        `refresh=True` skips the cache and asks the broker. Raises ValueError for a bad
        reference and grpc.RpcError for what the broker refuses.
        """
        key = _key(connection_id, name)
        cached = self._cached(key, refresh)
        if cached is not None:
            return cached
        reply = self._stub.Resolve(self._request_for(key, purpose), timeout=self._timeout)
        return self._remember(key, reply)

    def proxy_transport(
        self, connection_id: str | None = None, *, name: str | None = None, purpose: str = ""
    ) -> httpx.BaseTransport:
        """As `ResolveClient.proxy_transport`, for `httpx.Client`."""
        stub = broker_pb2_grpc.ProxyServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return _SyncProxyTransport(stub, _key(connection_id, name), purpose, self._timeout)

    def call_tool(
        self,
        connection_id: str | None = None,
        *,
        name: str | None = None,
        tool: str,
        arguments: dict[str, Any] | None = None,
        purpose: str = "",
    ) -> ToolResult:
        """As `ResolveClient.call_tool`, blocking."""
        stub = broker_pb2_grpc.ProxyServiceStub(self._channel)  # type: ignore[no-untyped-call]
        request = _tool_request(_key(connection_id, name), tool, arguments, purpose)
        return _tool_result(stub.CallMcpTool(request, timeout=self._timeout))

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _key(connection_id: str | None, name: str | None) -> CacheKey:
    if (connection_id is None) == (name is None):
        raise ValueError("give exactly one of connection_id and name")
    key = ("id", connection_id) if connection_id is not None else ("name", name or "")
    if not key[1]:
        raise ValueError(f"{'connection_id' if key[0] == 'id' else 'name'} must not be empty")
    return key


class _Ref(TypedDict, total=False):
    """The request fields that name a connection: its id or its name."""

    connection_id: str
    name: str


def _ref(key: CacheKey) -> _Ref:
    return {"connection_id": key[1]} if key[0] == "id" else {"name": key[1]}


def _request(key: CacheKey, purpose: str, known_secret_version: int) -> Any:
    return broker_pb2.ResolveRequest(purpose=purpose, known_secret_version=known_secret_version, **_ref(key))


def _from_reply(reply: Any) -> Resolved:
    expires = reply.expires_at.ToDatetime(tzinfo=dt.UTC) if reply.HasField("expires_at") else None
    superseded = reply.superseded_at.ToDatetime(tzinfo=dt.UTC) if reply.HasField("superseded_at") else None
    return Resolved(
        connection_id=reply.connection_id,
        name=reply.name,
        type=reply.type,
        provider=reply.provider,
        config=struct_to_dict(reply.config),
        secrets=dict(reply.secrets),
        expires_at=expires,
        cache_ttl_seconds=reply.cache_ttl_seconds,
        secret_version=reply.secret_version,
        superseded_at=superseded,
    )


def _credentials(ca: Path, cert: Path, key: Path) -> Any:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )


def _options(server_name: str | None) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
