"""A connection's destination is bound into its ciphertext (issue 12, item 7; item 4's sealed-column types).

Someone with write access to the database but not the master key re-points a sealed
row at their own listener: every path that would open the secret fails closed as
decrypt_failed (DATA_LOSS, audited) and nothing ever connects to the new destination.
Legitimate changes (updates, token refresh, rotation) keep working, and rows sealed
before the binding (format 1) are re-sealed at start. How the secret travels (TLS, CA,
driver options) is bound too: tests/integration/test_transport_binding.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.cli import broker as broker_cli
from broker.crypto import FORMAT_VERSION, Binding
from broker.egress import EgressSettings
from tests.conftest import Running
from tests.helpers import EXECUTOR, rpc_error, seal_as_format, set_stored_config, struct
from tests.httpservers import Answer, serve
from tests.postgres_db import fresh_database

TOKEN = "tok-canary-7f3a9d"  # the secret that must never reach the attacker's listener


@dataclass
class RecordingListener:
    """A loopback TCP listener that counts every connection made to it (and answers none)."""

    port: int
    accepted: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def recording_listener() -> Iterator[RecordingListener]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        server.settimeout(0.05)
        found = RecordingListener(server.getsockname()[1])
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                try:
                    conn, peer = server.accept()
                except TimeoutError:
                    continue
                found.accepted.append(f"{peer[0]}:{peer[1]}")
                conn.close()

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield found
        finally:
            stop.set()
            thread.join(5)


@pytest.fixture
def attacker() -> Iterator[RecordingListener]:
    with recording_listener() as listener:
        yield listener


@pytest.fixture
def upstream() -> Iterator[str]:
    """The legitimate server: answers 200 to everything."""
    with serve(lambda seen: Answer.json({"ok": True})) as server:
        yield server.url


@pytest.fixture
def start(make_broker: Callable[..., Any]) -> Callable[..., Any]:
    """Start (or restart, on the same database and master key) a broker that may reach loopback."""

    async def go(**overrides: Any) -> Running:
        running: Running = await make_broker(egress=EgressSettings(allow_loopback=True), **overrides)
        return running

    return go


async def stop(running: Running) -> None:
    await running.close()
    await running.broker.stop(grace=0)


def http_request(name: str, base_url: str) -> pb.CreateConnectionRequest:
    return pb.CreateConnectionRequest(
        name=name,
        type="http",
        config=struct({"base_url": base_url, "auth_type": "bearer"}),
        secrets={"token": TOKEN},
    )


def mcp_request(name: str, server_url: str) -> pb.CreateConnectionRequest:
    return pb.CreateConnectionRequest(
        name=name,
        type="mcp",
        config=struct({"server_url": server_url, "auth_type": "bearer"}),
        secrets={"token": TOKEN},
    )


def oauth_request(name: str, token_url: str) -> pb.CreateConnectionRequest:
    """An oauth2 connection whose access token has expired: the next Resolve refreshes it."""
    return pb.CreateConnectionRequest(
        name=name,
        type="oauth2",
        provider="custom",
        config=struct(
            {
                "client_id": "client-1",
                "token_url": token_url,
                "authorize_url": token_url.replace("/token", "/authorize"),
                "expires_at": "2020-01-01T00:00:00+00:00",
            }
        ),
        secrets={"client_secret": TOKEN, "access_token": "old-access", "refresh_token": TOKEN + "-refresh"},
    )


async def create_and_grant(running: Running, request: pb.CreateConnectionRequest) -> pb.Connection:
    admin = running.admin()
    created = await admin.CreateConnection(request)
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    return created


async def failed_events(running: Running, connection_id: str) -> set[tuple[str, str]]:
    """(action, reason) of every failed audit event of the connection."""
    events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(connection_id=connection_id))
    return {(e.action, e.reason) for e in events.events if e.outcome == "failed"}


async def expect_decrypt_failed(call: Any) -> None:
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.DATA_LOSS, error
    assert TOKEN not in str(error.details()) + str(error.trailing_metadata())


async def assert_every_path_fails_closed(
    running: Running,
    http: pb.Connection,
    mcp: pb.Connection,
    oauth: pb.Connection,
    attacker: RecordingListener,
) -> None:
    admin, resolver = running.admin(), running.resolver()
    await expect_decrypt_failed(resolver.Resolve(pb.ResolveRequest(connection_id=http.id)))
    await expect_decrypt_failed(resolver.Resolve(pb.ResolveRequest(connection_id=oauth.id)))
    await expect_decrypt_failed(admin.TestConnection(pb.TestConnectionRequest(id=http.id)))
    await expect_decrypt_failed(admin.DiscoverMcpTools(pb.DiscoverMcpToolsRequest(id=mcp.id)))
    await expect_decrypt_failed(admin.RefreshMcpTools(pb.RefreshMcpToolsRequest(id=mcp.id)))
    # The background refresher reads the row itself: it too sends nothing.
    await running.broker.services.tokens.refresh_due()

    assert attacker.accepted == []
    assert await failed_events(running, http.id) == {
        ("connection.resolve", "decrypt_failed"),
        ("connection.test", "decrypt_failed"),
    }
    assert await failed_events(running, mcp.id) == {
        ("mcp.discover", "decrypt_failed"),
        ("mcp.refresh", "decrypt_failed"),
    }
    assert await failed_events(running, oauth.id) == {
        ("connection.resolve", "decrypt_failed"),
        ("oauth.refresh", "decrypt_failed"),
    }
    assert TOKEN not in running.logs.getvalue()


async def test_a_row_re_pointed_in_sqlite_fails_closed_and_nothing_reaches_the_new_destination(
    start: Callable[..., Any], upstream: str, attacker: RecordingListener
) -> None:
    running: Running = await start()
    http = await create_and_grant(running, http_request("api", upstream))
    mcp = await create_and_grant(running, mcp_request("tools", upstream + "/mcp"))
    oauth = await create_and_grant(running, oauth_request("calendar", upstream + "/token"))
    assert (await running.resolver().Resolve(pb.ResolveRequest(connection_id=http.id))).secrets[
        "token"
    ] == TOKEN
    path = running.broker.settings.storage_path
    await stop(running)

    set_stored_config(path, http.id, "base_url", attacker.url)
    set_stored_config(path, mcp.id, "server_url", attacker.url + "/mcp")
    set_stored_config(path, oauth.id, "token_url", attacker.url + "/token")

    running = await start()
    try:
        await assert_every_path_fails_closed(running, http, mcp, oauth, attacker)
        # Tampering is a security event: critical, once per connection however often it fails.
        await running.broker.services.monitor.settle()
        reply = await running.admin().ListSecurityEvents(pb.ListSecurityEventsRequest(rule="decrypt_failed"))
        assert sorted(e.connection_id for e in reply.events) == sorted([http.id, mcp.id, oauth.id])
        assert {(e.severity, e.action) for e in reply.events} == {("critical", "alerted")}
    finally:
        await stop(running)


@pytest.fixture
async def postgres_dsn() -> AsyncIterator[str]:
    async with fresh_database() as dsn:
        yield dsn


async def test_a_row_re_pointed_in_postgres_fails_closed_and_nothing_reaches_the_new_destination(
    start: Callable[..., Any], upstream: str, attacker: RecordingListener, postgres_dsn: str
) -> None:
    pg = {"storage_path": None, "storage_url": postgres_dsn, "storage_pool_max": 4}
    running: Running = await start(**pg)
    http = await create_and_grant(running, http_request("api", upstream))
    mcp = await create_and_grant(running, mcp_request("tools", upstream + "/mcp"))
    oauth = await create_and_grant(running, oauth_request("calendar", upstream + "/token"))
    await stop(running)

    db = await asyncpg.connect(postgres_dsn)
    try:
        for connection_id, key, url in (
            (http.id, "base_url", attacker.url),
            (mcp.id, "server_url", attacker.url + "/mcp"),
            (oauth.id, "token_url", attacker.url + "/token"),
        ):
            await db.execute(
                "UPDATE connections SET config = jsonb_set(config::jsonb, $1, to_jsonb($2::text))::text"
                " WHERE id = $3",
                [key],
                url,
                connection_id,
            )
    finally:
        await db.close()

    running = await start(**pg)
    try:
        await assert_every_path_fails_closed(running, http, mcp, oauth, attacker)
    finally:
        await stop(running)


async def test_legitimate_changes_re_seal_and_keep_working(
    start: Callable[..., Any], upstream: str, attacker: RecordingListener
) -> None:
    running: Running = await start()
    admin, resolver = running.admin(), running.resolver()
    http = await create_and_grant(running, http_request("api", upstream))
    # A webhook without auth still has a sealed (empty) secret set bound to its URL.
    hook = await create_and_grant(
        running,
        pb.CreateConnectionRequest(name="hook", type="webhook", config=struct({"url": upstream + "/hook"})),
    )

    # A labels-only change keeps the seal (and the secret version).
    await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=http.id, labels=pb.Labels(values={"env": "prod"}))
    )
    assert (await resolver.Resolve(pb.ResolveRequest(connection_id=http.id))).secret_version == 1

    # Moving with the secrets given again re-seals for the new destination.
    moved_to = upstream + "/v2"
    await admin.UpdateConnection(
        pb.UpdateConnectionRequest(
            id=http.id, config=struct({"base_url": moved_to}), secrets={"token": TOKEN}
        )
    )
    resolved = await resolver.Resolve(pb.ResolveRequest(connection_id=http.id))
    assert resolved.config["base_url"] == moved_to and resolved.secrets["token"] == TOKEN

    # Moving without any secret to give: the service must re-seal all the same.
    await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=hook.id, config=struct({"url": upstream + "/new"}))
    )
    resolved = await resolver.Resolve(pb.ResolveRequest(connection_id=hook.id))
    assert resolved.config["url"] == upstream + "/new" and resolved.secret_version == 2
    assert (await admin.TestConnection(pb.TestConnectionRequest(id=http.id))).success

    # All of it survives a restart (the start-up pass leaves rows of the current format alone).
    await stop(running)
    running = await start()
    try:
        for connection_id in (http.id, hook.id):
            assert await running.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
        events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="connection.rebind"))
        assert list(events.events) == []
    finally:
        await stop(running)
    assert attacker.accepted == []


def _raw(key_file: Path) -> bytes:
    """The master key as the key file holds it (base64)."""
    return base64.b64decode(key_file.read_text())


def write_as_format_1(path: Path, key_file: Path, connection_id: str) -> None:
    """Turn the row into one an older broker wrote: the token in format 1, no destination bound."""
    old = seal_as_format(
        _raw(key_file), b'{"token":"' + TOKEN.encode() + b'"}', Binding("default", connection_id, 1), 1
    )
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "UPDATE connections SET ciphertext = ?, wrapped_dek = ?, kek_id = ? WHERE id = ?",
            (*old, connection_id),
        )
    db.close()


async def test_rows_sealed_before_the_binding_are_re_sealed_at_start_then_bound(
    start: Callable[..., Any], upstream: str, attacker: RecordingListener, tmp_path: Path
) -> None:
    running: Running = await start()
    http = await create_and_grant(running, http_request("api", upstream))
    path = running.broker.settings.storage_path
    key_file = running.broker.settings.master_key_file
    await stop(running)

    write_as_format_1(path, key_file, http.id)

    running = await start()
    try:
        db = sqlite3.connect(path)
        (ciphertext, version) = db.execute(
            "SELECT ciphertext, secret_version FROM connections WHERE id = ?", (http.id,)
        ).fetchone()
        db.close()
        # Re-sealed in the current format, same secret version.
        assert ciphertext[0] == FORMAT_VERSION and version == 1
        resolved = await running.resolver().Resolve(pb.ResolveRequest(connection_id=http.id))
        assert resolved.secrets["token"] == TOKEN
        events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="connection.rebind"))
        assert [(e.connection_id, e.actor) for e in events.events] == [(http.id, "broker:rebind")]
    finally:
        await stop(running)

    # From now on the row is bound: re-pointing it fails closed.
    set_stored_config(path, http.id, "base_url", attacker.url)
    running = await start()
    try:
        await expect_decrypt_failed(running.resolver().Resolve(pb.ResolveRequest(connection_id=http.id)))
        await expect_decrypt_failed(running.admin().TestConnection(pb.TestConnectionRequest(id=http.id)))
    finally:
        await stop(running)
    assert attacker.accepted == []


async def test_a_legacy_row_beside_current_ones_is_left_failing_closed_until_an_operator_rebinds_it(
    start: Callable[..., Any],
    upstream: str,
    attacker: RecordingListener,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An upgrade re-seals every row before the broker serves, so a row of an older format found
    beside current ones was not left by an upgrade: it may be a backup's ciphertext written back
    and re-pointed by someone with write access to the database, who needs only a restart for the
    start-up pass to bind the secret to their listener. That pass leaves such a row alone (it keeps
    failing closed) and says so; `broker keys rebind`, run by an operator who vouches for the
    row, re-seals it."""
    running: Running = await start()
    kept = await create_and_grant(running, http_request("kept", upstream))
    replayed = await create_and_grant(running, http_request("api", upstream))
    settings = running.broker.settings
    path, key_file = settings.storage_path, settings.master_key_file
    await stop(running)

    write_as_format_1(path, key_file, replayed.id)  # as a backup from before the binding holds it
    set_stored_config(path, replayed.id, "base_url", attacker.url)

    running = await start()
    try:
        assert _format_of(path, replayed.id) == 1  # left as it was
        await expect_decrypt_failed(running.resolver().Resolve(pb.ResolveRequest(connection_id=replayed.id)))
        await expect_decrypt_failed(running.admin().TestConnection(pb.TestConnectionRequest(id=replayed.id)))
        assert await running.resolver().Resolve(pb.ResolveRequest(connection_id=kept.id))
        events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="connection.rebind"))
        assert list(events.events) == []
        assert "rebind_refused" in running.logs.getvalue() and replayed.id in running.logs.getvalue()
    finally:
        await stop(running)
    assert attacker.accepted == []

    # The operator's command re-seals it, bound to what the row holds now, and audits it.
    config = tmp_path / "rebind.toml"
    tls = settings.tls
    config.write_text(
        "\n".join(
            [
                f'[tls]\ncert = "{tls.cert}"\nkey = "{tls.key}"\nclient_ca = "{tls.client_ca}"',
                f'[storage]\npath = "{path}"',
                f'[master_key]\nfile = "{key_file}"\n',
            ]
        )
    )
    assert await asyncio.to_thread(broker_cli.main, ["keys", "rebind", "--config", str(config)]) == 0
    assert "re-sealed 1 connection" in capsys.readouterr().out
    assert _format_of(path, replayed.id) == FORMAT_VERSION
    running = await start()
    try:
        events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="connection.rebind"))
        assert [(e.connection_id, e.actor) for e in events.events] == [(replayed.id, "broker:rebind")]
    finally:
        await stop(running)


def _format_of(path: Path, connection_id: str) -> int:
    db = sqlite3.connect(path)
    (ciphertext,) = db.execute("SELECT ciphertext FROM connections WHERE id = ?", (connection_id,)).fetchone()
    db.close()
    return int(ciphertext[0])


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("ciphertext", "text where a blob belongs"),
        ("wrapped_dek", "text"),
        ("ciphertext", 12345),
        ("wrapped_dek", 1 << 40),  # bytes(1 << 40) would try to allocate a terabyte
    ],
    ids=["ciphertext-text", "wrapped_dek-text", "ciphertext-int", "wrapped_dek-huge-int"],
)
async def test_a_sealed_column_of_the_wrong_sql_type_is_decrypt_failed_not_internal(
    start: Callable[..., Any], upstream: str, column: str, value: object
) -> None:
    running: Running = await start()
    http = await create_and_grant(running, http_request("api", upstream))
    path = running.broker.settings.storage_path
    await stop(running)
    db = sqlite3.connect(path)
    with db:
        db.execute(f"UPDATE connections SET {column} = ? WHERE id = ?", (value, http.id))
    db.close()

    running = await start()
    try:
        admin = running.admin()
        await expect_decrypt_failed(running.resolver().Resolve(pb.ResolveRequest(connection_id=http.id)))
        await expect_decrypt_failed(admin.TestConnection(pb.TestConnectionRequest(id=http.id)))
        await expect_decrypt_failed(
            admin.UpdateConnection(
                pb.UpdateConnectionRequest(id=http.id, labels=pb.Labels(values={"a": "b"}))
            )
        )
        assert await failed_events(running, http.id) == {
            ("connection.resolve", "decrypt_failed"),
            ("connection.test", "decrypt_failed"),
            ("connection.update", "decrypt_failed"),
        }
        # The admin can still read and revoke the broken row.
        assert (await admin.GetConnection(pb.GetConnectionRequest(id=http.id))).id == http.id
        await admin.RevokeConnection(pb.RevokeConnectionRequest(id=http.id, reason="tampered"))
    finally:
        await stop(running)


async def test_echoes_stored_before_scrubbing_knew_composed_credentials_are_scrubbed_at_start(
    start: Callable[..., Any],
) -> None:
    """A format-1 row predates the scrubbing of composed credentials: its stored echoes go too."""
    user, password = "svc-old9", "Old-pass-4c2e/+="
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    running: Running = await start()
    created = await running.admin().CreateConnection(
        pb.CreateConnectionRequest(
            name="old-tools",
            type="mcp",
            config=struct({"server_url": "https://mcp.example/mcp", "auth_type": "basic", "username": user}),
            secrets={"password": password},
        )
    )
    path = running.broker.settings.storage_path
    key_file = running.broker.settings.master_key_file
    await stop(running)

    # What an older broker kept: a format-1 row whose last test and tools echo the Basic header.
    plaintext = b'{"password":"' + password.encode() + b'"}'
    sealed = seal_as_format(_raw(key_file), plaintext, Binding("default", created.id, 1), 1)
    echoed = f"redirected to https://x/?auth=Basic {basic}"
    last_test = {
        "success": False,
        "category": "unexpected_response",
        "stage": "sample_operation",
        "message": echoed,
        "details": {"location": basic},
        "verified": [],
        "not_verified": [],
        "latency_ms": 3,
        "tested_at": 1,
    }
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "UPDATE connections SET ciphertext = ?, wrapped_dek = ?, kek_id = ?, last_test = ? WHERE id = ?",
            (*sealed, json.dumps(last_test), created.id),
        )
        db.execute(
            # The columns an older broker wrote; those added since (0013) take their defaults.
            "INSERT INTO mcp_tools (tenant, connection_id, name, description, input_schema,"
            " definition_hash, discovered_at) VALUES ('default', ?, ?, ?, ?, 'h', 1)",
            (created.id, f"echo_{basic}", f"Uses Basic {basic}", json.dumps({basic: {"default": password}})),
        )
    db.close()

    running = await start()
    try:
        fetched = await running.admin().GetConnection(pb.GetConnectionRequest(id=created.id))
        listed = await running.admin().ListMcpTools(pb.ListMcpToolsRequest(id=created.id))
    finally:
        await stop(running)
    assert fetched.last_test.message == "redirected to https://x/?auth=[redacted]"
    assert [t.name for t in listed.tools] == ["echo_[redacted]"]
    for found in (str(fetched), str(listed), *(p.read_bytes() for p in path.parent.glob(path.name + "*"))):
        for form in (basic, password, base64.b64encode(password.encode()).decode()):
            assert (form.encode() if isinstance(found, bytes) else form) not in found
