"""One HTTP call to an upstream on an executor's behalf: the building block of proxy mode.

`injection` says how a connection's credential goes on a request (from its type, its
`auth_type` or its provider's data in `testers.providers`), and remembers every composed
form (`testers.sent`) for the scrubber. `call` sends one request through the egress
policy and returns the answer with every form of every secret masked:

* The caller's path is joined to the connection's base URL; it must be an absolute path
  with no dot segments or encoded dots and slashes (which an upstream might resolve
  elsewhere), no backslash and no scheme-relative `//`.
* The caller may not set the credential's header, `Authorization`, `Cookie`, `Host`, the
  framing or hop-by-hop headers, the method and URL overrides (`X-HTTP-Method-Override`,
  `X-Original-URL`, ...) that would take the call outside the scope checked, `Forwarded`,
  `X-Forwarded-*` or `X-Real-IP`, nor any of them spelled with `_` for `-`: refused
  (INVALID_ARGUMENT naming the header), never silently replaced. For the same reason a
  `_method` parameter, which Rails, Laravel and Symfony read as the request's method, is
  refused in the query and in a form, multipart or JSON body.
* No redirect is followed: a 3xx is the answer, its `Location` scrubbed like every other
  header. Following it would be another call, checked again (scope included).
* Nothing is retried (a 429 or 503 comes back at once, `Retry-After` and all): a retry
  could repeat a non-idempotent call, and the caller's deadline is theirs to spend.
* The exchange is bounded by the policy's total timeout (and by the caller's deadline,
  which the caller applies around `call`); the body by `max_bytes`, counted decoded so
  compression cannot inflate past it. The answer's body is decoded, so `Content-Encoding`
  and the framing headers are dropped. The broker asks for the codings it decodes (gzip,
  deflate), whatever `Accept-Encoding` the caller sent, and refuses an answer in any other
  (`UnreadableAnswer`): undecoded, a secret in it would pass the scrubber.
* Every header of the answer is scrubbed, its name as well as its value; `Set-Cookie` is
  dropped (a session the upstream opened for the credential is the credential's to use).

A webhook connection takes calls to its one URL by its one method, each body signed (hmac)
or with its bearer token; an `oauth2` connection's calls go to its provider's API with the
access token (`service.proxy` refreshes it when due and after a 401). Not here: who may call
(grants, scope), opening the secrets, audit; `mcp` connections (`testers.mcp.call_tool`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.cookiejar
import json
import re
import ssl
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import httpx

from broker import oauth
from broker.egress import EgressPolicy
from broker.egress.errors import ResponseTooLarge, UnreadableBody
from broker.egress.http import PolicyClient, body_chunks, http_client, read_body, received_headers
from broker.errors import FailedPrecondition, FieldViolation, InvalidArgument
from broker.model import plain_path
from broker.scrub import Scrubber
from broker.sensitive import SecretFields
from broker.testers import webhook
from broker.testers.http import trust
from broker.testers.providers import API_KEY_PROVIDERS, KeyStyle
from broker.testers.sent import SentCredentials

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ABSOLUTE = re.compile(r"^https?://", re.IGNORECASE)
_PORTS = {"http": 80, "https": 443}
# Never from the caller: the credential's carriers, the target, and what frames the message.
_REFUSED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
        # What makes an upstream act on another method or path than the one the grant's scope
        # was checked against (framework and gateway overrides)...
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        # ...or take the call for another client's (upstreams that trust forwarded addresses).
        "forwarded",
        "x-real-ip",
    }
)
_REFUSED_PREFIXES = ("x-forwarded-",)
# A part of an answer can begin or end inside an echoed secret, where what is left of it is no
# form the scrubber knows (it masks such a piece only at the body's very ends, 4 bytes or more):
# ranges of the caller's choosing would take a secret out a few bytes at a time.
_PARTIAL = frozenset({"range", "if-range"})
# Not passed back: what describes the upstream's encoding of a body we decoded and re-framed, and
# cookies, which an upstream may set for the broker's credential (a session): the executor could
# use one to call the upstream directly, outside its grant and the audit.
_DROPPED_ANSWER_HEADERS = frozenset(
    {
        "content-encoding",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "trailer",
        "set-cookie",
        "set-cookie2",
    }
)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")
MAX_HEADERS, MAX_HEADER_BYTES, MAX_PATH, MAX_QUERY = 64, 16 * 1024, 2048, 8192


class NotInjectable(FailedPrecondition):
    """The connection cannot be used through the proxy (its type, or no credential or base URL yet)."""


class AnswerTooLarge(FailedPrecondition):
    """The upstream's answer is over the proxy's byte limit."""


class UnreadableAnswer(FailedPrecondition):
    """The upstream's answer is in a content coding the broker does not decode, or broken in it."""


@functools.cache
def _trust() -> ssl.SSLContext:
    # Built once: loading the trust store takes milliseconds, and a context is safe to share.
    return trust()


@dataclass(frozen=True)
class Injection:
    """Where a connection's calls go and what the broker adds to each; `scrubber` masks what it sent.

    `credentials` are the headers that carry the secret: the caller can never set them.
    `defaults` (a provider's version or Accept header, the connection's extra headers) are
    sent unless the caller sends its own. A webhook (`only_method` set) takes calls to its
    one URL only (the path "/", no query), by its one method, and `sign` adds the headers
    that authenticate each body.
    """

    base_url: str
    credentials: Mapping[str, str]
    defaults: Mapping[str, str]
    scrubber: Scrubber
    only_method: str = ""
    sign: Callable[[bytes], Mapping[str, str]] | None = None


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    path: str
    query: str = ""
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""


@dataclass(frozen=True)
class UpstreamAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def base_url(connection_type: str, provider: str, config: Mapping[str, object]) -> str:
    """Where this connection's proxied calls go (no secret needed); `NotInjectable` when nowhere."""
    if connection_type == "webhook":
        return str(config.get("url") or "")
    if connection_type == "oauth2":
        return _oauth2_api(provider, config)[0]
    base = str(config.get("base_url") or "")
    if connection_type == "api_key":
        known = API_KEY_PROVIDERS.get(provider)
        return base or (known.default_base if known is not None else "")
    if connection_type == "http":
        return base
    raise NotInjectable(f"calls through the proxy are not built yet for {connection_type} connections")


def under_base(request: UpstreamRequest, base: str) -> UpstreamRequest:
    """`request` with an absolute URL in `path` turned into a path under `base` (and its query):
    accepted only at the base URL's origin and under its path, so a `next` link an API returns
    can be followed; any other URL is INVALID_ARGUMENT. A path is returned as it is."""
    if not _ABSOLUTE.match(request.path):
        return request
    if request.query:
        raise InvalidArgument.field("query", "must be empty when path is a URL (the URL carries the query)")
    try:
        url, root = httpx.URL(request.path), httpx.URL(base)
    except httpx.InvalidURL:
        raise InvalidArgument.field("path", "is not a valid URL") from None
    prefix = root.path.rstrip("/")
    origin = (url.scheme, url.host, url.port or _PORTS.get(url.scheme))
    if (
        origin != (root.scheme, root.host, root.port or _PORTS.get(root.scheme))
        or url.fragment
        or url.userinfo
        or not (url.path == prefix or url.path.startswith(prefix + "/"))
    ):
        raise InvalidArgument.field("path", "a URL must be under the connection's base URL")
    path = url.raw_path.decode("ascii").partition("?")[0][len(prefix) :] or "/"
    return UpstreamRequest(request.method, path, url.query.decode("ascii"), request.headers, request.body)


def injection(
    connection_type: str, provider: str, config: Mapping[str, object], secrets: SecretFields
) -> Injection:
    """How calls of this connection carry its credential; `NotInjectable` when they cannot."""
    base = base_url(connection_type, provider, config)  # NotInjectable for a type not built
    values = secrets.reveal()
    sent = SentCredentials()
    headers: dict[str, str] = {}
    defaults = _extra_headers(config)
    if connection_type == "http":
        auth = config.get("auth_type", "none")
        if auth == "bearer":
            headers["Authorization"] = sent.bearer(values["token"])
        elif auth == "basic":
            headers["Authorization"] = sent.basic(str(config.get("username", "")), values["password"])
        elif auth == "api_key":
            headers[str(config.get("api_key_header") or "X-API-Key")] = values["api_key_value"]
        elif auth == "oauth2":
            token = values.get("access_token")
            if not token:
                raise NotInjectable("the connection has no access token yet; authorize it first")
            headers["Authorization"] = sent.bearer(token)
    elif connection_type == "api_key":
        known = API_KEY_PROVIDERS.get(provider)
        if known is None or known.endpoint.key_style is KeyStyle.BEARER:
            headers["Authorization"] = sent.bearer(values["api_key"])
        else:
            headers[known.endpoint.key_header] = values["api_key"]
        if known is not None:
            defaults = dict(known.endpoint.headers)
    elif connection_type == "oauth2":
        token = values.get("access_token")
        if not token:
            raise NotInjectable("the connection has no access token yet; authorize it first")
        headers["Authorization"] = sent.bearer(token)
        defaults = _oauth2_api(provider, config)[1]
    else:  # webhook: `base_url` knows no other type
        return _webhook(config, values.get("auth_secret", ""), sent)
    if not base:
        raise NotInjectable("the connection has no base_url to send calls to")
    return Injection(base.rstrip("/"), headers, defaults, Scrubber(values.values(), sent.forms))


def _oauth2_api(provider_name: str, config: Mapping[str, object]) -> tuple[str, dict[str, str]]:
    """Where an OAuth2 connection's API calls go: the provider's API base, else the origin of
    its user-info endpoint (`verify_url` for a custom provider); and its default headers."""
    try:
        provider = oauth.provider_for(provider_name, config)
    except oauth.OAuthError as exc:
        raise NotInjectable(str(exc)) from None
    if provider.api_base_url:
        return provider.api_base_url, dict(provider.userinfo_headers)
    if not provider.userinfo_url:
        raise NotInjectable(
            "the connection names no API to call: set verify_url (the provider's user-info URL)"
        )
    url = httpx.URL(provider.userinfo_url)
    return f"{url.scheme}://{url.netloc.decode('ascii')}", dict(provider.userinfo_headers)


def _extra_headers(config: Mapping[str, object]) -> dict[str, str]:
    extra = config.get("headers")
    return {str(k): str(v) for k, v in extra.items()} if isinstance(extra, Mapping) else {}


def _webhook(config: Mapping[str, object], secret: str, sent: SentCredentials) -> Injection:
    headers: dict[str, str] = {}
    auth = config.get("auth_type", "none")
    sign: Callable[[bytes], Mapping[str, str]] | None = None
    if auth == "bearer":
        headers["Authorization"] = sent.bearer(secret)
    elif auth == "hmac":

        def sign(body: bytes) -> Mapping[str, str]:
            stamp = int(time.time())
            return {
                webhook.TIMESTAMP_HEADER: str(stamp),
                webhook.SIGNATURE_HEADER: webhook.sign(secret, stamp, body),
            }

    method = str(config.get("method") or "POST")
    scrubber = Scrubber([secret] if secret else [], sent.forms)
    return Injection(
        str(config["url"]), headers, _extra_headers(config), scrubber, only_method=method, sign=sign
    )


def check_request(request: UpstreamRequest, connection: Injection | None = None) -> None:
    """INVALID_ARGUMENT naming every part of `request` that may not be sent; with `connection`,
    also what that connection does not allow (its injected headers, a webhook's one URL)."""
    bad: list[FieldViolation] = []
    if request.method not in METHODS:
        bad.append(FieldViolation("method", f"must be one of {', '.join(sorted(METHODS))}"))
    path = request.path
    # A URL is checked as a path once `under_base` has made it one (`connection` is known then).
    if connection is None and _ABSOLUTE.match(path):
        fits = len(path) <= MAX_PATH and path.isascii() and path.isprintable()
    else:
        fits = plain_path(path, MAX_PATH) and not path.startswith("//")
    if not fits:
        bad.append(
            FieldViolation(
                "path",
                f"must be an absolute path (at most {MAX_PATH} printable ASCII characters) without"
                " '//' at the start, spaces, '?', '#', backslashes, dot segments or encoded dots and"
                " slashes, or a URL under the connection's base URL",
            )
        )
    if len(request.query) > MAX_QUERY or not (request.query.isascii() and request.query.isprintable()):
        bad.append(FieldViolation("query", f"must be at most {MAX_QUERY} printable ASCII characters"))
    elif "#" in request.query or " " in request.query:
        bad.append(FieldViolation("query", "must not hold '#' or spaces (percent-encode them)"))
    if len(request.headers) > MAX_HEADERS:
        raise InvalidArgument([*bad, FieldViolation("headers", f"at most {MAX_HEADERS}")])
    if sum(len(n) + len(v) for n, v in request.headers) > MAX_HEADER_BYTES:
        raise InvalidArgument([*bad, FieldViolation("headers", f"at most {MAX_HEADER_BYTES} bytes in all")])
    reserved = set(_REFUSED_HEADERS)
    if connection is not None:
        reserved |= {_header_key(name) for name in connection.credentials}
        if connection.sign is not None:
            reserved |= {_header_key(webhook.TIMESTAMP_HEADER), _header_key(webhook.SIGNATURE_HEADER)}
        if connection.only_method and request.method != connection.only_method:
            bad.append(FieldViolation("method", f"must be {connection.only_method}, this webhook's method"))
        if connection.only_method and (path != "/" or request.query):
            bad.append(
                FieldViolation("path", "must be '/' with no query: a webhook takes calls to its one URL")
            )
    bad += _method_overrides(request)
    for i, (name, value) in enumerate(request.headers):
        key = _header_key(name)
        if not _HEADER_NAME.fullmatch(name):
            bad.append(FieldViolation(f"headers[{i}].name", "must be an HTTP header name"))
        elif key in reserved or key.startswith(_REFUSED_PREFIXES):
            bad.append(FieldViolation(f"headers[{i}].name", f"{name} is set by the broker, not the caller"))
        elif key in _PARTIAL:
            bad.append(
                FieldViolation(
                    f"headers[{i}].name", f"{name} is refused: a part of an answer could hide a secret"
                )
            )
        if not value.isprintable() or not value.isascii():
            bad.append(FieldViolation(f"headers[{i}].value", "must be printable ASCII"))
    if bad:
        raise InvalidArgument(bad)


_METHOD_PARAMETER = "_method"
_OVERRIDES = "must not carry a _method parameter: frameworks take it for the request's method"
_ANY_METHOD_PARAMETER = re.compile(rb"_method", re.IGNORECASE)
_MULTIPART_METHOD = re.compile(rb'name\s*=\s*"?_method"?[\s;]', re.IGNORECASE)


def _method_overrides(request: UpstreamRequest) -> list[FieldViolation]:
    """The parts of `request` that name another method in a `_method` parameter (Rails and Symfony
    read it from a form, Laravel and Symfony from the query too, Laravel from a JSON body)."""
    found = []
    if _names_method(urllib.parse.parse_qsl(request.query, keep_blank_values=True)):
        found.append(FieldViolation("query", _OVERRIDES))
    if _ANY_METHOD_PARAMETER.search(request.body):  # most bodies stop here
        kind = next((v for n, v in request.headers if n.lower() == "content-type"), "").lower()
        if _body_names_method(kind.split(";")[0].strip(), request.body):
            found.append(FieldViolation("body", _OVERRIDES))
    return found


def _names_method(pairs: Sequence[tuple[str, str]]) -> bool:
    return any(name.lower() == _METHOD_PARAMETER for name, _ in pairs)


def _body_names_method(content_type: str, body: bytes) -> bool:
    if content_type == "application/x-www-form-urlencoded":
        return _names_method(urllib.parse.parse_qsl(body.decode("latin-1"), keep_blank_values=True))
    if content_type == "multipart/form-data":
        return _MULTIPART_METHOD.search(body) is not None
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            document = json.loads(body)
        except ValueError:
            return False  # the upstream cannot read it either
        return isinstance(document, dict) and _names_method([(str(k), "") for k in document])
    return False


def _header_key(name: str) -> str:
    # Servers behind CGI/WSGI read `X_Api_Key` as `X-Api-Key`: a caller's header that a server may
    # take for a reserved one is refused as that one.
    return name.lower().replace("_", "-")


def pooled_client(egress: EgressPolicy) -> PolicyClient:
    """One client for every proxied call: its connections are kept alive and reused, each one
    opened to an address the policy checked, and every request's URL checked by its hook."""
    size = egress.settings.proxy_connections
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=min(size, 50))
    # No cookie jar: one client serves every tenant and executor, and an upstream's Set-Cookie
    # must never ride along on someone else's next call.
    jar = http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    # A call waits for a free connection no longer than opening one may take, so that a full pool is
    # told as such (httpx.PoolTimeout) before the call's own time runs out.
    settings = egress.settings
    timeout = httpx.Timeout(
        settings.total_timeout, connect=settings.connect_timeout, pool=settings.connect_timeout
    )
    return cast(
        PolicyClient, http_client(egress, verify=_trust(), limits=limits, cookies=jar, timeout=timeout)
    )


@contextlib.asynccontextmanager
async def _client(egress: EgressPolicy | PolicyClient) -> AsyncIterator[PolicyClient]:
    if isinstance(egress, PolicyClient):
        yield egress
    else:
        async with http_client(egress, verify=_trust()) as client:
            yield cast(PolicyClient, client)


@contextlib.asynccontextmanager
async def _exchange(
    egress: EgressPolicy | PolicyClient, connection: Injection, request: UpstreamRequest
) -> AsyncIterator[httpx.Response]:
    """The upstream's response, its body not read yet; the request checked and sent first."""
    check_request(request, connection)
    if connection.only_method:
        url = connection.base_url
    else:
        url = connection.base_url + request.path + (f"?{request.query}" if request.query else "")
    # The broker decodes the answer, so the codings are its to ask for (`egress.http.ACCEPT_ENCODING`,
    # set on every client): any other Accept-Encoding, the caller's or a default, is left out.
    asked = [(name, value) for name, value in request.headers if name.lower() != "accept-encoding"]
    left_out = {name.lower() for name, _ in request.headers} | {"accept-encoding"}
    defaults = [(name, value) for name, value in connection.defaults.items() if name.lower() not in left_out]
    headers = [*defaults, *asked, *connection.credentials.items()]
    if connection.sign is not None:
        headers += connection.sign(request.body).items()
    async with _client(egress) as client:
        policy = client.egress_policy
        checked = policy.check_url(url).text
        upstream = client.build_request(
            request.method, checked, headers=headers, content=request.body or None
        )
        async with asyncio.timeout(policy.settings.total_timeout):
            response = await client.send(upstream, stream=True)
        try:
            yield response
        finally:
            await response.aclose()


def _head(connection: Injection, response: httpx.Response) -> UpstreamAnswer:
    """The status and the headers, names and values scrubbed (the framing ones dropped), with
    no body yet."""
    # Scrubbed as received: httpx lower-cases names (a secret in one would no longer match) and
    # may read the bytes as latin-1 (a non-ASCII secret would no longer match).
    scrubber, encoding = connection.scrubber, response.headers.encoding
    headers = [
        (scrubber.data(name).decode(encoding).lower(), scrubber.text(scrubber.data(value).decode(encoding)))
        for name, value in received_headers(response)
        if name.decode(encoding).lower() not in _DROPPED_ANSWER_HEADERS
    ]
    return UpstreamAnswer(response.status_code, headers, b"")


def _unreadable() -> UnreadableAnswer:
    return UnreadableAnswer(
        "the upstream's answer is in a content encoding the broker does not read (it reads gzip and deflate)"
    )


async def call(
    egress: EgressPolicy | PolicyClient,
    connection: Injection,
    request: UpstreamRequest,
    *,
    max_bytes: int,
) -> UpstreamAnswer:
    """Send `request` with the credential injected; the answer scrubbed (see the module docstring).

    `egress` is the proxy's `pooled_client`, or a policy (a client for this call alone).

    Raises INVALID_ARGUMENT for a request that may not be sent, `AnswerTooLarge` for an
    answer over `max_bytes`, and the egress and transport errors of `broker.egress.http`.
    """
    # The caller bounds the call by its deadline too (`asyncio.timeout` around this).
    policy = egress.egress_policy if isinstance(egress, PolicyClient) else egress
    async with (
        asyncio.timeout(policy.settings.total_timeout),
        _exchange(egress, connection, request) as response,
    ):
        try:
            body = await read_body(response, max_bytes) if request.method != "HEAD" else b""
        except ResponseTooLarge:
            raise AnswerTooLarge(
                f"the upstream's answer is larger than {max_bytes} bytes, the proxy's limit"
            ) from None
        except UnreadableBody:
            raise _unreadable() from None
        head = _head(connection, response)
    return UpstreamAnswer(head.status, head.headers, connection.scrubber.body(body))


async def stream(
    egress: EgressPolicy | PolicyClient, connection: Injection, request: UpstreamRequest, *, max_bytes: int
) -> AsyncGenerator[UpstreamAnswer | bytes, None]:
    """As `call`, the answer streamed: its head (an `UpstreamAnswer` without body), then the
    body in scrubbed chunks as they arrive (`StreamScrubber`), at most `max_bytes` of it."""
    async with _exchange(egress, connection, request) as response:
        yield _head(connection, response)
        scrubber, size = connection.scrubber.stream(), 0
        try:
            async for chunk in body_chunks(response):
                size += len(chunk)
                if size > max_bytes:
                    raise AnswerTooLarge(
                        f"the upstream's answer is larger than {max_bytes} bytes, the proxy's limit"
                    )
                if released := scrubber.feed(chunk):
                    yield released
        except UnreadableBody:
            raise _unreadable() from None
        if rest := scrubber.end():
            yield rest
