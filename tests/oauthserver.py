"""A real OAuth2 authorization server on loopback for the OAuth2 tests.

Hand-written on Starlette (it is test code, and every rule it enforces is visible here):

- `GET /authorize` checks the client, redirect URI, `response_type=code`, `state` and the
  PKCE S256 challenge, auto-approves, and answers 302 to `redirect_uri?code=...&state=...`.
- `POST /token` serves authorization_code (single-use codes, PKCE verifier checked),
  refresh_token (rotating: the old refresh token dies with each use, unless
  `rotate_refresh_tokens=False`, which answers without a refresh token) and
  client_credentials, with client authentication by `client_secret_basic`,
  `client_secret_post` or `none` (public client; `client_auth` says which is required).
- With `offline_access_needs_consent` it follows OpenID Connect Core section 11, as certified
  OpenID providers do: `offline_access` is dropped from a request without `prompt=consent`, and
  a refresh token is issued only for a grant that kept `offline_access`.
- Authorization responses carry `iss` (RFC 9207, the server's `url`) unless `send_iss=False`.
- `GET|POST /userinfo` answers a valid, unexpired, unrevoked bearer token; `POST /revoke` is
  RFC 7009.
- Opt-in discovery and registration, as the MCP authorization spec has clients use them: with
  `metadata`, RFC 8414 metadata at `/.well-known/oauth-authorization-server` followed by the
  issuer's path (`issuer_path`; the issuer is `url` + `issuer_path`), with `metadata_overrides`
  laid over it (a value of None removes the key); with `registration`, an RFC 7591 endpoint
  `POST /register` whose clients then work at /authorize, /token and /revoke like the first one
  (`registration_reply` may change each answer, `registrations` records each request).
- RFC 8707 resource indicators: every request's `resource` parameters are recorded, in order, in
  `resources_seen` (`("authorize" or the grant type, (resource, ...))`). With `resources` set, a
  request naming another is refused with `invalid_target`; a code or refresh token remembers what
  its authorization asked for, and a token request may narrow it, never widen it. Each access
  token's audience is kept in `AccessToken.resources`.

Access tokens are opaque, or with `jwt_tokens` HS256 JWTs carrying `exp`. `expires_in` is
their lifetime; `send_expires_in=False` leaves it out of the answer. Faults for the token
endpoint: `fail_next`, `invalid_grant_next`, `error_next`, `delay`, and `before_reply`, an async callback
awaited (on the server's own event loop, in its thread: block it with threading primitives,
e.g. `await asyncio.to_thread(event.wait)`) after the request is counted and before any
answer. Every token request is counted in `token_requests[grant_type]`, faults included;
`error_next` takes the `error_description` to answer with (a provider may echo what it got).

uvicorn runs in a background thread on a port chosen by the kernel, as in `tests/mcpserver.py`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.asgithread import ThreadedUvicorn

CODE_LIFETIME = 600
USER = {"sub": "user-1", "email": "user@example.com"}


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str | None
    scope: str
    expires: float
    resources: tuple[str, ...] = ()


@dataclass
class _Client:
    client_id: str
    secret: str
    auth: str  # client_secret_basic, client_secret_post or none
    redirect_uris: tuple[str, ...] | None


@dataclass
class AccessToken:
    client_id: str
    scope: str
    expires: float
    resources: tuple[str, ...] = ()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def s256(verifier: str) -> str:
    """RFC 7636 S256: BASE64URL(SHA256(verifier)), computed independently of the client."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


class OAuthTestServer:
    """One client (`client_id`, `client_secret`) at an authorization server on loopback."""

    def __init__(
        self,
        *,
        client_auth: str = "client_secret_basic",
        require_pkce: bool = True,
        expires_in: int = 3600,
        send_expires_in: bool = True,
        jwt_tokens: bool = False,
        rotate_refresh_tokens: bool = True,
        redirect_uris: tuple[str, ...] | None = None,
        offline_access_needs_consent: bool = False,
        send_iss: bool = True,
        resources: tuple[str, ...] | None = None,
        metadata: bool = False,
        registration: bool = False,
        issuer_path: str = "",
    ) -> None:
        self.client_id = "test-client-" + secrets.token_hex(4)
        self.client_secret = "cs-" + secrets.token_urlsafe(24)
        self.client_auth = client_auth
        self.require_pkce = require_pkce
        self.expires_in = expires_in
        self.send_expires_in = send_expires_in
        self.jwt_tokens = jwt_tokens
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.offline_access_needs_consent = offline_access_needs_consent
        self.send_iss = send_iss
        self.issuer_path = issuer_path
        self.metadata_overrides: dict[str, Any] = {}
        self.registration_reply: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.registrations: list[Any] = []  # the body of each registration request
        self.registered: dict[str, _Client] = {}
        # None accepts any resource indicator (and none); otherwise these only (RFC 8707).
        self.resources = resources
        self.resources_seen: list[tuple[str, tuple[str, ...]]] = []
        # None accepts any http(s) redirect URI.
        self.redirect_uris = redirect_uris
        self.delay = 0.0
        self.token_type = "Bearer"  # what token answers say the token is
        self.revoke_delay = 0.0  # seconds the revocation endpoint takes to answer
        self.before_reply: Callable[[str], Awaitable[None]] | None = None
        self.token_requests: Counter[str] = Counter()
        self.revocation_requests = 0
        self.authorize_requests: list[dict[str, str]] = []
        self.token_forms: list[dict[str, str]] = []  # the form fields of each token request
        self.client_auth_seen: list[str] = []  # "basic", "post" or "none" per token/revoke request
        self.access_tokens: dict[str, AccessToken] = {}
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> scope
        self._refresh_resources: dict[str, tuple[str, ...]] = {}  # refresh token -> its grant's resources
        self.revoked: list[str] = []
        self._codes: dict[str, _Code] = {}
        self._faults: list[tuple[int, dict[str, str], str, str | None]] = []
        self._jwt_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._app = Starlette(
            routes=[
                Route("/authorize", self._authorize, methods=["GET"]),
                Route("/token", self._token, methods=["POST"]),
                Route("/userinfo", self._userinfo, methods=["GET", "POST"]),
                Route("/revoke", self._revoke, methods=["POST"]),
                *(
                    [Route(f"/.well-known/oauth-authorization-server{issuer_path}", self._metadata)]
                    if metadata
                    else []
                ),
                *([Route("/register", self._register, methods=["POST"])] if registration else []),
            ]
        )
        self.registration = registration
        self._http: ThreadedUvicorn | None = None
        self.port = 0

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        """The issuer identifier (RFC 8414): `url` and `issuer_path`."""
        return f"{self.url}{self.issuer_path}"

    @property
    def authorize_url(self) -> str:
        return f"{self.url}/authorize"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    @property
    def revocation_url(self) -> str:
        return f"{self.url}/revoke"

    @property
    def userinfo_url(self) -> str:
        return f"{self.url}/userinfo"

    # ------------------------------------------------------------------ test controls

    def fail_next(self, n: int = 1, status: int = 503, retry_after: str | int | None = None) -> None:
        """The next `n` token requests answer `status` with `temporarily_unavailable`."""
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        with self._lock:
            self._faults.extend([(status, headers, "temporarily_unavailable", None)] * n)

    def invalid_grant_next(self) -> None:
        """The next token request answers 400 invalid_grant, whatever it carries."""
        self.error_next("invalid_grant")

    def error_next(self, error: str, status: int = 400, description: str | None = None) -> None:
        """The next token request answers `status` with the RFC 6749 error code `error` (and
        `description` as its error_description, when given)."""
        with self._lock:
            self._faults.append((status, {}, error, description))

    def valid_access_tokens(self) -> set[str]:
        """The access tokens that are neither expired nor revoked."""
        now = time.time()
        return {t for t, info in list(self.access_tokens.items()) if info.expires > now}

    # ------------------------------------------------------------------ endpoints

    def _resources(self, kind: str, pairs: list[tuple[str, str]]) -> tuple[tuple[str, ...], bool]:
        """The request's resource indicators (recorded), and whether this server serves them all."""
        resources = tuple(value for name, value in pairs if name == "resource")
        self.resources_seen.append((kind, resources))
        return resources, self.resources is None or set(resources) <= set(self.resources)

    async def _authorize(self, request: Request) -> Response:
        query = dict(request.query_params)
        self.authorize_requests.append(query)
        resources, served = self._resources("authorize", request.query_params.multi_items())
        client = self._client(query.get("client_id", ""))
        if client is None:
            return PlainTextResponse("unknown client", status_code=400)
        redirect_uri = query.get("redirect_uri", "")
        allowed = redirect_uri.startswith(("http://", "https://"))
        if not allowed or (client.redirect_uris is not None and redirect_uri not in client.redirect_uris):
            # Never redirect to an unchecked URI: an open redirector leaks codes.
            return PlainTextResponse("redirect_uri not registered", status_code=400)
        state = query.get("state")

        def back(**params: str) -> Response:
            # RFC 9207: the issuer identifier in every authorization response, success or error.
            params = {
                **params,
                **({"state": state} if state else {}),
                **({"iss": self.issuer} if self.send_iss else {}),
            }
            sep = "&" if "?" in redirect_uri else "?"
            return RedirectResponse(f"{redirect_uri}{sep}{urlencode(params)}", status_code=302)

        if query.get("response_type") != "code":
            return back(error="unsupported_response_type")
        if not state:
            return back(error="invalid_request")
        if not served:
            return back(error="invalid_target")
        challenge = query.get("code_challenge")
        method = query.get("code_challenge_method")
        if (challenge is None and self.require_pkce) or (challenge is not None and method != "S256"):
            return back(error="invalid_request")
        scope = query.get("scope", "")
        if self.offline_access_needs_consent and "consent" not in query.get("prompt", "").split():
            scope = " ".join(s for s in scope.split() if s != "offline_access")
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Code(
            client.client_id, redirect_uri, challenge, scope, time.time() + CODE_LIFETIME, resources
        )
        return back(code=code)

    def _client(self, client_id: str) -> _Client | None:
        """The first client (as its attributes are now) or a registered one."""
        if client_id == self.client_id:
            return _Client(self.client_id, self.client_secret, self.client_auth, self.redirect_uris)
        return self.registered.get(client_id)

    def _client_authenticated(self, request: Request, form: dict[str, str]) -> str:
        """The id of the client the request authenticates as; "" when it does not."""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                pair = base64.b64decode(header[6:], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return ""
            client_id, _, secret = pair.partition(":")
            self.client_auth_seen.append("basic")
            client = self._client(client_id)
            ok = client is not None and client.auth == "client_secret_basic"
            return client_id if ok and client and hmac.compare_digest(secret, client.secret) else ""
        client = self._client(form.get("client_id", ""))
        if "client_secret" in form:
            self.client_auth_seen.append("post")
            ok = client is not None and client.auth == "client_secret_post"
            return (
                client.client_id
                if ok and client and hmac.compare_digest(form["client_secret"], client.secret)
                else ""
            )
        self.client_auth_seen.append("none")
        return client.client_id if client is not None and client.auth == "none" else ""

    @staticmethod
    def _error(
        error: str, status: int = 400, headers: dict[str, str] | None = None, description: str | None = None
    ) -> Response:
        return JSONResponse(
            {"error": error, "error_description": description or f"{error} (test server)"},
            status_code=status,
            headers={"Cache-Control": "no-store", **(headers or {})},
        )

    async def _token(self, request: Request) -> Response:
        pairs = parse_qsl((await request.body()).decode(), keep_blank_values=True)
        form = dict(pairs)
        grant = form.get("grant_type", "")
        self.token_requests[grant] += 1
        self.token_forms.append(form)
        resources, served = self._resources(grant, pairs)
        if self.before_reply is not None:
            await self.before_reply(grant)
        if self.delay:
            await asyncio.sleep(self.delay)
        with self._lock:
            fault = self._faults.pop(0) if self._faults else None
        if fault is not None:
            status, headers, error, description = fault
            return self._error(error, status, headers, description)
        client_id = self._client_authenticated(request, form)
        if not client_id:
            return self._error("invalid_client", 401, {"WWW-Authenticate": 'Basic realm="test"'})
        if not served:
            return self._error("invalid_target")
        if grant == "authorization_code":
            return self._code_grant(form, resources, client_id)
        if grant == "refresh_token":
            return self._refresh_grant(form, resources, client_id)
        if grant == "client_credentials":
            return self._issue(form.get("scope", ""), client_id, with_refresh=False, resources=resources)
        return self._error("unsupported_grant_type")

    @staticmethod
    def _audience(granted: tuple[str, ...], asked: tuple[str, ...]) -> tuple[str, ...] | None:
        """RFC 8707 section 2.2: a token request may narrow the grant's resources, not widen them."""
        if not asked:
            return granted
        return asked if set(asked) <= set(granted) or not granted else None

    def _code_grant(self, form: dict[str, str], resources: tuple[str, ...], client_id: str) -> Response:
        # Popped before any check: a code is single-use even when the attempt fails.
        code = self._codes.pop(form.get("code", ""), None)
        if code is None or code.expires < time.time() or code.redirect_uri != form.get("redirect_uri"):
            return self._error("invalid_grant")
        if code.client_id != client_id:
            return self._error("invalid_grant")
        verifier = form.get("code_verifier")
        challenge = code.challenge
        if challenge is not None and (verifier is None or not hmac.compare_digest(s256(verifier), challenge)):
            return self._error("invalid_grant")
        offline = not self.offline_access_needs_consent or "offline_access" in code.scope.split()
        audience = self._audience(code.resources, resources)
        if audience is None:
            return self._error("invalid_target")
        return self._issue(
            code.scope, client_id, with_refresh=offline, resources=audience, granted=code.resources
        )

    def _refresh_grant(self, form: dict[str, str], resources: tuple[str, ...], client_id: str) -> Response:
        token = form.get("refresh_token", "")
        with self._lock:
            if self.rotate_refresh_tokens:
                scope = self.refresh_tokens.pop(token, None)
                granted = self._refresh_resources.pop(token, ())
            else:
                scope = self.refresh_tokens.get(token)
                granted = self._refresh_resources.get(token, ())
        if scope is None:
            return self._error("invalid_grant")
        audience = self._audience(granted, resources)
        if audience is None:
            return self._error("invalid_target")
        return self._issue(
            scope, client_id, with_refresh=self.rotate_refresh_tokens, resources=audience, granted=granted
        )

    def _issue(
        self,
        scope: str,
        client_id: str,
        *,
        with_refresh: bool,
        resources: tuple[str, ...] = (),
        granted: tuple[str, ...] = (),
    ) -> Response:
        now = time.time()
        expires = now + self.expires_in
        if self.jwt_tokens:
            access = self._jwt({"sub": USER["sub"], "iat": int(now), "exp": int(expires), "scope": scope})
        else:
            access = "at-" + secrets.token_urlsafe(24)
        self.access_tokens[access] = AccessToken(client_id, scope, expires, resources)
        body: dict[str, Any] = {"access_token": access, "token_type": self.token_type}
        if self.send_expires_in:
            body["expires_in"] = self.expires_in
        if scope:
            body["scope"] = scope
        if with_refresh:
            refresh = "rt-" + secrets.token_urlsafe(24)
            self.refresh_tokens[refresh] = scope
            self._refresh_resources[refresh] = granted
            body["refresh_token"] = refresh
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _jwt(self, claims: dict[str, Any]) -> str:
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64url(json.dumps(claims).encode())
        signature = hmac.new(self._jwt_key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64url(signature)}"

    async def _userinfo(self, request: Request) -> Response:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        info = self.access_tokens.get(token)
        if info is None or info.expires <= time.time():
            return JSONResponse(
                {"error": "invalid_token"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return JSONResponse(USER)

    def metadata_document(self) -> dict[str, Any]:
        """RFC 8414 metadata of this server, `metadata_overrides` laid over it."""
        document: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": self.authorize_url,
            "token_endpoint": self.token_url,
            "revocation_endpoint": self.revocation_url,
            "userinfo_endpoint": self.userinfo_url,
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
            "authorization_response_iss_parameter_supported": self.send_iss,
        }
        if self.registration:
            document["registration_endpoint"] = f"{self.url}/register"
        document.update(self.metadata_overrides)
        return {key: value for key, value in document.items() if value is not None}

    async def _metadata(self, request: Request) -> Response:
        return JSONResponse(self.metadata_document())

    async def _register(self, request: Request) -> Response:
        """RFC 7591: any client with http(s) redirect URIs; the answer echoes its metadata."""
        try:
            asked = json.loads(await request.body())
        except ValueError:
            asked = None
        self.registrations.append(asked)
        if not isinstance(asked, dict):
            return JSONResponse({"error": "invalid_client_metadata"}, status_code=400)
        uris = asked.get("redirect_uris")
        if (
            not isinstance(uris, list)
            or not uris
            or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in uris)
        ):
            return JSONResponse({"error": "invalid_redirect_uri"}, status_code=400)
        auth = asked.get("token_endpoint_auth_method", "client_secret_basic")
        if auth not in ("client_secret_basic", "client_secret_post", "none"):
            return JSONResponse({"error": "invalid_client_metadata"}, status_code=400)
        client = _Client(
            "dcr-" + secrets.token_hex(6),
            "" if auth == "none" else "dcs-" + secrets.token_urlsafe(24),
            auth,
            tuple(uris),
        )
        self.registered[client.client_id] = client
        answer: dict[str, Any] = {
            **asked,
            "client_id": client.client_id,
            "client_id_issued_at": int(time.time()),
            "token_endpoint_auth_method": auth,
        }
        if client.secret:
            answer |= {"client_secret": client.secret, "client_secret_expires_at": 0}
        if self.registration_reply is not None:
            answer = self.registration_reply(answer)
        return JSONResponse(answer, status_code=201, headers={"Cache-Control": "no-store"})

    async def _revoke(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        self.revocation_requests += 1
        if self.revoke_delay:
            await asyncio.sleep(self.revoke_delay)
        if not self._client_authenticated(request, form):
            return self._error("invalid_client", 401)
        token = form.get("token", "")
        if not token:
            return self._error("invalid_request")
        # RFC 7009: an unknown token is not an error; the answer is 200 either way.
        if (
            self.access_tokens.pop(token, None) is not None
            or self.refresh_tokens.pop(token, None) is not None
        ):
            self.revoked.append(token)
        return Response(status_code=200)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Serve on a free loopback port in a background thread; return once it accepts connections."""
        self._http = ThreadedUvicorn(self._app, "OAuth2 test server", lifespan="off", tls=None)
        self._http.start()
        self.port = self._http.port

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._http is not None:
            self._http.stop()


@contextlib.contextmanager
def running(**options: Any) -> Iterator[OAuthTestServer]:
    """An `OAuthTestServer` started for the duration of the block."""
    server = OAuthTestServer(**options)
    server.start()
    try:
        yield server
    finally:
        server.stop()
