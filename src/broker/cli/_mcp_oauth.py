"""`brokerctl oauth connect --mcp-server URL`: find an MCP server's authorization server and a client.

What the MCP authorization spec (revisions 2025-06-18 and 2025-11-25) has a client do, run by
brokerctl on the admin's machine before the broker's usual authorization flow:

1. an unauthenticated `initialize` POST; a 401's `WWW-Authenticate` Bearer challenge (RFC 9110
   11.6.1, RFC 6750 3) may name `resource_metadata` and `scope`;
2. RFC 9728 protected resource metadata, from that URL or the well-known URIs; its `resource`
   must be the server's URL (RFC 9728 3.3), its first `authorization_servers` entry is used;
3. RFC 8414 authorization server metadata (with OpenID Connect Discovery's paths as the MCP spec
   orders them); its `issuer` must be the one named (RFC 8414 3.3), and PKCE S256 offered
   (RFC 7636; the MCP spec says a client must refuse otherwise);
4. a client: given (`--client-id`), or registered dynamically (RFC 7591) for the one redirect URI
   this run uses. Client ID Metadata Documents (2025-11-25) are not supported.

The result is the config of a `custom` oauth2 connection whose RFC 8707 `resource` is the server.
Every request goes through `_discovery_http` (https only, no redirects, bounded answers); every
problem is a `DiscoveryError` naming what was wrong and at which URL.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from broker.cli._discovery_http import (
    Answer,
    DiscoveryError,
    check_url,
    fetch,
    json_object,
    open_client,
    shown,
    text_field,
    text_list,
)
from broker.cli._input import UsageError
from broker.cli._www_authenticate import ChallengeError, bearer_params

__all__ = ["DiscoveryError", "mcp_connection_command", "open_client", "settings"]

MCP_PROTOCOL_VERSION = "2025-06-18"
# Config keys discovery sets: given with --mcp-server they would contradict it.
DISCOVERED_KEYS = frozenset(
    {"authorize_url", "token_url", "revocation_url", "issuer", "token_auth_method", "client_id"}
    | {"resource", "scopes", "grant_type"}
)
_SCOPE = re.compile(r"[!#-\[\]-~]+")  # an RFC 6749 scope token
_METHODS = ("client_secret_basic", "client_secret_post", "none")
_DEFAULT_PORTS = {"http": 80, "https": 443}

Say = Callable[[str], None]


def normalised(url: str) -> str:
    """`url` compared as RFC 3986 6.2.2-6.2.3 allow: scheme and host in lower case, no default port,
    an empty path as `/`. Any other difference, a trailing slash included, is a different URL."""
    parts = urlsplit(url)
    scheme, host, port = parts.scheme.lower(), parts.hostname or "", parts.port
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc += f":{port}"
    query = f"?{parts.query}" if parts.query or url.endswith("?") else ""
    return f"{scheme}://{netloc}{parts.path or '/'}{query}"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def resource_metadata_urls(server_url: str) -> list[str]:
    """RFC 9728 3.1 well-known URIs, as the MCP spec orders them: with the server's path, then the root."""
    parts = urlsplit(server_url)
    root = _origin(server_url) + "/.well-known/oauth-protected-resource"
    path = parts.path if parts.path != "/" else ""
    inserted = root + path + (f"?{parts.query}" if parts.query else "")
    return [inserted, root] if inserted != root else [root]


def authorization_server_metadata_urls(issuer: str) -> list[str]:
    """RFC 8414 3.1 and OpenID Connect Discovery URIs of an issuer, in the MCP spec's order."""
    origin, path = _origin(issuer), urlsplit(issuer).path.rstrip("/")
    if not path:
        return [
            f"{origin}/.well-known/oauth-authorization-server",
            f"{origin}/.well-known/openid-configuration",
        ]
    return [
        f"{origin}/.well-known/oauth-authorization-server{path}",
        f"{origin}/.well-known/openid-configuration{path}",
        f"{origin}{path}/.well-known/openid-configuration",
    ]


# ------------------------------------------------------------------ discovery


@dataclass(frozen=True)
class AuthorizationServer:
    """What RFC 8414 metadata says of the authorization server; absent endpoints are ""."""

    issuer: str
    metadata_url: str
    authorization_endpoint: str
    token_endpoint: str
    revocation_endpoint: str = ""
    registration_endpoint: str = ""
    token_auth_methods: tuple[str, ...] | None = None  # None: not said (RFC 8414: basic only)
    sends_iss: bool = False  # RFC 9207 authorization_response_iss_parameter_supported


@dataclass(frozen=True)
class Discovery:
    """An MCP server, the authorization server that protects it and the scopes it names."""

    server_url: str
    resource_metadata_url: str
    authorization_server: AuthorizationServer
    challenge_scopes: tuple[str, ...] = ()
    scopes_supported: tuple[str, ...] = ()


def challenge(client: httpx.Client, server_url: str, say: Say) -> dict[str, str]:
    """The Bearer challenge's parameters of an unauthenticated `initialize` (empty without a 401)."""
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": MCP_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "brokerctl", "version": "1"},
        },
    }
    answer = fetch(client, "POST", server_url, "the MCP server", body=initialize, read=False)
    if answer.status != 401:
        say(
            f"the MCP server answered HTTP {answer.status} without credentials, not 401; "
            "trying the well-known URIs"
        )
        return {}
    header = ", ".join(answer.headers.get_list("www-authenticate"))
    try:
        return bearer_params(header)
    except ChallengeError as exc:
        say(f"the MCP server's WWW-Authenticate is unreadable ({exc}); trying the well-known URIs")
        return {}


def protected_resource(
    client: httpx.Client, server_url: str, metadata_url: str
) -> tuple[str, str, tuple[str, ...]]:
    """RFC 9728 metadata: (where it was found, the first authorization server, scopes_supported)."""
    what = "the protected resource metadata"
    candidates = [metadata_url] if metadata_url else resource_metadata_urls(server_url)
    try:
        answer = _first_found(client, candidates, what)
    except DiscoveryError as exc:
        if metadata_url:
            raise
        # Neither a challenge nor metadata: most often a mistyped URL, not a server without OAuth.
        asked = f"is {shown(server_url)} the MCP server's URL?"
        raise DiscoveryError(f"{exc.message}; {asked}", exc.url) from None
    document = json_object(answer, what)
    resource = text_field(document, "resource", what, answer.url)
    if normalised(resource) != normalised(server_url):
        raise DiscoveryError(
            f"{what} at {shown(answer.url)} is for {shown(resource)!r}, not {shown(server_url)!r}: "
            "RFC 9728 3.3 says it must not be used (it may describe another server); if that is "
            "this server's own URL (localhost and 127.0.0.1 differ), use it: "
            f"--mcp-server {shlex.quote(shown(resource))}",
            answer.url,
        )
    servers = text_list(document, "authorization_servers", what, answer.url)
    if not servers:
        raise DiscoveryError(f"{what} at {shown(answer.url)} names no authorization_servers", answer.url)
    scopes = text_list(document, "scopes_supported", what, answer.url) or ()
    issuer = check_url(servers[0], "the authorization server", answer.url)
    return answer.url, issuer, scopes


def authorization_server(client: httpx.Client, issuer: str) -> AuthorizationServer:
    """RFC 8414 metadata of `issuer`, checked: its issuer, https endpoints, PKCE S256."""
    what = "the authorization server metadata"
    if urlsplit(issuer).query:
        raise DiscoveryError(f"the authorization server {shown(issuer)!r} has a query (RFC 8414 2)", issuer)
    answer = _first_found(client, authorization_server_metadata_urls(issuer), what)
    document, url = json_object(answer, what), answer.url
    named = text_field(document, "issuer", what, url)
    if normalised(named) != normalised(issuer):
        raise DiscoveryError(
            f"{what} at {shown(url)} names the issuer {shown(named)!r}, not {shown(issuer)!r}: "
            "RFC 8414 3.3 says it must not be used",
            url,
        )
    methods = text_list(document, "code_challenge_methods_supported", what, url) or ()
    if "S256" not in methods:
        raise DiscoveryError(
            f"{what} at {shown(url)} does not offer PKCE S256 (code_challenge_methods_supported); "
            "the MCP authorization spec says a client must refuse such a server",
            url,
        )
    endpoints = {}
    for key in ("authorization_endpoint", "token_endpoint", "revocation_endpoint", "registration_endpoint"):
        value = text_field(
            document, key, what, url, required=key in ("authorization_endpoint", "token_endpoint")
        )
        endpoints[key] = check_url(value, key, url) if value else ""
    sends_iss = document.get("authorization_response_iss_parameter_supported") is True
    return AuthorizationServer(
        named,
        url,
        **endpoints,
        token_auth_methods=text_list(document, "token_endpoint_auth_methods_supported", what, url),
        sends_iss=sends_iss,
    )


def _first_found(client: httpx.Client, urls: Sequence[str], what: str) -> Answer:
    """The first of `urls` that answers 200; a redirect or an unreachable one stops the search."""
    statuses = []
    for url in urls:
        answer = fetch(client, "GET", check_url(url, what), what)
        if answer.status == 200:
            return answer
        statuses.append(f"{shown(url)} answered HTTP {answer.status}")
    raise DiscoveryError(f"no {what.removeprefix('the ')} found: " + "; ".join(statuses), urls[-1])


def discover(client: httpx.Client, server_url: str, say: Say) -> Discovery:
    """Steps 1 to 3: the challenge, the protected resource metadata, the authorization server's."""
    try:
        check_url(server_url, "--mcp-server")
    except DiscoveryError as exc:
        raise UsageError(exc.message) from None
    params = challenge(client, server_url, say)
    metadata_url = params.get("resource_metadata", "")
    if metadata_url:
        check_url(metadata_url, "resource_metadata", f"{server_url}'s WWW-Authenticate")
    found_at, issuer, supported = protected_resource(client, server_url, metadata_url)
    scopes = tuple(params.get("scope", "").split())
    for scope in (*scopes, *supported):
        if not _SCOPE.fullmatch(scope):
            raise DiscoveryError(f"the scope {shown(scope)!r} is not an RFC 6749 scope token", found_at)
    say(f"{shown(server_url)} is protected by the authorization server {shown(issuer)}")
    return Discovery(server_url, found_at, authorization_server(client, issuer), scopes, supported)


# ------------------------------------------------------------------ the client


@dataclass(frozen=True)
class Client:
    """The OAuth2 client the connection uses. The secret is never shown (`repr` leaves it out)."""

    client_id: str
    token_auth_method: str
    client_secret: str = field(default="", repr=False)


def auth_method(supported: tuple[str, ...] | None, *, has_secret: bool = True) -> str:
    """client_secret_basic where offered (RFC 8414: the default when not said), else post, else none."""
    if not has_secret:
        return "none"  # a public client, as the user said by giving no secret
    offered = supported if supported is not None else ("client_secret_basic",)
    for method in _METHODS:
        if method in offered:
            return method
    raise DiscoveryError(
        f"the token endpoint accepts none of {', '.join(_METHODS)} (it offers {shown(', '.join(offered))})"
    )


def register(client: httpx.Client, server: AuthorizationServer, *, name: str, redirect_uri: str) -> Client:
    """RFC 7591 dynamic registration of a client for `redirect_uri`."""
    url = server.registration_endpoint
    if not url:
        raise DiscoveryError(
            f"the authorization server {shown(server.issuer)} offers no dynamic client registration: "
            "register a client there (redirect URI "
            f"{redirect_uri}) and pass --client-id (and --secret client_secret=@FILE); Client ID Metadata "
            "Documents are not supported",
            server.metadata_url,
        )
    method = auth_method(server.token_auth_methods)
    request = {
        "client_name": f"broker ({name})",
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": method,
    }
    what = "the client registration"
    answer = fetch(client, "POST", url, what, body=request)
    if answer.status not in (200, 201):
        raise DiscoveryError(f"{what} at {shown(url)} was refused: {_refusal(answer)}", url)
    document = json_object(answer, what)
    client_id = text_field(document, "client_id", what, url)
    secret = text_field(document, "client_secret", what, url, required=False)
    granted = text_field(document, "token_endpoint_auth_method", what, url, required=False) or method
    if granted not in _METHODS or (granted != "none" and not secret):
        raise DiscoveryError(
            f"{what} at {shown(url)} registered a client authenticating by {shown(granted)!r}"
            + ("" if granted in _METHODS else f" (not one of {', '.join(_METHODS)})")
            + (" without a client_secret" if granted in _METHODS else ""),
            url,
        )
    return Client(client_id, granted, secret)


def _refusal(answer: Answer) -> str:
    """An RFC 7591 3.2.2 error, bounded and printable; just the status otherwise."""
    try:
        document = json.loads(answer.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        described = document.get("error_description")
        suffix = f" ({shown(described)})" if isinstance(described, str) and described else ""
        return f"HTTP {answer.status} {shown(document['error'], 64)}{suffix}"
    return f"HTTP {answer.status}"


# ------------------------------------------------------------------ the connection


@dataclass(frozen=True)
class Settings:
    """A `custom` oauth2 connection's config and secrets (never in its `repr`)."""

    config: dict[str, Any]
    secrets: dict[str, str] = field(repr=False)


def chosen_scopes(explicit: Sequence[str], found: Discovery) -> list[str]:
    """--scope, else the challenge's `scope`, else the resource's scopes_supported, else none."""
    return list(explicit or found.challenge_scopes or found.scopes_supported)


def settings(
    client: httpx.Client,
    server_url: str,
    *,
    name: str,
    redirect_uri: str,
    client_id: str,
    secrets: Mapping[str, str],
    scopes: Sequence[str],
    config: Mapping[str, Any],
    say: Say,
) -> Settings:
    """Everything `oauth connect --mcp-server` finds, as the connection's config and secrets."""
    clashing = sorted(DISCOVERED_KEYS & set(config))
    if clashing:
        raise UsageError(
            f"--mcp-server discovers {', '.join(clashing)}: leave out --config for them "
            "(use --client-id and --scope)"
        )
    if "client_secret" in secrets and not client_id:
        raise UsageError("--secret client_secret goes with --client-id (a registered client gets its own)")
    found = discover(client, server_url, say)
    server = found.authorization_server
    if client_id:
        chosen = Client(
            client_id, auth_method(server.token_auth_methods, has_secret="client_secret" in secrets)
        )
    else:
        chosen = register(client, server, name=name, redirect_uri=redirect_uri)
        say(f"registered the client {shown(chosen.client_id)} at {shown(server.registration_endpoint)}")
    values: dict[str, Any] = {
        **config,
        "authorize_url": server.authorization_endpoint,
        "token_url": server.token_endpoint,
        "token_auth_method": chosen.token_auth_method,
        "client_id": chosen.client_id,
        "resource": [server_url],
    }
    if server.revocation_endpoint:
        values["revocation_url"] = server.revocation_endpoint
    if server.sends_iss:
        values["issuer"] = server.issuer  # the redirect's iss must then equal it (RFC 9207)
    wanted = chosen_scopes(scopes, found)
    if wanted:
        values["scopes"] = wanted
    own = dict(secrets)
    if chosen.client_secret:
        own["client_secret"] = chosen.client_secret
    return Settings(values, own)


def mcp_connection_command(name: str, server_url: str) -> str:
    """The command that creates the MCP connection that takes its token from connection `name`."""
    return (
        f"brokerctl create {shlex.quote(name + '-mcp')} --type mcp "
        f"--config {shlex.quote('server_url=' + server_url)} --config auth_type=oauth2 "
        f"--config {shlex.quote('oauth_connection=' + name)}"
    )
