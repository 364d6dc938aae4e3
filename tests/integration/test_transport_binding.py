"""How a connection's secret travels is bound into its ciphertext too (envelope format 3), and
what a dynamic database connection does with it (format 4).

Someone with write access to the database but not the master key turns a database's TLS
off, loosens its driver options, drops a mail server's encryption or puts their own CA in
`ssl_ca`: the row fails closed as decrypt_failed, exactly as a re-pointed host does, and
nothing is sent. Rows sealed before (format 2, whose digest covered where only) are
re-sealed at start; an admin's UpdateConnection of these fields re-seals and keeps working.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import sqlite3
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from google.protobuf import json_format

from broker import crypto, pki
from broker._proto import broker_pb2 as pb
from broker.crypto import FORMAT_VERSION, Binding, Kek, Keyring
from broker.model import AuditFilter, ConnectionRecord
from broker.service.rebind import rebind_legacy
from broker.service.sealing import open_secrets
from broker.store import Store
from tests.conftest import Running
from tests.helpers import field_violations, rpc_error, seal_as_format, set_stored_config, struct
from tests.integration import test_destination_binding as binding
from tests.integration.test_destination_binding import (
    TOKEN,
    RecordingListener,
    create_and_grant,
    expect_decrypt_failed,
    failed_events,
    stop,
)
from tests.integration.test_store import make_connection, make_event, replicas
from tests.postgres_db import base_dsn, fresh_database

pytestmark = pytest.mark.integration

# The fixtures of the destination tests: a broker that may reach loopback, restartable on the
# same database and master key, and a listener that counts every connection made to it.
start = binding.start
attacker = binding.attacker

ATTACKER_CA = pki.create_ca("attacker CA")[0].decode()
USER = "mailer"

# ------------------------------------------------------------------------- connections


def database_request(name: str, port: int, **config: Any) -> pb.CreateConnectionRequest:
    base = {"driver": "postgresql", "host": "127.0.0.1", "port": port, "database": "app", "username": "app"}
    return pb.CreateConnectionRequest(
        name=name, type="database", config=struct({**base, **config}), secrets={"password": TOKEN}
    )


def smtp_request(name: str, port: int, **config: Any) -> pb.CreateConnectionRequest:
    base = {"host": "127.0.0.1", "port": port, "encryption": "tls", "username": USER}
    return pb.CreateConnectionRequest(
        name=name, type="smtp", config=struct({**base, **config}), secrets={"password": TOKEN}
    )


# (what an attacker changes, the connection as created, the field, the value they write)
TAMPERED: list[tuple[str, Callable[[int], pb.CreateConnectionRequest], str, Any]] = [
    ("database ssl off", lambda port: database_request("db-ssl", port, ssl=True), "ssl", False),
    ("database own CA", lambda port: database_request("db-ca", port, ssl=True), "ssl_ca", ATTACKER_CA),
    (
        "database options",
        lambda port: database_request("db-options", port, ssl=True, options={"application_name": "orders"}),
        "options",
        {"application_name": "orders", "search_path": "evil"},
    ),
    ("smtp encryption none", lambda port: smtp_request("mail-plain", port), "encryption", "none"),
    ("smtp own CA", lambda port: smtp_request("mail-ca", port), "ssl_ca", ATTACKER_CA),
]


async def tamper_postgres(dsn: str, connection_id: str, field: str, value: Any) -> None:
    db = await asyncpg.connect(dsn)
    try:
        await db.execute(
            "UPDATE connections SET config = jsonb_set(config::jsonb, $1, $2::jsonb)::text WHERE id = $3",
            [field],
            json.dumps(value),
            connection_id,
        )
    finally:
        await db.close()


# ------------------------------------------------------------------- tampering fails closed


@contextlib.asynccontextmanager
async def engine_settings(engine: str) -> AsyncIterator[dict[str, Any]]:
    if engine == "sqlite":
        yield {}
        return
    async with fresh_database() as dsn:
        yield {"storage_path": None, "storage_url": dsn, "storage_pool_max": 4}


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
@pytest.mark.parametrize(
    ("make", "field", "value"), [case[1:] for case in TAMPERED], ids=[c[0] for c in TAMPERED]
)
async def test_a_row_whose_transport_was_changed_in_the_database_fails_closed_and_sends_nothing(
    engine: str,
    make: Callable[[int], pb.CreateConnectionRequest],
    field: str,
    value: Any,
    start: Callable[..., Any],
    attacker: RecordingListener,
) -> None:
    async with engine_settings(engine) as settings:
        running: Running = await start(**settings)
        created = await create_and_grant(running, make(attacker.port))
        resolved = await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
        assert resolved.secrets["password"] == TOKEN
        path = running.broker.settings.storage_path
        await stop(running)

        if engine == "sqlite":
            set_stored_config(path, created.id, field, value)
        else:
            await tamper_postgres(settings["storage_url"], created.id, field, value)

        running = await start(**settings)
        try:
            admin, resolver = running.admin(), running.resolver()
            stored = await admin.GetConnection(pb.GetConnectionRequest(id=created.id))
            assert json_format.MessageToDict(stored.config)[field] == value  # the tampering took
            await expect_decrypt_failed(resolver.Resolve(pb.ResolveRequest(connection_id=created.id)))
            await expect_decrypt_failed(admin.TestConnection(pb.TestConnectionRequest(id=created.id)))
            assert await failed_events(running, created.id) == {
                ("connection.resolve", "decrypt_failed"),
                ("connection.test", "decrypt_failed"),
            }
            assert TOKEN not in running.logs.getvalue()
        finally:
            await stop(running)
    assert attacker.accepted == []


# ------------------------------------------------------------- format 2 is re-sealed at start


def digest_v1(type_name: str, config: dict[str, Any]) -> bytes:
    """Format 2's destination digest, computed as the broker did before transport was bound
    (catalog/_destination.py, digest version 1): where only."""
    fields = {"database": ("driver", "host", "port"), "smtp": ("host", "port")}[type_name]
    doc = {"config": {f: config.get(f) for f in fields}, "provider": "", "type": type_name}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(b"broker.destination.v1\n" + canonical.encode()).digest()


def sealed_columns(path: Path) -> dict[str, tuple[bytes, int, int]]:
    db = sqlite3.connect(path)
    rows = db.execute("SELECT id, ciphertext, secret_version, version FROM connections").fetchall()
    db.close()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


async def rebind_events(running: Running) -> list[tuple[str, str, str, str]]:
    reply = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="connection.rebind"))
    return sorted(
        (e.connection_id, e.actor, e.details["from_format"], e.details["format"]) for e in reply.events
    )


async def test_rows_of_format_2_are_re_sealed_at_start_audited_once_then_bound_to_their_transport(
    start: Callable[..., Any], attacker: RecordingListener
) -> None:
    running: Running = await start()
    db = await create_and_grant(
        running, database_request("orders", attacker.port, ssl=True, ssl_ca=ATTACKER_CA)
    )
    mail = await create_and_grant(running, smtp_request("mail", attacker.port))
    path = running.broker.settings.storage_path
    raw_kek = base64.b64decode(running.broker.settings.master_key_file.read_text())
    await stop(running)

    # Turn both rows into ones the previous broker wrote: format 2, digest of where only.
    sqlite_db = sqlite3.connect(path)
    with sqlite_db:
        for connection in (db, mail):
            (type_name, config) = sqlite_db.execute(
                "SELECT type, config FROM connections WHERE id = ?", (connection.id,)
            ).fetchone()
            binding = Binding("default", connection.id, 1, digest_v1(type_name, json.loads(config)))
            old = seal_as_format(raw_kek, b'{"password":"' + TOKEN.encode() + b'"}', binding, 2)
            sqlite_db.execute(
                "UPDATE connections SET ciphertext = ?, wrapped_dek = ?, kek_id = ? WHERE id = ?",
                (*old, connection.id),
            )
    sqlite_db.close()
    before = sealed_columns(path)

    running = await start()
    try:
        after = sealed_columns(path)
        for connection in (db, mail):
            ciphertext, secret_version, version = after[connection.id]
            # Re-sealed in the current format, same secret version, the etag moved for caches and replicas.
            assert ciphertext[0] == FORMAT_VERSION and secret_version == 1
            assert version == before[connection.id][2] + 1
            resolved = await running.resolver().Resolve(pb.ResolveRequest(connection_id=connection.id))
            assert resolved.secrets["password"] == TOKEN
        rebound = sorted((c.id, "broker:rebind", "2", str(FORMAT_VERSION)) for c in (db, mail))
        assert await rebind_events(running) == rebound
    finally:
        await stop(running)

    # A second start finds nothing to do: no event, no byte changed.
    running = await start()
    try:
        assert sealed_columns(path) == after
        assert len(await rebind_events(running)) == 2
    finally:
        await stop(running)

    # From now on how the secret travels is bound: turning TLS off fails closed.
    set_stored_config(path, db.id, "ssl", False)
    set_stored_config(path, mail.id, "encryption", "none")
    running = await start()
    try:
        for connection in (db, mail):
            await expect_decrypt_failed(
                running.resolver().Resolve(pb.ResolveRequest(connection_id=connection.id))
            )
            await expect_decrypt_failed(
                running.admin().TestConnection(pb.TestConnectionRequest(id=connection.id))
            )
    finally:
        await stop(running)
    assert attacker.accepted == []


async def test_replicas_starting_together_re_seal_each_format_2_row_once(tmp_path: Path) -> None:
    """Two brokers' start-up passes race on one PostgreSQL database: compare-and-swap lets one
    re-seal each row, the other skips it, and every row opens in the current format."""
    keyring = Keyring(Kek(bytes(range(32))))
    raw_kek = bytes(range(32))
    config = {"driver": "postgresql", "host": "db.internal", "port": 5432, "database": "app", "ssl": True}
    async with fresh_database() as dsn, replicas(dsn, 2) as (a, b):
        rows: list[ConnectionRecord] = []
        for n in range(20):
            record = make_connection("acme", f"db-{n}", type="database", provider="", config=config)
            binding = Binding("acme", record.id, 1, digest_v1("database", config))
            ciphertext, wrapped, kek_id = seal_as_format(raw_kek, b'{"password":"pw"}', binding, 2)
            record = replace(record, sealed=crypto.Sealed(ciphertext, wrapped, kek_id))
            await a.create_connection(record, make_event("acme", connection_id=record.id))
            rows.append(record)

        def clock() -> datetime:
            return datetime.now(UTC)

        reports = await asyncio.gather(*(rebind_legacy(s, s, keyring, clock, batch=7) for s in (a, b)))
        assert sum(r.rebound for r in reports) == len(rows)
        assert all(r.failed == [] for r in reports)
        for record in rows:
            stored = await b.get_connection("acme", record.id)
            assert stored is not None and stored.sealed is not None
            assert stored.sealed.format_version == FORMAT_VERSION and stored.version == record.version + 1
            assert open_secrets(keyring, stored).reveal() == {"password": "pw"}
        events = await audit_actions(b, "connection.rebind")
        assert sorted(events) == sorted(r.id for r in rows)  # one event per row, not two
        # And again: nothing left to do.
        again = await rebind_legacy(a, a, keyring, clock)
        assert (again.rebound, again.skipped, again.failed) == (0, 0, [])


async def audit_actions(store: Store, action: str) -> list[str]:
    events = await store.list_audit("acme", AuditFilter(action=action), 10_000, None)
    return [e.connection_id for e in events]


# ------------------------------------------------------------- admin updates re-seal


@pytest.fixture
def mail_ca(tmp_path: Path) -> Iterator[tuple[str, ssl.SSLContext]]:
    """The mail server's CA (PEM) and its server context, with a certificate for 127.0.0.1."""
    ca, ca_key = pki.create_ca("mail CA")
    cert, key = pki.issue_server_cert(ca, ca_key, ["127.0.0.1"])
    (tmp_path / "mail.crt").write_bytes(cert)
    (tmp_path / "mail.key").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "mail.crt", tmp_path / "mail.key")
    yield ca.decode(), context


@contextlib.asynccontextmanager
async def mail_server(starttls: ssl.SSLContext) -> AsyncIterator[int]:
    """aiosmtpd offering STARTTLS, and AUTH in clear to a connection not encrypted; accepts USER/TOKEN."""
    loop = asyncio.get_running_loop()

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        return AuthResult(
            success=(data.login.decode(), data.password.decode()) == (USER, TOKEN), handled=False
        )

    def factory() -> SMTP:
        return SMTP(
            None,
            hostname="mail.test",
            tls_context=starttls,
            authenticator=authenticate,
            auth_require_tls=False,
            loop=loop,
        )

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def resolve_and_test(running: Running, connection_id: str) -> tuple[int, pb.TestResult]:
    resolved = await running.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id))
    assert resolved.secrets["password"] == TOKEN
    tested = await running.admin().TestConnection(pb.TestConnectionRequest(id=connection_id))
    return resolved.secret_version, tested


async def test_updating_smtp_encryption_and_ca_re_seals_and_the_connection_still_resolves_and_tests(
    start: Callable[..., Any], mail_ca: tuple[str, ssl.SSLContext]
) -> None:
    ca_pem, context = mail_ca
    running: Running = await start()
    admin = running.admin()
    async with mail_server(context) as port:
        mail = await create_and_grant(running, smtp_request("mail", port, encryption="none"))
        version, tested = await resolve_and_test(running, mail.id)
        assert (version, tested.success) == (1, True), tested

        # The server now offers STARTTLS: encryption on, trusting another CA first (a mistake) ...
        await admin.UpdateConnection(
            pb.UpdateConnectionRequest(
                id=mail.id, config=struct({"encryption": "tls", "ssl_ca": ATTACKER_CA})
            )
        )
        version, tested = await resolve_and_test(running, mail.id)
        assert version == 2 and tested.category == pb.TEST_CATEGORY_TLS_ERROR, tested

        # ... then its own CA: each change re-sealed, no secret given again.
        await admin.UpdateConnection(
            pb.UpdateConnectionRequest(id=mail.id, config=struct({"ssl_ca": ca_pem}))
        )
        version, tested = await resolve_and_test(running, mail.id)
        assert version == 3 and tested.success, tested
        assert any("STARTTLS" in v for v in tested.verified), tested

    reply = await admin.ListAuditEvents(
        pb.ListAuditEventsRequest(connection_id=mail.id, action="connection.update")
    )
    assert [e.details["changed"] for e in reply.events] == ["config", "config"]
    await stop(running)


async def test_updating_database_options_and_ssl_re_seals_and_the_connection_still_resolves_and_tests(
    start: Callable[..., Any],
) -> None:
    dsn = urlsplit(base_dsn())
    server = {
        "driver": "postgresql",
        "host": dsn.hostname,
        "port": dsn.port or 5432,
        "database": dsn.path.lstrip("/") or "postgres",
        "username": dsn.username or "postgres",
        "ssl": False,
        "options": {"application_name": "orders"},
    }
    running: Running = await start()
    admin = running.admin()
    db = await create_and_grant(
        running,
        pb.CreateConnectionRequest(
            name="pg", type="database", config=struct(server), secrets={"password": TOKEN}
        ),
    )
    version, tested = await resolve_and_test(running, db.id)
    assert (version, tested.success) == (1, True), tested

    await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=db.id, config=struct({"options": {"application_name": "billing"}}))
    )
    version, tested = await resolve_and_test(running, db.id)
    assert (version, tested.success) == (2, True), tested

    # Asking for TLS from a server that offers none (the test server's ssl is off) re-seals too,
    # and the test refuses to go on without it.
    await admin.UpdateConnection(pb.UpdateConnectionRequest(id=db.id, config=struct({"ssl": True})))
    version, tested = await resolve_and_test(running, db.id)
    assert version == 3 and not tested.success, tested
    await stop(running)


# ------------------------------------------------ what a dynamic connection does is bound too


# (field, value an attacker writes): each makes the stored administrator do their bidding.
USE_TAMPERED: list[tuple[str, Any]] = [
    ("dynamic", False),  # the administrator's password would be released to executors
    ("creation_statements", ["CREATE ROLE {{name}} SUPERUSER LOGIN PASSWORD {{password}}"]),
    ("revocation_statements", ["SELECT 1"]),  # users would never be dropped
    ("group_role", "pg_write_all_data"),
    ("max_ttl", 31_536_000),
]


@pytest.mark.parametrize(("field", "value"), USE_TAMPERED, ids=[f for f, _ in USE_TAMPERED])
async def test_a_dynamic_connection_whose_use_was_changed_in_the_database_fails_closed(
    field: str, value: Any, start: Callable[..., Any], attacker: RecordingListener
) -> None:
    running: Running = await start()
    request = database_request("admin-db", attacker.port, dynamic=True, group_role="app_readers")
    created = await create_and_grant(running, request)
    path = running.broker.settings.storage_path
    await stop(running)

    set_stored_config(path, created.id, field, value)
    running = await start()
    try:
        await expect_decrypt_failed(running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id)))
        assert await failed_events(running, created.id) == {("connection.resolve", "decrypt_failed")}
        assert TOKEN not in running.logs.getvalue()
    finally:
        await stop(running)
    assert attacker.accepted == []  # no lease was attempted with the administrator's credentials


async def test_changing_what_a_dynamic_connection_does_needs_its_secrets_again(
    start: Callable[..., Any], attacker: RecordingListener
) -> None:
    """An admin who may edit but not read the administrator's password cannot have it run their SQL."""
    running: Running = await start()
    try:
        admin = running.admin()
        request = database_request("admin-db", attacker.port, dynamic=True, group_role="app_readers")
        created = await create_and_grant(running, request)
        statements = ["CREATE ROLE {{name}} LOGIN PASSWORD {{password}} IN ROLE {{group}}"]
        change = pb.UpdateConnectionRequest(id=created.id, config=struct({"creation_statements": statements}))
        refused = await rpc_error(admin.UpdateConnection(change))
        assert field_violations(refused) == {
            "secrets.password": "must be given again: changing config.creation_statements changes what the"
            " broker does with the secrets"
        }
        change.secrets["password"] = TOKEN
        updated = await admin.UpdateConnection(change)
        assert list(updated.config["creation_statements"]) == statements
        _, secret_version, _ = sealed_columns(running.broker.settings.storage_path)[created.id]
        assert secret_version == 2  # re-sealed for what it now does
        # The lifetime is bound but, like every use field, asks for the secrets too.
        ttl = pb.UpdateConnectionRequest(id=created.id, config=struct({"default_ttl": 60}))
        assert "secrets.password" in field_violations(await rpc_error(admin.UpdateConnection(ttl)))
    finally:
        await stop(running)
    assert attacker.accepted == []
