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

The certificate files are read again when they change (`broker.certfiles`): a client with a
short-lived certificate moves to the renewed one by itself.

A reply is cached for its `cache_ttl_seconds` (the broker's choice; 0 means not at
all) and never past its `expires_at`. Cached replies skip the broker, so they also
skip its audit trail: the first resolve in each TTL window is the one recorded.

When a ref is resolved again (its TTL ran out, it was invalidated, or `refresh=True`),
the client tells the broker which `secret_version` it received last, and the answer's
`superseded_at` says when that secret was replaced (an executor rebuilds its pools then).

A dynamic database connection answers with a lease: a database user made for this call
(`Resolved.lease`; `config["username"]` and `secrets["password"]` are its). The client renews
the newest lease of each ref and `run_id` when 2/3 of its current life has passed, up to its
`max_expires_at` (the async client from a task, the sync one from a daemon thread; see
`held_leases`), and revokes every lease it still holds on `close()`; errors there are logged
(logger `broker.client`), not raised. Cached answers are per `run_id`: a lease made for one
run is never handed to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
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
from broker.certfiles import CertificateFiles, TlsMaterial
from broker.held_leases import HeldLeases, Lease

__all__ = ["Lease", "ResolveClient", "Resolved", "SyncResolveClient", "ToolResult", "struct_to_dict"]

Ref = tuple[str, str]  # ("id", x) or ("name", x)
CacheKey = tuple[str, str, str]  # a ref and the run_id it was resolved for
Clock = Callable[[], float]

log = logging.getLogger("broker.client")
MIN_RENEW_PAUSE = 1.0  # seconds after a renewal pass failed unexpectedly
_START_LOCK = threading.Lock()  # one renewer thread per sync client, however many threads resolve
# The renewer sleeps at most this long, so that a jump of the wall clock is noticed.
_MAX_RENEW_WAIT = 60.0
# Renewal answers that will not change: the lease ended (or is unknown), or the grant is gone.
_ENDED = frozenset(
    {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED}
)


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
    lease: Lease | None = None

    def __repr__(self) -> str:
        masked = {k: "***" for k in self.secrets}
        return (
            f"Resolved(connection_id={self.connection_id!r}, name={self.name!r}, type={self.type!r}, "
            f"provider={self.provider!r}, config={self.config!r}, secrets={masked!r}, "
            f"expires_at={self.expires_at!r}, cache_ttl_seconds={self.cache_ttl_seconds!r}, "
            f"secret_version={self.secret_version!r}, superseded_at={self.superseded_at!r}, "
            f"lease={self.lease!r})"
        )

    def __reduce__(self) -> NoReturn:
        # Pickles end up on disk and in queues; secrets should not travel that way by accident.
        raise TypeError("a Resolved holds secrets and cannot be pickled")


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a dict, whole numbers as ints (protobuf stores every number as a double)."""
    result: dict[str, Any] = _plain(json_format.MessageToDict(struct))
    return result


class ResolvedCache:
    """Resolved replies by (ref, run_id), each until its TTL or its expiry, whichever is first.

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

    def invalidate(self, ref: Ref | None = None) -> None:
        """Forget one ref's replies (for every run_id), or everything."""
        if ref is None:
            self._entries.clear()
        else:
            for key in [k for k in self._entries if k[:2] == ref]:
                del self._entries[key]

    def drop_lease(self, lease_id: str) -> None:
        """Forget the replies that carry this lease (it was revoked)."""
        for key in [
            k for k, (_, v) in self._entries.items() if v.lease is not None and v.lease.id == lease_id
        ]:
            del self._entries[key]


MAX_HELD = 10_000  # refs whose last secret version the client remembers


class _Base:
    _secure_channel: Callable[..., Any]  # grpc.aio.secure_channel or grpc.secure_channel

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
        secure_channel, options = type(self)._secure_channel, _options(server_name)

        def open_channel(material: TlsMaterial) -> Any:
            return secure_channel(target, _credentials(material), options=options)

        files = CertificateFiles(ca, cert, key)
        self._setup(open_channel(files.material), cache, timeout, clock, wall_clock, files, open_channel)

    def _setup(
        self,
        channel: Any,
        cache: bool,
        timeout: float | None,
        clock: Clock,
        wall_clock: Clock,
        files: CertificateFiles | None = None,
        open_channel: Callable[[TlsMaterial], Any] | None = None,
    ) -> None:
        self._use(channel)
        # The TLS files, to move to renewed ones (None for a channel built by the caller), and the
        # channel before the last renewal, where calls under way finish; closed at the next one.
        self._files, self._open_channel = files, open_channel
        self._retired: Any = None
        self._retiring: set[asyncio.Task[None]] = set()  # the async client's closes of retired channels
        self._timeout = timeout
        self._cache = ResolvedCache(clock, wall_clock) if cache else None
        # (connection_id, secret_version) last received per ref; outlives cache entries, so a
        # re-resolve can name the version it held. Bounded: past MAX_HELD refs the oldest go
        # (a forgotten ref is sent as version 0, which only costs it one superseded_at).
        self._held: dict[Ref, tuple[str, int]] = {}
        self._leases = HeldLeases(wall_clock)

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
        client._setup(channel, cache, timeout, clock, wall_clock)
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

    def _current(self) -> Any:
        """The Resolve stub, on a channel with the newest usable TLS files."""
        material = self._files.renewed() if self._files is not None else None
        if material is not None and self._open_channel is not None:
            channel = self._open_channel(material)
            retired, self._retired = self._retired, self._channel
            self._use(channel)
            if retired is not None:
                self._close_retired(retired)
            log.info("the client's TLS files changed: new calls use them")
        return self._stub

    def _use(self, channel: Any) -> None:
        """New calls go over `channel`; its stubs are made once per channel, not per call."""
        self._channel = channel
        self._stub = broker_pb2_grpc.ResolveServiceStub(channel)  # type: ignore[no-untyped-call]
        self._proxy: Any = None  # made by the first proxied call

    def _proxy_stub(self) -> Any:
        """The proxy stub, on a channel with the newest usable TLS files."""
        self._current()
        if self._proxy is None:
            self._proxy = broker_pb2_grpc.ProxyServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return self._proxy

    def _close_retired(self, channel: Any) -> None:
        """Close a channel replaced two renewals ago (each client type closes its own way)."""

    def _cached(self, key: CacheKey, refresh: bool) -> Resolved | None:
        return self._cache.get(key) if self._cache is not None and not refresh else None

    def _request_for(self, key: CacheKey, purpose: str) -> Any:
        held = self._held.get(key[:2])
        return _request(key, purpose, held[1] if held is not None else 0)

    def _remember(self, key: CacheKey, reply: Any) -> Resolved:
        value = _from_reply(reply)
        ref: Ref = (key[0], key[1])
        held = self._held.get(ref)
        if held is not None and held[0] == value.connection_id:
            # Concurrent resolves may answer out of order; versions only rise.
            self._held[ref] = (value.connection_id, max(held[1], value.secret_version))
        else:
            if ref not in self._held and len(self._held) >= MAX_HELD:
                del self._held[next(iter(self._held))]
            self._held[ref] = (value.connection_id, value.secret_version)
            if value.superseded_at is not None:
                # A name now pointing at another connection: the time is of that one's history.
                value = replace(value, superseded_at=None)
        if value.lease is not None:
            self._leases.add(key, value.lease)
            self._lease_added()
        if self._cache is not None:
            # The news is for this caller; later cache hits must not report it again.
            cached = value if value.superseded_at is None else replace(value, superseded_at=None)
            self._cache.put(key, cached)
        return value

    def _lease_added(self) -> None:
        """Make sure the renewer runs (each client type has its own)."""

    def _renew_failed(self, lease: Lease, exc: grpc.RpcError) -> None:
        code = _code(exc)
        if code in _ENDED:
            self._leases.remove(lease.id)
            log.info("lease %s is no longer renewed (%s)", lease.id, code.name)
        else:
            self._leases.retry_later(lease.id)
            log.warning("could not renew lease %s (%s); trying again", lease.id, code.name)

    def _revoked(self, lease_id: str) -> None:
        self._leases.remove(lease_id)
        if self._cache is not None:
            self._cache.drop_lease(lease_id)


# What httpx adds to frame a request; the broker frames the upstream request itself.
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def _proxy_request(request: httpx.Request, body: bytes, key: Ref, purpose: str) -> Any:
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


def _tool_request(key: Ref, tool: str, arguments: dict[str, Any] | None, purpose: str) -> Any:
    request = broker_pb2.CallMcpToolRequest(tool=tool, purpose=purpose, **_ref(key))
    request.arguments.update(arguments or {})
    return request


def _tool_result(reply: Any) -> ToolResult:
    structured = struct_to_dict(reply.structured_content) if reply.HasField("structured_content") else None
    return ToolResult([struct_to_dict(item) for item in reply.content], reply.is_error, structured)


class _AsyncProxyTransport(httpx.AsyncBaseTransport):
    def __init__(self, stub: Callable[[], Any], key: Ref, purpose: str, timeout: float | None) -> None:
        self._stub, self._key, self._purpose, self._timeout = stub, key, purpose, timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        proxied = _proxy_request(request, await request.aread(), self._key, self._purpose)
        return _proxy_response(await self._stub().ProxyHttp(proxied, timeout=self._timeout), request)


class _SyncProxyTransport(httpx.BaseTransport):
    def __init__(self, stub: Callable[[], Any], key: Ref, purpose: str, timeout: float | None) -> None:
        self._stub, self._key, self._purpose, self._timeout = stub, key, purpose, timeout

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        proxied = _proxy_request(request, request.read(), self._key, self._purpose)
        return _proxy_response(self._stub().ProxyHttp(proxied, timeout=self._timeout), request)


class ResolveClient(_Base):
    """Async (grpc.aio) client of the Resolve API; create it inside a running event loop."""

    _secure_channel = staticmethod(grpc.aio.secure_channel)

    async def resolve(
        self,
        connection_id: str | None = None,
        *,
        name: str | None = None,
        purpose: str = "",
        refresh: bool = False,
        run_id: str = "",
    ) -> Resolved:
        """Resolve by id or by name (exactly one); `purpose` is recorded in the audit trail.

        `run_id` names the caller's run (workflow run, agent session): a lease made by this
        call is recorded with it. `refresh=True` skips the cache and asks the broker. Raises
        ValueError for a bad reference and grpc.RpcError for what the broker refuses.
        """
        key = (*_key(connection_id, name), run_id)
        cached = self._cached(key, refresh)
        if cached is not None:
            return cached
        reply = await self._current().Resolve(self._request_for(key, purpose), timeout=self._timeout)
        return self._remember(key, reply)

    async def renew_lease(self, lease_id: str, increment_seconds: int = 0) -> Lease:
        """Extend a lease by `increment_seconds` from now (0: the connection's default_ttl), never
        past its max_expires_at; the client's own renewals then follow the new end."""
        request = broker_pb2.RenewLeaseRequest(lease_id=lease_id, increment_seconds=increment_seconds)
        lease = _lease(await self._current().RenewLease(request, timeout=self._timeout))
        self._leases.renewed(lease)
        return lease

    async def revoke_lease(self, lease_id: str) -> Lease:
        """End a lease now: its database user is dropped (state `revoked`, or `revoking` while the
        broker keeps trying). Cached answers that carry it are dropped."""
        reply = await self._current().RevokeLease(
            broker_pb2.RevokeLeaseRequest(lease_id=lease_id), timeout=self._timeout
        )
        self._revoked(lease_id)
        return _lease(reply)

    async def renew_due(self) -> float | None:
        """Renew the held leases that are due; seconds until the next is due (None: none held).
        The client's task calls this; errors are logged, not raised."""
        for lease in self._leases.due():
            request = broker_pb2.RenewLeaseRequest(lease_id=lease.id)
            try:
                self._leases.renewed(_lease(await self._current().RenewLease(request, timeout=self._timeout)))
            except grpc.RpcError as exc:
                self._renew_failed(lease, exc)
        return self._leases.seconds_to_next()

    def _lease_added(self) -> None:
        wake = getattr(self, "_wake", None)
        if wake is None:
            # Made here, not in __init__: from_channel skips __init__, and the loop must be running.
            wake = self._wake = asyncio.Event()
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        wake.set()

    async def _renew_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                delay = await self.renew_due()
            except Exception:  # the renewer must outlive one bad pass
                log.exception("lease renewal pass failed")
                delay = MIN_RENEW_PAUSE
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the cancellation
            # from close() when the event is set at the same moment, and close() would never return.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_wait(delay)):
                    await self._wake.wait()

    def proxy_transport(
        self, connection_id: str | None = None, *, name: str | None = None, purpose: str = ""
    ) -> httpx.AsyncBaseTransport:
        """An httpx transport that sends each request through the broker's proxy (see the module
        docstring); errors from the broker are `grpc.RpcError`, as for `resolve`."""
        return _AsyncProxyTransport(self._proxy_stub, _key(connection_id, name), purpose, self._timeout)

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
        stub = self._proxy_stub()
        request = _tool_request(_key(connection_id, name), tool, arguments, purpose)
        return _tool_result(await stub.CallMcpTool(request, timeout=self._timeout))

    async def close(self) -> None:
        """Stop renewing, revoke every lease still held (errors logged, not raised), close the channel."""
        renewer = getattr(self, "_renewer", None)
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        await asyncio.gather(*(self._revoke_quietly(lease) for lease in self._leases.take_live()))
        await asyncio.gather(*self._retiring)
        if self._retired is not None:
            await self._retired.close()
        await self._channel.close()

    def _close_retired(self, channel: Any) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _revoke_quietly(self, lease: Lease) -> None:
        try:
            await self._current().RevokeLease(
                broker_pb2.RevokeLeaseRequest(lease_id=lease.id), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            log.warning("could not revoke lease %s on close (%s)", lease.id, _code(exc).name)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class SyncResolveClient(_Base):
    """Blocking client of the Resolve API, with the same API as `ResolveClient`."""

    _secure_channel = staticmethod(grpc.secure_channel)

    def resolve(
        self,
        connection_id: str | None = None,
        *,
        name: str | None = None,
        purpose: str = "",
        refresh: bool = False,
        run_id: str = "",
    ) -> Resolved:
        """As `ResolveClient.resolve`, blocking."""
        key = (*_key(connection_id, name), run_id)
        cached = self._cached(key, refresh)
        if cached is not None:
            return cached
        reply = self._current().Resolve(self._request_for(key, purpose), timeout=self._timeout)
        return self._remember(key, reply)

    def renew_lease(self, lease_id: str, increment_seconds: int = 0) -> Lease:
        """As `ResolveClient.renew_lease`, blocking."""
        request = broker_pb2.RenewLeaseRequest(lease_id=lease_id, increment_seconds=increment_seconds)
        lease = _lease(self._current().RenewLease(request, timeout=self._timeout))
        self._leases.renewed(lease)
        return lease

    def revoke_lease(self, lease_id: str) -> Lease:
        """As `ResolveClient.revoke_lease`, blocking."""
        reply = self._current().RevokeLease(
            broker_pb2.RevokeLeaseRequest(lease_id=lease_id), timeout=self._timeout
        )
        self._revoked(lease_id)
        return _lease(reply)

    def renew_due(self) -> float | None:
        """As `ResolveClient.renew_due`, blocking; the client's daemon thread calls it."""
        for lease in self._leases.due():
            request = broker_pb2.RenewLeaseRequest(lease_id=lease.id)
            try:
                self._leases.renewed(_lease(self._current().RenewLease(request, timeout=self._timeout)))
            except grpc.RpcError as exc:
                self._renew_failed(lease, exc)
        return self._leases.seconds_to_next()

    def _lease_added(self) -> None:
        # A daemon thread, not renewal on access: a pool may use the user for an hour without
        # calling the client, and the lease must not run out under it. Daemon: a program that
        # forgets close() still exits (its leases then end at their expiry, or by the reconciler).
        with _START_LOCK:
            if getattr(self, "_renewer", None) is None:
                self._wake = threading.Event()
                self._closing = False
                self._renewer = threading.Thread(
                    target=self._renew_forever, name="broker-lease-renewer", daemon=True
                )
                self._renewer.start()
        self._wake.set()

    def _renew_forever(self) -> None:
        while not self._closing:
            self._wake.clear()
            try:
                delay = self.renew_due()
            except Exception:  # the renewer must outlive one bad pass
                log.exception("lease renewal pass failed")
                delay = MIN_RENEW_PAUSE
            self._wake.wait(_wait(delay))

    def proxy_transport(
        self, connection_id: str | None = None, *, name: str | None = None, purpose: str = ""
    ) -> httpx.BaseTransport:
        """As `ResolveClient.proxy_transport`, for `httpx.Client`."""
        return _SyncProxyTransport(self._proxy_stub, _key(connection_id, name), purpose, self._timeout)

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
        stub = self._proxy_stub()
        request = _tool_request(_key(connection_id, name), tool, arguments, purpose)
        return _tool_result(stub.CallMcpTool(request, timeout=self._timeout))

    def close(self) -> None:
        """Stop renewing, revoke every lease still held (errors logged, not raised), close the channel."""
        renewer: threading.Thread | None = getattr(self, "_renewer", None)
        if renewer is not None:
            self._closing = True
            self._wake.set()
            renewer.join()  # at most one RenewLease call, bounded by the timeout
        for lease in self._leases.take_live():
            try:
                self._current().RevokeLease(
                    broker_pb2.RevokeLeaseRequest(lease_id=lease.id), timeout=self._timeout
                )
            except grpc.RpcError as exc:
                log.warning("could not revoke lease %s on close (%s)", lease.id, _code(exc).name)
        if self._retired is not None:
            self._retired.close()
        self._channel.close()

    def _close_retired(self, channel: Any) -> None:
        channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _key(connection_id: str | None, name: str | None) -> Ref:
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


def _ref(key: tuple[str, ...]) -> _Ref:
    return {"connection_id": key[1]} if key[0] == "id" else {"name": key[1]}


def _request(key: CacheKey, purpose: str, known_secret_version: int) -> Any:
    return broker_pb2.ResolveRequest(
        purpose=purpose, known_secret_version=known_secret_version, run_id=key[2], **_ref(key)
    )


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
        lease=_lease(reply.lease) if reply.HasField("lease") else None,
    )


def _lease(message: Any) -> Lease:
    max_expires = (
        message.max_expires_at.ToDatetime(tzinfo=dt.UTC) if message.HasField("max_expires_at") else None
    )
    try:
        state = broker_pb2.LeaseState.Name(message.state).removeprefix("LEASE_STATE_").lower()
    except ValueError:  # a state added to the broker after this client was built
        state = str(message.state)
    return Lease(
        id=message.id,
        connection_id=message.connection_id,
        username=message.username,
        expires_at=message.expires_at.ToDatetime(tzinfo=dt.UTC),
        max_expires_at=max_expires,
        run_id=message.run_id,
        state=state,
    )


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    code = exc.code() if hasattr(exc, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _wait(delay: float | None) -> float:
    return _MAX_RENEW_WAIT if delay is None else min(delay, _MAX_RENEW_WAIT)


def _credentials(material: TlsMaterial) -> Any:
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca, private_key=material.key, certificate_chain=material.cert
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
