"""`brokerctl oauth connect --mcp-server`: discovery (RFC 9728, RFC 8414) and registration (RFC 7591)
against real servers on loopback and a `broker dev`, as the MCP authorization spec has a client do it.

The MCP test server asks the OAuth test server whether a token is good, as a resource server does:
only a live token issued for its URL (RFC 8707) passes. Hostile cases run brokerctl in this process
(discovery fails before any call to the broker) and check that nothing was created.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.cli import brokerctl
from tests import httpservers, mcpserver, nodeservers, oauthserver
from tests.devbroker import DevBroker, start_dev_broker
from tests.helpers import EXECUTOR, free_port
from tests.integration.test_oauth_reference_server import sign_in_at_the_provider

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}


@pytest.fixture(scope="module")
def dev_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBroker]:
    yield from start_dev_broker(tmp_path_factory.mktemp("discovery"))


@dataclass
class Servers:
    auth: oauthserver.OAuthTestServer
    mcp: mcpserver.McpTestServer
    hostile: httpservers.LocalServer
    answer: list[httpservers.Answer]  # what `hostile` answers to every request

    def prm(self, **overrides: Any) -> dict[str, Any]:
        document = {"resource": self.mcp.url, "authorization_servers": [self.auth.issuer]}
        return {**document, **overrides}


@pytest.fixture
def servers() -> Iterator[Servers]:
    """An authorization server with metadata and registration, an MCP server it protects, and a
    server that answers whatever a test wants at every URL."""
    answer = [httpservers.Answer(404)]
    with (
        oauthserver.running(metadata=True, registration=True) as auth,
        httpservers.serve(lambda seen: answer[0]) as hostile,
    ):

        def accepts(token: str | None) -> bool:
            info = auth.access_tokens.get(token or "")
            return token in auth.valid_access_tokens() and info is not None and mcp.url in info.resources

        with mcpserver.running(accepts=accepts, json_response=True) as mcp:
            found = Servers(auth, mcp, hostile, answer)
            mcp.protected_resource = found.prm(scopes_supported=["tools"])
            yield found


def _initialize(url: str, token: str | None) -> httpx.Response:
    headers = {"Accept": "application/json, text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(url, json=INITIALIZE, headers=headers, timeout=10)


def _connect_in_the_browser(argv: list[str], *, paste: bool) -> tuple[int, str, str]:
    """brokerctl in a subprocess; the browser follows the printed URL to the redirect, which goes to
    brokerctl's listener or (with `paste`) is pasted into it."""
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen: list[str] = []
    try:
        assert process.stderr is not None and process.stdin is not None
        for line in process.stderr:
            seen.append(line)
            if line.strip().startswith("http"):
                url = line.strip()
                break
        else:
            out, err = process.communicate(timeout=30)
            return process.returncode, out, "".join(seen) + err
        if paste:
            landed = httpx.get(url, follow_redirects=False, timeout=10)
            assert landed.status_code == 302, landed.text
            process.stdin.write(landed.headers["location"] + "\n")
            process.stdin.flush()
        else:
            landed = httpx.get(url, follow_redirects=True, timeout=10)
            assert landed.status_code == 200 and "close this window" in landed.text
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, "".join(seen) + err


def test_discovery_and_registration_end_in_a_token_the_mcp_server_accepts(
    dev_broker: DevBroker, servers: Servers
) -> None:
    auth, mcp = servers.auth, servers.mcp
    assert _initialize(mcp.url, None).status_code == 401
    argv = [*dev_broker.ctl_argv(), "oauth", "connect", "tools-auth", "--mcp-server", mcp.url, "--wait", "30"]
    status, out, err = _connect_in_the_browser(argv, paste=False)
    assert status == 0, err + dev_broker.logs()
    created = json.loads(out)
    assert created["status"] == "CONNECTION_STATUS_ACTIVE" and created["provider"] == "custom"
    [registration] = auth.registrations
    [client_id] = auth.registered
    assert registration["redirect_uris"][0].startswith("http://127.0.0.1:")
    assert registration["redirect_uris"][0].endswith("/callback")
    assert registration["client_name"] == "broker (tools-auth)"
    assert registration["token_endpoint_auth_method"] == "client_secret_basic"
    assert registration["grant_types"] == ["authorization_code", "refresh_token"]
    config = created["config"]
    assert config["authorize_url"] == auth.authorize_url and config["token_url"] == auth.token_url
    assert config["revocation_url"] == auth.revocation_url and config["issuer"] == auth.issuer
    assert config["client_id"] == client_id and config["token_auth_method"] == "client_secret_basic"
    assert config["resource"] == [mcp.url] and config["scopes"] == ["tools"]  # PRM scopes_supported
    assert "client_secret" in created["secret_fields"]
    assert auth.registered[client_id].secret not in out + err  # the registered secret is never shown
    assert f"--config server_url={mcp.url}" in err and "oauth_connection=tools-auth" in err
    # The token the broker holds is one the MCP server accepts: issued for its URL, to this client.
    dev_broker.ok("grant", "tools-auth", EXECUTOR)
    resolved, _ = dev_broker.ok("resolve", "tools-auth")
    token = resolved["secrets"]["access_token"]
    assert auth.access_tokens[token].resources == (mcp.url,)
    assert auth.access_tokens[token].client_id == client_id
    assert _initialize(mcp.url, token).status_code == 200


def test_a_given_client_with_paste_well_known_uris_an_issuer_path_and_the_challenge_scope(
    dev_broker: DevBroker, tmp_path: Path
) -> None:
    """No resource_metadata in the challenge: the well-known URI with the server's path; an issuer
    with a path; a pre-registered client authenticating with client_secret_post; `scope` from the
    challenge wins over scopes_supported."""
    with oauthserver.running(
        metadata=True, issuer_path="/tenant-a", client_auth="client_secret_post"
    ) as auth:
        auth.metadata_overrides = {"token_endpoint_auth_methods_supported": ["client_secret_post"]}

        def accepts(token: str | None) -> bool:
            info = auth.access_tokens.get(token or "")
            return info is not None and token in auth.valid_access_tokens() and mcp.url in info.resources

        with mcpserver.running(
            accepts=accepts,
            json_response=True,
            challenge_metadata=False,
            challenge_scope="mcp:read mcp:write",
        ) as mcp:
            mcp.protected_resource = {
                "resource": mcp.url,
                "authorization_servers": [auth.issuer],
                "scopes_supported": ["other"],
            }
            secret = tmp_path / "secret"
            secret.write_text(auth.client_secret)
            argv = [
                *dev_broker.ctl_argv(), "oauth", "connect", "pasted", "--mcp-server", mcp.url,
                "--client-id", auth.client_id, "--secret", f"client_secret=@{secret}", "--paste",
            ]  # fmt: skip
            status, out, err = _connect_in_the_browser(argv, paste=True)
            assert status == 0, err + dev_broker.logs()
            config = json.loads(out)["config"]
            assert (
                config["client_id"] == auth.client_id and config["token_auth_method"] == "client_secret_post"
            )
            assert config["issuer"] == auth.issuer == f"{auth.url}/tenant-a"
            assert config["scopes"] == ["mcp:read", "mcp:write"] and config["resource"] == [mcp.url]
            assert auth.registrations == [] and auth.client_secret not in out + err
            assert auth.authorize_requests[0]["redirect_uri"] == "http://127.0.0.1:8976/callback"
            assert auth.authorize_requests[0]["scope"] == "mcp:read mcp:write"
            paths = [seen.path for seen in mcp.seen if seen.method == "GET"]
            assert paths[0] == "/.well-known/oauth-protected-resource/mcp"
            dev_broker.ok("grant", "pasted", EXECUTOR)
            token = dev_broker.ok("resolve", "pasted")[0]["secrets"]["access_token"]
            assert _initialize(mcp.url, token).status_code == 200


def _oversized(s: Servers) -> None:
    s.answer[0] = httpservers.Answer.json({"issuer": s.hostile.url, "padding": "x" * 70_000})


HOSTILE: dict[str, tuple[Callable[[Servers], None], str]] = {
    "resource of another server": (
        lambda s: setattr(s.mcp, "protected_resource", s.prm(resource="https://other.example/mcp")),
        "is for 'https://other.example/mcp'",
    ),
    "resource with a trailing slash": (
        lambda s: setattr(s.mcp, "protected_resource", s.prm(resource=s.mcp.url + "/")),
        "RFC 9728 3.3",
    ),
    "issuer mismatch": (
        lambda s: s.auth.metadata_overrides.update(issuer="https://idp.example"),
        "names the issuer 'https://idp.example'",
    ),
    "no S256": (
        lambda s: s.auth.metadata_overrides.update(code_challenge_methods_supported=["plain"]),
        "does not offer PKCE S256",
    ),
    "no PKCE at all": (
        lambda s: s.auth.metadata_overrides.update(code_challenge_methods_supported=None),
        "does not offer PKCE S256",
    ),
    "plain http token endpoint": (
        lambda s: s.auth.metadata_overrides.update(token_endpoint="http://auth.example.com/token"),
        "token_endpoint 'http://auth.example.com/token'",
    ),
    "plain http authorization server": (
        lambda s: setattr(
            s.mcp, "protected_resource", s.prm(authorization_servers=["http://auth.example.com"])
        ),
        "is plain http",
    ),
    "wrong-typed endpoint": (
        lambda s: s.auth.metadata_overrides.update(token_endpoint=42),
        "wrong-typed token_endpoint",
    ),
    "wrong-typed authorization_servers": (
        lambda s: setattr(s.mcp, "protected_resource", s.prm(authorization_servers=s.auth.issuer)),
        "wrong-typed authorization_servers",
    ),
    "no registration endpoint": (
        lambda s: s.auth.metadata_overrides.update(registration_endpoint=None),
        "pass --client-id",
    ),
    "registration answer without client_id": (
        lambda s: setattr(
            s.auth, "registration_reply", lambda a: {k: v for k, v in a.items() if k != "client_id"}
        ),
        "has no client_id",
    ),
    "registration answer without the secret": (
        lambda s: setattr(
            s.auth, "registration_reply", lambda a: {k: v for k, v in a.items() if k != "client_secret"}
        ),
        "without a client_secret",
    ),
    "metadata not JSON": (
        lambda s: s.answer.__setitem__(0, httpservers.Answer(200, b"<html>hello</html>")),
        "is not JSON",
    ),
    "metadata a JSON list": (
        lambda s: s.answer.__setitem__(0, httpservers.Answer.json([1, 2])),
        "is not a JSON object",
    ),
    "metadata oversized": (_oversized, "larger than 64 KiB"),
    "metadata redirects": (
        lambda s: s.answer.__setitem__(
            0, httpservers.Answer(302, headers={"Location": "https://evil.example/metadata"})
        ),
        "redirects (HTTP 302 to 'https://evil.example/metadata')",
    ),
}
# Those that change the hostile server's answer: it is named as the authorization server.
_FROM_HOSTILE = {"metadata not JSON", "metadata a JSON list", "metadata oversized", "metadata redirects"}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_or_broken_server_is_refused_and_nothing_is_created(
    dev_broker: DevBroker, servers: Servers, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    change, expected = HOSTILE[case]
    if case in _FROM_HOSTILE:
        servers.mcp.protected_resource = servers.prm(authorization_servers=[servers.hostile.url])
    change(servers)
    name = "hostile-" + case.replace(" ", "-")
    status = brokerctl.main([*dev_broker.ctl_argv()[3:], "oauth", "connect", name, "--mcp-server",
                             servers.mcp.url, "--paste"])  # fmt: skip
    err = capsys.readouterr().err
    error = json.loads(err.strip().splitlines()[-1])
    assert status == 1 and error["code"] == "DISCOVERY_FAILED", err
    assert expected in error["message"], error
    assert len(error["message"]) < 600 and "x" * 300 not in err
    assert servers.auth.authorize_requests == [] and not servers.auth.token_requests
    if "registration" not in case:
        assert servers.auth.registrations == []
    assert brokerctl.main([*dev_broker.ctl_argv()[3:], "list", "--name-prefix", name]) == 0
    assert json.loads(capsys.readouterr().out).get("connections", []) == []


def test_a_well_known_uri_the_challenge_names_must_be_https_and_is_not_followed_when_it_redirects(
    dev_broker: DevBroker, servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resource_metadata` pointing at another server that redirects: refused, nothing registered."""
    servers.answer[0] = httpservers.Answer(307, headers={"Location": servers.mcp.url})
    servers.mcp.prm_paths = ("/nowhere",)
    servers.mcp.challenge = lambda: f'Bearer resource_metadata="{servers.hostile.url}/prm"'  # type: ignore[method-assign]
    argv = [*dev_broker.ctl_argv()[3:], "oauth", "connect", "redirected", "--mcp-server", servers.mcp.url]
    assert brokerctl.main([*argv, "--paste"]) == 1
    error = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert "protected resource metadata at " + servers.hostile.url + "/prm redirects" in error["message"]
    assert error["url"] == servers.hostile.url + "/prm"
    assert servers.auth.registrations == []


def test_usage_errors_are_said_before_any_request(dev_broker: DevBroker, servers: Servers) -> None:
    base = ["oauth", "connect", "x", "--mcp-server", servers.mcp.url, "--paste"]
    for extra, words in (
        (["--config", f"token_url={servers.auth.token_url}"], "--mcp-server discovers token_url"),
        (["--secret", "client_secret=s"], "--secret client_secret goes with --client-id"),
        (["--provider", "custom"], "not allowed with argument"),
    ):
        result = dev_broker.ctl(*base, *extra)
        assert result.returncode == 2 and words in result.stderr, result.stderr
    result = dev_broker.ctl("oauth", "connect", "x", "--mcp-server", "http://mcp.example.com/mcp")
    assert result.returncode == 2 and "only https" in result.stderr
    assert servers.mcp.seen == []


# ------------------------------------------------------------------ a third-party authorization server

OIDC_PROVIDER = ("oidc-provider", "9.13.3")  # as in tests/integration/test_oauth_reference_server.py
OIDC_SERVER = Path(__file__).parents[1] / "node" / "oidc_provider.mjs"


def test_discovery_and_registration_at_oidc_provider(dev_broker: DevBroker) -> None:
    """panva's oidc-provider (a certified OpenID Provider): OpenID Connect Discovery only, RFC 7591
    registration, RFC 9207 iss, RFC 8707 audiences. The MCP server asks it (RFC 7662) about tokens."""
    home = nodeservers.installed(*OIDC_PROVIDER)
    shutil.copy(OIDC_SERVER, home / OIDC_SERVER.name)
    port, inspector = free_port(), secrets.token_urlsafe(24)
    issuer = f"http://127.0.0.1:{port}"

    def accepts(token: str | None) -> bool:
        if token is None:
            return False
        seen = httpx.post(
            f"{issuer}/token/introspection", data={"token": token}, auth=("inspector", inspector), timeout=10
        ).json()
        return seen.get("active") is True and seen.get("aud") == mcp.url

    with mcpserver.running(accepts=accepts, json_response=True) as mcp:
        mcp.protected_resource = {"resource": mcp.url, "authorization_servers": [issuer]}
        env = {
            "WEB_SECRET": secrets.token_urlsafe(24),
            "MACHINE_SECRET": inspector,
            "REDIRECT_URI": "http://127.0.0.1:9/unused",
            "API": mcp.url,
            "TOKEN_TTL": "300",
            "REGISTRATION": "1",
        }
        with nodeservers.serving(home, [OIDC_SERVER.name], port, env):
            callback_port = free_port()  # nothing listens: the browser stops at the redirect, pasted
            callback = f"http://127.0.0.1:{callback_port}/callback"
            argv = [
                *dev_broker.ctl_argv(), "oauth", "connect", "oidc-tools", "--mcp-server", mcp.url,
                "--scope", "openid", "--scope", "api:read", "--paste", "--port", str(callback_port),
            ]  # fmt: skip
            process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            try:
                assert process.stderr is not None and process.stdin is not None
                said: list[str] = []
                for line in process.stderr:
                    said.append(line)
                    if line.strip().startswith("http"):
                        break
                process.stdin.write(sign_in_at_the_provider(said[-1].strip(), callback) + "\n")
                process.stdin.flush()
                out, err = process.communicate(timeout=30)
                err = "".join(said) + err
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
            assert process.returncode == 0, err + dev_broker.logs()
            assert f"registered the client {json.loads(out)['config']['client_id']} at {issuer}/reg" in err
            config = json.loads(out)["config"]
            assert config["authorize_url"] == f"{issuer}/auth" and config["token_url"] == f"{issuer}/token"
            assert config["issuer"] == issuer and config["resource"] == [mcp.url]
            assert config["token_auth_method"] == "client_secret_basic"
            dev_broker.ok("grant", "oidc-tools", EXECUTOR)
            token = dev_broker.ok("resolve", "oidc-tools")[0]["secrets"]["access_token"]
            assert _initialize(mcp.url, token).status_code == 200
            assert _initialize(mcp.url, "not-a-token").status_code == 401
