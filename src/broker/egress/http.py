"""An httpx client whose every connection goes to a policy-checked address.

httpcore opens TCP through a network backend; ours resolves through the policy
and connects to a checked IP, then httpcore starts TLS with the original host
name, so certificates are verified as usual. A request hook also refuses, before
anything is sent, URLs with credentials, other schemes, hosts outside
`allow_hosts` and blocked IP literals. httpx refuses some spellings of an address
(octal, full-width digits) before that hook runs, so a user-given URL is first read
by `EgressPolicy.check_url` and the client gets its `.text`; `request()` does that
itself, and reads redirect locations the same way (`redirect_url`; a response
hook hands httpx the location in that form).

Redirects: `http_client` does not follow them. `request()` follows up to
`max_redirects` hops itself, each checked like the first; once a hop leaves the
original origin (scheme, host, port) no credentials travel any further: no
`auth`, and only a few harmless headers (so `Authorization`, `Cookie` and custom
API-key headers are dropped), and a 307/308 that would resend a body there is
refused. Bodies are read up to `max_response_bytes` (see `read_body`).

Content codings: the client asks for `gzip, deflate` only (`ACCEPT_ENCODING`), and
`body_chunks` decodes one of them in bounded steps; a body in any other coding (or
several stacked) raises `UnreadableBody` rather than come back undecoded, where no
scrubber could find a secret in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import zlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, cast

import httpcore
import httpx

from broker.egress.errors import Blocked, InvalidTarget, ResponseTooLarge, UnreadableBody
from broker.egress.hosts import parse_url
from broker.egress.policy import EgressPolicy

__all__ = [
    "ACCEPT_ENCODING",
    "PolicyClient",
    "body_chunks",
    "http_client",
    "read_body",
    "redirect_url",
    "request",
]

# Keyword arguments httpx only honours on the transport: passed there, not silently ignored.
_TRANSPORT_KWARGS = ("verify", "cert", "http1", "http2", "limits", "local_address", "socket_options")
# Keyword arguments that would route requests around the policy.
_REFUSED_KWARGS = ("proxy", "mounts", "app", "uds")
# Request headers still sent once a redirect left the original origin.
_CROSS_ORIGIN_HEADERS = frozenset(
    {"accept", "accept-encoding", "accept-language", "user-agent", "content-type"}
)
# A URL with a scheme (RFC 3986), as opposed to a reference relative to the current one.
_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# Each address gets the full connect timeout; a few are enough for an IPv6/IPv4 fallback.
_MAX_ATTEMPTS = 3
# The content codings `body_chunks` decodes (zlib's window bits for each), and what every
# request asks for: httpx's own default would follow whichever codecs happen to be installed.
_CODINGS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS}
ACCEPT_ENCODING = "gzip, deflate"
# At most this many decoded bytes per step: a highly compressed chunk is inflated a step at a
# time, so a reader that stops at its cap never holds more than the cap plus one step.
_STEP = 64 * 1024


class _PolicyBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._policy.resolve(host, port)
        error: Exception | None = None
        for address in addresses[:_MAX_ATTEMPTS]:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed by the egress policy")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class PolicyClient(httpx.AsyncClient):
    """An AsyncClient that remembers the policy it was built for (see `http_client`)."""

    def __init__(self, policy: EgressPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.egress_policy = policy


def _request_hook(policy: EgressPolicy) -> Any:
    async def check(request: httpx.Request) -> None:
        policy.check_url(str(request.url))

    return check


_RECEIVED_HEADERS = "broker.received_headers"


async def _standard_location(response: httpx.Response) -> None:
    # httpx reads a redirect's Location itself, even when not following it (to offer
    # `next_request`), and fails the whole exchange on a spelling of an address it does not
    # know. It gets the location as the policy reads it: absolute, host in standard form.
    location = response.headers.get("location")
    if location is not None:
        with contextlib.suppress(InvalidTarget):
            received = list(response.headers.raw)
            response.headers["location"] = str(redirect_url(response.request.url, location))
            response.extensions[_RECEIVED_HEADERS] = received


def received_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    """The headers as the server sent them: the Location not made absolute and re-encoded (a
    secret in it would be in none of the forms a scrubber knows)."""
    received: list[tuple[bytes, bytes]] | None = response.extensions.get(_RECEIVED_HEADERS)
    return list(response.headers.raw) if received is None else received


def http_client(policy: EgressPolicy, **kwargs: Any) -> httpx.AsyncClient:
    """An AsyncClient with the policy's timeouts and pinned, checked connections.

    Transport options (`verify`, `cert`, `http2`, `limits`, ...) are applied to the
    policy's transport. `proxy`, `mounts`, `app`, `uds` and `trust_env=True` are
    refused; `transport` only as an `httpx.MockTransport` (unit tests).
    """
    refused = [name for name in _REFUSED_KWARGS if name in kwargs]
    if refused or kwargs.get("trust_env"):
        raise TypeError(f"http_client refuses {refused or ['trust_env']}: it would bypass the egress policy")
    transport = kwargs.pop("transport", None)
    if transport is None:
        options = {name: kwargs.pop(name) for name in _TRANSPORT_KWARGS if name in kwargs}
        transport = httpx.AsyncHTTPTransport(retries=0, trust_env=False, **options)
        pool = transport._pool
        # httpx has no public hook for the network backend; fail loudly if its internals move.
        if not hasattr(pool, "_network_backend"):
            raise RuntimeError("this httpx version hides the network backend; the egress policy cannot apply")
        pool._network_backend = _PolicyBackend(policy)
    elif not isinstance(transport, httpx.MockTransport):
        raise TypeError("http_client accepts only an httpx.MockTransport as transport")
    hooks = dict(kwargs.pop("event_hooks", None) or {})
    hooks["request"] = [_request_hook(policy), *hooks.get("request", [])]
    hooks["response"] = [_standard_location, *hooks.get("response", [])]
    headers = httpx.Headers(kwargs.pop("headers", None))
    headers["Accept-Encoding"] = ACCEPT_ENCODING
    settings = policy.settings
    kwargs.setdefault("timeout", httpx.Timeout(settings.total_timeout, connect=settings.connect_timeout))
    kwargs.setdefault("follow_redirects", False)
    kwargs.setdefault("max_redirects", settings.max_redirects)
    return PolicyClient(
        policy, transport=transport, trust_env=False, event_hooks=hooks, headers=headers, **kwargs
    )


async def body_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body of a streamed response, decoded from its content coding, in pieces of at most
    64 KiB however compressed it is. `UnreadableBody` for a body (an empty one is fine) in a
    coding not in `ACCEPT_ENCODING` (`x-gzip` is gzip), in several stacked, or broken."""
    if hasattr(response, "_content"):  # read already (a response made with its content), decoded
        yield response.content
        return
    listed = response.headers.get_list("content-encoding", split_commas=True)
    named = (value.strip().lower() for value in listed)
    codings = [coding for coding in named if coding not in ("", "identity")]
    decoder: _Inflater | None = None
    try:
        async for chunk in response.aiter_raw():
            if not codings:
                yield chunk
                continue
            if not chunk:
                continue
            if decoder is None:
                if len(codings) > 1 or codings[0] not in _CODINGS:
                    raise UnreadableBody(
                        f"the content encoding {', '.join(codings)} is not one the broker reads"
                    )
                decoder = _Inflater(_CODINGS[codings[0]], raw_fallback=codings[0] == "deflate")
            data = chunk
            while data and not decoder.eof:
                piece, data = decoder.step(data)
                if piece:
                    yield piece
        if decoder is not None and (rest := decoder.flush()):
            yield rest
    except zlib.error:
        raise UnreadableBody(f"the body is not valid {codings[0]}") from None


class _Inflater:
    """zlib's decompressor, one bounded step at a time; "deflate" is often sent raw, without
    its zlib header, so that is tried when the header is not there (httpx reads both too)."""

    def __init__(self, wbits: int, *, raw_fallback: bool) -> None:
        self._zlib = zlib.decompressobj(wbits)
        self._raw_fallback = raw_fallback

    @property
    def eof(self) -> bool:
        return self._zlib.eof

    def step(self, data: bytes) -> tuple[bytes, bytes]:
        """At most `_STEP` decoded bytes, and the part of `data` not consumed yet."""
        try:
            piece = self._zlib.decompress(data, _STEP)
        except zlib.error:
            if not self._raw_fallback:
                raise
            self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            piece = self._zlib.decompress(data, _STEP)
        self._raw_fallback = False
        return piece, self._zlib.unconsumed_tail

    def flush(self) -> bytes:
        return self._zlib.flush()


async def read_body(response: httpx.Response, limit: int, *, truncate: bool = False) -> bytes:
    """Read the (decoded) body up to `limit` bytes and close the response.

    A longer body raises `ResponseTooLarge`, or with `truncate=True` is cut to its
    first `limit` bytes; either way reading stops there. Afterwards
    `response.content`, `.text` and `.json()` work on what was read.
    """
    parts: list[bytes] = []
    size = 0
    try:
        # Counted after decoding, so a small compressed body cannot expand past the cap.
        async with aclosing(cast(AsyncGenerator[bytes, None], body_chunks(response))) as chunks:
            async for chunk in chunks:
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    if not truncate:
                        raise ResponseTooLarge(limit)
                    break
    finally:
        await response.aclose()
    body = b"".join(parts)[:limit]
    # What `aread()` would have stored; httpx offers no public way to attach a partial read.
    response._content = body
    return body


def redirect_url(base: httpx.URL, location: str) -> httpx.URL:
    """Where a redirect's `location` points from `base`; an absolute one is read by `parse_url`.

    So a redirect to an odd spelling of an address is judged like a URL the user typed.
    Raises `InvalidTarget` when it is not an http(s) URL that can be read.
    """
    location = location.strip()
    if location.startswith("//"):  # scheme-relative
        location = f"{base.scheme}:{location}"
    try:
        if _ABSOLUTE.match(location):
            return httpx.URL(parse_url(location).text)
        return base.join(location)
    except httpx.InvalidURL:
        raise InvalidTarget("the redirect location is not a valid URL") from None


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port


def _redirect_method(method: str, status: int) -> str:
    # The same rules httpx applies when it follows redirects itself.
    if status in (303, 302) and method != "HEAD":
        return "GET"
    if status == 301 and method == "POST":
        return "GET"
    return method


def _next_request(
    policy: EgressPolicy,
    previous: httpx.Request,
    response: httpx.Response,
    origin: tuple[str, str, int | None],
    left_origin: bool,
) -> tuple[httpx.Request, bool]:
    """The request for the next hop, and whether the chain has now left `origin`."""
    url = redirect_url(previous.url, response.headers["location"])
    policy.check_url(str(url))
    left_origin = left_origin or _origin(url) != origin
    method = _redirect_method(previous.method, response.status_code)
    keep_body = method == previous.method
    body = previous.content if keep_body else b""
    if body and left_origin:
        raise Blocked(f"refusing a {response.status_code} redirect that resends the body to another origin")
    headers = httpx.Headers(previous.headers)
    for name in ("host", "content-length", "transfer-encoding", *(() if keep_body else ("content-type",))):
        headers.pop(name, None)
    if left_origin:
        headers = httpx.Headers([(k, v) for k, v in headers.multi_items() if k in _CROSS_ORIGIN_HEADERS])
    hop = httpx.Request(method, url, headers=headers, content=body or None, extensions=previous.extensions)
    return hop, left_origin


async def _follow(
    client: PolicyClient, method: str, url: str | httpx.URL, truncate: bool, kwargs: dict[str, Any]
) -> httpx.Response:
    settings = client.egress_policy.settings
    auth = kwargs.pop("auth", httpx.USE_CLIENT_DEFAULT)
    req = client.build_request(method, url, **kwargs)
    origin = _origin(req.url)
    left_origin = False
    history: list[httpx.Response] = []
    for _ in range(settings.max_redirects + 1):
        response = await client.send(req, stream=True, auth=None if left_origin else auth)
        if not response.has_redirect_location:
            await read_body(response, settings.max_response_bytes, truncate=truncate)
            response.history = history
            return response
        await response.aclose()
        history.append(response)
        req, left_origin = _next_request(client.egress_policy, req, response, origin, left_origin)
    raise httpx.TooManyRedirects(f"more than {settings.max_redirects} redirects", request=req)


async def request(
    client_or_policy: httpx.AsyncClient | EgressPolicy,
    method: str,
    url: str | httpx.URL,
    *,
    truncate: bool = False,
    **kwargs: Any,
) -> httpx.Response:
    """Send a request, following up to `max_redirects` checked redirects, within the total timeout.

    The client must come from `http_client` (a policy alone gets a fresh one). The
    body is read with `read_body` (`ResponseTooLarge`, or cut with `truncate=True`).
    `kwargs` are `httpx.AsyncClient.build_request`'s plus `auth`. Raises `Blocked`,
    `InvalidTarget`, `DnsFailure`, `TimeoutError` (total timeout), `ResponseTooLarge`,
    `httpx.TooManyRedirects` and httpx's transport errors.
    """
    if isinstance(client_or_policy, EgressPolicy):
        async with http_client(client_or_policy) as client:
            return await request(client, method, url, truncate=truncate, **kwargs)
    if not isinstance(client_or_policy, PolicyClient):
        raise TypeError("request() needs a client made by broker.egress.http.http_client")
    if isinstance(url, str):
        # Read by the policy's parser before httpx: see `EgressPolicy.check_url`.
        url = client_or_policy.egress_policy.check_url(url).text
    async with asyncio.timeout(client_or_policy.egress_policy.settings.total_timeout):
        return await _follow(client_or_policy, method, url, truncate, dict(kwargs))
