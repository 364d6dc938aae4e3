"""`brokerctl oauth connect --mcp-server`, then what a user does next: sign in again, make mistakes.

Found by walking the README against the MCP TypeScript SDK's example server. Its demo authorization
server, like ours (tests/oauthserver.py), takes only the redirect URIs a client registered, port
included; a client `--mcp-server` registered must keep working for `oauth reauthorize`, which an
authorization-code connection without a refresh token needs every time its token lapses.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from broker.cli import brokerctl
from tests.devbroker import DevBroker, start_dev_broker
from tests.integration.test_mcp_oauth_discovery import Servers, _connect_in_the_browser, servers

pytestmark = pytest.mark.integration

__all__ = ["servers"]  # the fixture, used by name


@pytest.fixture(scope="module")
def dev_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevBroker]:
    yield from start_dev_broker(tmp_path_factory.mktemp("connect-again"))


def _connect(dev_broker: DevBroker, servers: Servers, name: str) -> dict[str, object]:
    argv = [*dev_broker.ctl_argv(), "oauth", "connect", name, "--mcp-server", servers.mcp.url]
    status, out, err = _connect_in_the_browser([*argv, "--wait", "30"], paste=False)
    assert status == 0, err + dev_broker.logs()
    created: dict[str, object] = json.loads(out)
    return created


def test_reauthorize_uses_the_redirect_uri_the_client_was_registered_with(
    dev_broker: DevBroker, servers: Servers
) -> None:
    _connect(dev_broker, servers, "again")
    [registered] = servers.auth.registrations[0]["redirect_uris"]
    argv = [*dev_broker.ctl_argv(), "oauth", "reauthorize", "again", "--wait", "30"]
    status, out, err = _connect_in_the_browser(argv, paste=False)
    assert status == 0, err + dev_broker.logs()
    assert [seen["redirect_uri"] for seen in servers.auth.authorize_requests] == [registered, registered]
    assert json.loads(out)["status"] == "CONNECTION_STATUS_ACTIVE"


def test_reauthorize_when_the_registered_port_is_taken_says_so(
    dev_broker: DevBroker, servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    created = _connect(dev_broker, servers, "busy")
    port = int(servers.auth.registrations[0]["redirect_uris"][0].split(":")[2].split("/")[0])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the last redirect's TIME_WAIT
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        status = brokerctl.main([*dev_broker.ctl_argv()[3:], "oauth", "reauthorize", "busy", "--wait", "1"])
    err = capsys.readouterr().err
    assert status == 2, err
    error = json.loads(err.strip().splitlines()[-1])
    assert error["code"] == "USAGE" and f"127.0.0.1:{port}" in error["message"], error
    assert "in use" in error["message"] and "Traceback" not in err
    assert created["id"]


def test_a_taken_name_is_refused_before_a_client_is_registered(
    dev_broker: DevBroker, servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    _connect(dev_broker, servers, "twice")
    assert len(servers.auth.registrations) == 1
    status = brokerctl.main(
        [*dev_broker.ctl_argv()[3:], "oauth", "connect", "twice", "--mcp-server", servers.mcp.url, "--paste"]
    )
    error = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert status == 1 and error["code"] == "ALREADY_EXISTS", error
    assert len(servers.auth.registrations) == 1  # no stray client left at the authorization server


def test_a_url_that_is_not_the_mcp_server_is_named_in_plain_words(
    dev_broker: DevBroker, servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing at the URL (404 everywhere): the error asks whether the URL is right."""
    typo = servers.hostile.url + "/mpc"
    status = brokerctl.main(
        [*dev_broker.ctl_argv()[3:], "oauth", "connect", "typo", "--mcp-server", typo, "--paste"]
    )
    error = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert status == 1 and error["code"] == "DISCOVERY_FAILED", error
    assert error["message"].startswith("no protected resource metadata found"), error
    assert error["message"].endswith(f"is {typo} the MCP server's URL?"), error


def test_metadata_for_another_url_names_the_url_to_use(
    dev_broker: DevBroker, servers: Servers, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same server by another name (127.0.0.1 for localhost, a path with a typo the server
    also answers): refused, as RFC 9728 3.3 says, with the URL its metadata names."""
    other = servers.mcp.url.replace("/mcp", "/mpc")
    status = brokerctl.main(
        [*dev_broker.ctl_argv()[3:], "oauth", "connect", "alias", "--mcp-server", other, "--paste"]
    )
    error = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert status == 1 and error["code"] == "DISCOVERY_FAILED", error
    assert error["message"].endswith(f"use it: --mcp-server {servers.mcp.url}"), error
    assert servers.auth.registrations == []
