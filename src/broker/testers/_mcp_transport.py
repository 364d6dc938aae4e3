"""The MCP SDK's HTTP traffic, carried by the egress policy's httpx client.

The `mcp` SDK speaks HTTP through `httpx2` (a fork of httpx with its own
connection pool), while the egress policy hands out an `httpx.AsyncClient`
whose every connection goes to a policy-checked address. `EgressTransport` is
an `httpx2` transport that forwards each request to that client, so no byte
the SDK sends reaches the network any other way. It also keeps a log of the
HTTP exchanges: the SDK turns a 401 or an HTML page into an anonymous
JSON-RPC error, and the tester needs the status and content type to classify.

Exceptions are translated at this boundary into the `httpx2` class of the same
name (the SDK catches `httpx2` types), with the original kept as the cause.
Policy refusals (`Blocked`, `DnsFailure`) pass through untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import httpx2

from broker.egress.http import body_chunks

# Headers that describe the body as it was sent, not as `_Body` passes it on.
_DECODED_AWAY = frozenset({b"content-encoding", b"content-length"})


class BodyLimitExceeded(httpx2.ReadError):
    """A response body passed the egress policy's byte cap.

    A read error to the SDK, which then fails the request; `ExchangeLog.too_large`
    tells the tester why.
    """


@dataclass(frozen=True)
class Exchange:
    """One HTTP request the SDK made and the status and content type it got back."""

    method: str
    path: str
    status: int
    content_type: str


@dataclass
class ExchangeLog:
    """What the tester learns from the wire, beyond what the SDK reports."""

    exchanges: list[Exchange] = field(default_factory=list)
    too_large: bool = False

    def first_error(self) -> Exchange | None:
        """The first error status answering a POST (a message); GET streams and DELETE are optional."""
        return next((e for e in self.exchanges if e.status >= 400 and e.method == "POST"), None)

    def first_foreign(self) -> Exchange | None:
        """The first message answer whose body is neither JSON nor an event stream (not MCP).

        202 Accepted carries no message, whatever its content type.
        """
        for e in self.exchanges:
            mcp_type = e.content_type.startswith(("application/json", "text/event-stream"))
            if e.status < 300 and e.status != 202 and e.content_type and not mcp_type:
                return e
        return None


def _translate(exc: httpx.HTTPError, request: httpx2.Request) -> Exception:
    """The `httpx2` exception of the same name (or its nearest base), carrying the message."""
    kind = getattr(httpx2, type(exc).__name__, None)
    if not (isinstance(kind, type) and issubclass(kind, httpx2.TransportError)):
        kind = httpx2.TransportError
    return kind(str(exc), request=request)


class _Body(httpx2.AsyncByteStream):
    """A streamed response body, read from the egress client, decoded, capped at `limit` bytes."""

    def __init__(
        self, response: httpx.Response, request: httpx2.Request, log: ExchangeLog, limit: int
    ) -> None:
        self._response = response
        self._request = request
        self._log = log
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        try:
            # Decoded here, in bounded steps, and counted decoded: a server may compress whatever
            # it was asked for, and httpx2 would inflate each read whole before the count.
            async for chunk in body_chunks(self._response):
                read += len(chunk)
                if read > self._limit:
                    self._log.too_large = True
                    raise BodyLimitExceeded(
                        f"response larger than {self._limit} bytes", request=self._request
                    )
                yield chunk
        except httpx.HTTPError as exc:
            raise _translate(exc, self._request) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class EgressTransport(httpx2.AsyncBaseTransport):
    """An `httpx2` transport that sends every request through the egress policy's httpx client."""

    def __init__(self, client: httpx.AsyncClient, max_response_bytes: int) -> None:
        self._client = client
        self._limit = max_response_bytes
        self.log = ExchangeLog()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        headers = httpx.Headers(request.headers.raw)
        # Uncompressed bodies, so the byte cap counts what the SDK will parse (no gzip bombs).
        headers["accept-encoding"] = "identity"
        outbound = self._client.build_request(
            request.method, str(request.url), headers=headers, content=body or None
        )
        try:
            response = await self._client.send(outbound, stream=True)
        except httpx.HTTPError as exc:
            raise _translate(exc, request) from exc
        self.log.exchanges.append(
            Exchange(
                request.method,
                request.url.path,
                response.status_code,
                response.headers.get("content-type", "").lower(),
            )
        )
        # The body is passed on decoded (`_Body`): httpx2 must not decode it again.
        headers_in = [(k, v) for k, v in response.headers.raw if k.lower() not in _DECODED_AWAY]
        return httpx2.Response(
            status_code=response.status_code,
            headers=headers_in,
            stream=_Body(response, request, self.log, self._limit),
            extensions={"http_version": response.extensions.get("http_version", b"HTTP/1.1")},
        )

    def client(
        self, headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None
    ) -> httpx2.AsyncClient:
        """An `httpx2.AsyncClient` that can only use this transport.

        `trust_env=False` matters: with it on, httpx2 would mount its own proxy
        transports from the environment, which would bypass this one. httpx2's
        timeouts are not applied; the egress client's are.
        """
        client = httpx2.AsyncClient(
            transport=self,
            headers=headers,
            timeout=timeout if timeout is not None else httpx2.Timeout(None),
            trust_env=False,
            follow_redirects=False,
        )
        return client
