"""Servers that echo what the broker sent them: nothing of a secret, composed or not, comes back.

Real servers on loopback, driven through the admin API of a real broker: an MCP server that
reflects a request header into its name and into a tool's name, description and input schema;
an HTTP server that puts the Basic credentials into a redirect's Location; an SMTP server whose
535 reply quotes the AUTH PLAIN message. Each secret is then searched for, in every form the
broker composed and every encoding of those, in the responses, the audit, the logs and the
database files.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from google.protobuf.message import Message

from broker._proto import broker_pb2 as pb
from broker.egress import EgressSettings
from tests import mcpserver
from tests.conftest import Running
from tests.helpers import EXECUTOR, struct
from tests.httpservers import Answer, Seen, serve
from tests.integration.test_proxy_api import proxy
from tests.postgres_db import fresh_database

pytestmark = pytest.mark.integration

# Nine characters: `user:` and `\0user\0` are then not whole base64 groups, so the base64 of the
# password alone is not a substring of the composed form's (with eight it would be, by chance).
USER = "svc-echo9"
PASSWORD = "Pw-echo-9c1f/+=d7"
KEY = "xkey-4e2b99c7-echo"
ROTATED = "xkey-51aa0f3d-rotated"


@pytest.fixture
async def broker(make_broker) -> AsyncIterator[Running]:  # type: ignore[no-untyped-def]
    running: Running = await make_broker(egress=EgressSettings(allow_loopback=True))
    yield running
    await running.close()
    await running.broker.stop(grace=0)


def _encodings(value: str) -> set[bytes]:
    raw = value.encode()
    return {
        raw,
        base64.b64encode(raw),
        base64.b64encode(raw).rstrip(b"="),
        base64.urlsafe_b64encode(raw),
        urllib.parse.quote(value, safe="").encode(),
        urllib.parse.quote(value).encode(),
        raw.hex().encode(),
    }


def _leaks(secret: str, user: str = USER) -> set[bytes]:
    """The secret and what the broker composes from it, in each encoding a server might echo."""
    composed = (
        secret,
        f"{user}:{secret}",
        f"\0{user}\0{secret}",
        f"{user}\0{user}\0{secret}",
        f"Bearer {secret}",
    )
    return {form for value in composed for form in _encodings(value)}


def _assert_absent(haystack: bytes | str | Message, secret: str, where: str) -> None:
    if isinstance(haystack, Message):
        haystack = haystack.SerializeToString() + str(haystack).encode()
    data = haystack.encode() if isinstance(haystack, str) else haystack
    for form in _leaks(secret):
        assert form not in data, f"{form!r} found in {where}"


def _assert_nowhere(running: Running, secret: str, responses: Iterable[Message]) -> None:
    """Not in any response, the logs, the audit table or the database files (WAL included)."""
    for response in responses:
        _assert_absent(response, secret, type(response).__name__)
    _assert_absent(running.logs.getvalue(), secret, "logs")
    db_path = Path(running.broker.settings.storage_path)
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT * FROM mcp_tools").fetchall()
        audit = db.execute("SELECT * FROM audit_events").fetchall()
    _assert_absent(repr(rows), secret, "mcp_tools rows")
    _assert_absent(repr(audit), secret, "audit rows")
    for path in db_path.parent.glob(db_path.name + "*"):
        _assert_absent(path.read_bytes(), secret, path.name)


# --------------------------------------------------------------------------------------- MCP


async def test_an_mcp_server_echoing_the_api_key_into_its_tools_stores_and_returns_no_key(
    broker: Running,
) -> None:
    admin = broker.admin()
    with mcpserver.running(echo_header="X-Key") as server:
        created = await admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="echo-key",
                type="mcp",
                config=struct({"server_url": server.url, "auth_type": "api_key", "api_key_header": "X-Key"}),
                secrets={"api_key": KEY},
            )
        )
        refreshed = await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=created.id))
        assert server.echoed == KEY  # the server did reflect the key
        _assert_absent(refreshed, KEY, "RefreshMcpTools")
        assert refreshed.result.success, refreshed.result
        assert refreshed.result.details["tools_redacted"] == "1"
        assert refreshed.result.details["server_name"] == "echo [redacted]"
        echo = next(t for t in refreshed.tools if t.name.startswith("echo_"))
        assert echo.name == "echo_[redacted]" and echo.description == "Uses [redacted] for you."
        assert dict(echo.input_schema["properties"]).keys() == {"[redacted]"}
        assert list(echo.input_schema["required"]) == ["[redacted]"]
        # The title and the annotations' title are the server's words too.
        assert echo.title == "Echo [redacted]" and echo.annotations.title == "Echoes [redacted]"
        assert echo.annotations.read_only_hint
        assert "echo_[redacted]" in refreshed.added and len(refreshed.tools) == 26

        listed = await admin.ListMcpTools(pb.ListMcpToolsRequest(id=created.id))
        assert list(listed.tools) == list(refreshed.tools)
        await admin.GrantAccess(
            pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR, mode=pb.GRANT_MODE_PROXY)
        )
        listing = pb.ListGrantedMcpToolsRequest(connection_id=created.id)
        granted = await proxy(broker).ListGrantedMcpTools(listing)
        assert echo in granted.tools  # the executor's listing: the same scrubbed tool
        discovered = await admin.DiscoverMcpTools(pb.DiscoverMcpToolsRequest(id=created.id))
        assert {t.name: t.definition_hash for t in discovered.tools} == {
            t.name: t.definition_hash for t in refreshed.tools
        }
        tested = await admin.TestConnection(pb.TestConnectionRequest(id=created.id))
        fetched = await admin.GetConnection(pb.GetConnectionRequest(id=created.id))
        assert fetched.last_test == tested and tested.success

        # The hash is of the scrubbed form: the same echo is no change, even with a new key.
        again = await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=created.id))
        assert (list(again.added), list(again.removed), list(again.changed)) == ([], [], [])
        await admin.UpdateConnection(pb.UpdateConnectionRequest(id=created.id, secrets={"api_key": ROTATED}))
        rotated = await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=created.id))
        assert server.echoed == ROTATED
        assert (list(rotated.added), list(rotated.removed), list(rotated.changed)) == ([], [], [])
        audit = await admin.ListAuditEvents(pb.ListAuditEventsRequest(connection_id=created.id))

    responses = [refreshed, listed, granted, discovered, tested, fetched, again, rotated, audit]
    for secret in (KEY, ROTATED):
        _assert_nowhere(broker, secret, responses)


async def test_an_mcp_server_echoing_basic_credentials_into_its_name_and_tools_leaks_nothing(
    broker: Running,
) -> None:
    admin = broker.admin()
    with mcpserver.running(echo_header="Authorization") as server:
        created = await admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="echo-basic",
                type="mcp",
                config=struct({"server_url": server.url, "auth_type": "basic", "username": USER}),
                secrets={"password": PASSWORD},
            )
        )
        tested = await admin.TestConnection(pb.TestConnectionRequest(id=created.id))
        assert server.echoed is not None and server.echoed.startswith("Basic ")
        fetched = await admin.GetConnection(pb.GetConnectionRequest(id=created.id))
        assert tested.success and fetched.last_test == tested
        assert tested.details["server_name"] == "echo [redacted]"
        assert tested.details["server_version"] == "[redacted]"
        refreshed = await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=created.id))
        listed = await admin.ListMcpTools(pb.ListMcpToolsRequest(id=created.id))
        discovered = await admin.DiscoverMcpTools(pb.DiscoverMcpToolsRequest(id=created.id))
        assert "echo_[redacted]" in {t.name for t in listed.tools}
        audit = await admin.ListAuditEvents(pb.ListAuditEventsRequest(connection_id=created.id))

    _assert_nowhere(broker, PASSWORD, [tested, fetched, refreshed, listed, discovered, audit])


# -------------------------------------------------------------------------------------- HTTP


async def test_an_http_redirect_echoing_basic_credentials_leaks_nothing_into_last_test(
    broker: Running,
) -> None:
    admin = broker.admin()

    def route(seen: Seen) -> Answer:
        header = seen.headers.get("authorization", "")
        blob = header.removeprefix("Basic ")
        # To another host, so the redirect is not followed and its location is the answer.
        location = f"http://localhost:{seen_port[0]}/welcome/{blob}/{urllib.parse.quote(header)}?t={blob}"
        return Answer(302, headers={"Location": location})

    seen_port: list[int] = []
    with serve(route) as server:
        seen_port.append(server.port)
        created = await admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="redirecting",
                type="http",
                config=struct({"base_url": server.url + "/", "auth_type": "basic", "username": USER}),
                secrets={"password": PASSWORD},
            )
        )
        tested = await admin.TestConnection(pb.TestConnectionRequest(id=created.id))
    assert server.requests[0].headers["authorization"].startswith("Basic ")
    assert tested.success, tested
    assert tested.details["location"] == f"http://localhost:{server.port}/welcome/[redacted]/[redacted]"
    fetched = await admin.GetConnection(pb.GetConnectionRequest(id=created.id))
    assert fetched.last_test == tested
    _assert_nowhere(broker, PASSWORD, [tested, fetched])


# -------------------------------------------------------------------------------------- SMTP


def _echo_plain(padding: str) -> Callable[..., AuthResult]:
    """An authenticator that refuses, quoting the AUTH PLAIN message (re-encoded) after `padding`."""

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        blob = base64.b64encode(b"\0" + data.login + b"\0" + data.password).decode()
        return AuthResult(
            success=False, handled=False, message=f"535 5.7.8 {padding}rejected AUTH PLAIN {blob}"
        )

    return authenticate


# The tester keeps 200 characters of a reply; 144 dots leave the message's first 30 characters.
@pytest.mark.parametrize("padding", ["", "." * 144], ids=["whole", "cut-short"])
async def test_an_smtp_535_echoing_auth_plain_leaks_nothing_into_last_test(
    broker: Running, padding: str
) -> None:
    admin = broker.admin()
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(
            object(),
            hostname="mail.test",
            authenticator=_echo_plain(padding),
            auth_require_tls=False,
            auth_exclude_mechanism=["LOGIN"],
            loop=loop,
        )

    smtpd = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        port = int(smtpd.sockets[0].getsockname()[1])
        created = await admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="mailer",
                type="smtp",
                config=struct({"host": "127.0.0.1", "port": port, "encryption": "none", "username": USER}),
                secrets={"password": PASSWORD},
            )
        )
        tested = await admin.TestConnection(pb.TestConnectionRequest(id=created.id))
    finally:
        smtpd.close()
        await smtpd.wait_closed()
    assert tested.category == pb.TEST_CATEGORY_AUTH_FAILED, tested
    assert (
        tested.message
        == f"server rejected the credentials: 535 5.7.8 {padding}rejected AUTH PLAIN [redacted]"
    )
    fetched = await admin.GetConnection(pb.GetConnectionRequest(id=created.id))
    assert fetched.last_test == tested
    _assert_nowhere(broker, PASSWORD, [tested, fetched])
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    assert blob[:28] not in tested.message  # 21 bytes: the user and the password's first ten characters


# ------------------------------------------------------------------ text no store accepts


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_server_sending_nul_is_stored_not_internal(
    make_broker: Callable[..., Any], store: str
) -> None:
    """PostgreSQL's text refuses NUL: it becomes U+FFFD (lone surrogates too: tests/unit/test_scrub.py)."""
    async with contextlib.AsyncExitStack() as stack:
        overrides: dict[str, Any] = {}
        if store == "postgresql":
            dsn = await stack.enter_async_context(fresh_database())
            overrides = {"storage_path": None, "storage_url": dsn, "storage_pool_max": 4}
        running: Running = await make_broker(egress=EgressSettings(allow_loopback=True), **overrides)
        stack.push_async_callback(running.broker.stop, 0)
        stack.push_async_callback(running.close)
        admin = running.admin()
        with mcpserver.running() as server:
            server.descriptions["tool_00"] = "nul \x00 here"
            created = await admin.CreateConnection(
                pb.CreateConnectionRequest(
                    name="odd-text", type="mcp", config=struct({"server_url": server.url})
                )
            )
            refreshed = await admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=created.id))
        listed = await admin.ListMcpTools(pb.ListMcpToolsRequest(id=created.id))
        assert refreshed.result.success, refreshed.result
        descriptions = {t.name: t.description for t in listed.tools}
        assert descriptions["tool_00"] == "nul \ufffd here"
