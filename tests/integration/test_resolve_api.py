"""ResolveService: grants, uniform denials, durable audit before release, concurrency."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.cli import broker as broker_cli
from broker.cli._json import json_line
from broker.service.resolve import DENIED_MESSAGE
from tests.conftest import Running
from tests.helpers import EXECUTOR, EXECUTOR2, ShiftedClock, db_request, field_violations, rpc_error


async def resolve_events(running: Running) -> list[pb.AuditEvent]:
    page = await running.admin().ListAuditEvents(
        pb.ListAuditEventsRequest(action="connection.resolve", page_size=1000)
    )
    return list(page.events)


async def test_resolve_by_id_and_by_name(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request(name="warehouse", password="pw-1"))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    by_id = await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
    by_name = await running.resolver().Resolve(pb.ResolveRequest(name="warehouse"))
    for response in (by_id, by_name):
        assert response.connection_id == created.id and response.name == "warehouse"
        assert response.type == "database" and response.config["host"] == "db.internal"
        assert dict(response.secrets) == {"password": "pw-1"}
        assert response.cache_ttl_seconds == 60 and not response.HasField("expires_at")


async def test_every_denial_looks_the_same_and_audit_keeps_the_reason(running: Running) -> None:
    admin = running.admin()
    granted = await admin.CreateConnection(db_request(name="granted"))
    ungranted = await admin.CreateConnection(db_request(name="ungranted"))
    revoked = await admin.CreateConnection(db_request(name="revoked"))
    deleted = await admin.CreateConnection(db_request(name="deleted"))
    for c in (granted, revoked, deleted):
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=c.id, principal=EXECUTOR))
    await admin.RevokeConnection(pb.RevokeConnectionRequest(id=revoked.id))
    await admin.DeleteConnection(pb.DeleteConnectionRequest(id=deleted.id))
    other_tenant = await running.admin("admin_b").CreateConnection(db_request(name="theirs"))

    cases = {
        ungranted.id: "no_grant",
        revoked.id: "connection_revoked",
        deleted.id: "connection_deleted",
        "conn_does_not_exist": "unknown_connection",
        other_tenant.id: "unknown_connection",
    }
    for connection_id in cases:
        error = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(connection_id=connection_id)))
        assert (error.code(), error.details()) == (grpc.StatusCode.PERMISSION_DENIED, DENIED_MESSAGE)
    by_name = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(name="theirs")))
    assert (by_name.code(), by_name.details()) == (grpc.StatusCode.PERMISSION_DENIED, DENIED_MESSAGE)
    # Another executor of the same tenant holds no grant.
    other = await rpc_error(
        running.resolver("executor2").Resolve(pb.ResolveRequest(connection_id=granted.id))
    )
    assert other.details() == DENIED_MESSAGE

    events = await resolve_events(running)
    reasons = {e.connection_id: e.reason for e in events if e.actor == EXECUTOR and e.outcome == "denied"}
    assert {cid: reasons[cid] for cid in cases} == cases
    assert any(e.actor == EXECUTOR2 and e.reason == "no_grant" for e in events)
    assert any(e.details.get("name") == "theirs" and e.reason == "unknown_connection" for e in events)


async def test_grant_expiry_and_revocation_take_effect_immediately(
    make_broker: Callable[..., object],
) -> None:
    clock = ShiftedClock()
    running: Running = await make_broker(clock=clock)  # type: ignore[misc]
    admin = running.admin()
    created = await admin.CreateConnection(db_request())
    request = pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR)
    request.expires_at.FromDatetime(clock() + timedelta(hours=1))
    await admin.GrantAccess(request)
    clock.advance(3590)
    ending = await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
    # An executor may keep the secret for `cache_ttl_seconds` (the SDK does): no longer than its grant.
    assert ending.secrets and 9 <= ending.cache_ttl_seconds <= 10
    clock.advance(10)
    expired = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id)))
    assert expired.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await resolve_events(running))[0].reason == "grant_expired"

    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    assert (await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))).secrets
    await admin.RevokeAccess(pb.RevokeAccessRequest(connection_id=created.id, principal=EXECUTOR))
    revoked = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id)))
    assert revoked.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_rename_moves_resolve_by_name(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request(name="old-name"))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    await running.resolver().Resolve(pb.ResolveRequest(name="old-name"))  # now cached
    await admin.UpdateConnection(pb.UpdateConnectionRequest(id=created.id, name="new-name"))
    assert (await running.resolver().Resolve(pb.ResolveRequest(name="new-name"))).connection_id == created.id
    gone = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(name="old-name")))
    assert gone.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_bad_resolve_requests_are_invalid_argument(running: Running) -> None:
    neither = await rpc_error(running.resolver().Resolve(pb.ResolveRequest()))
    assert neither.code() == grpc.StatusCode.INVALID_ARGUMENT and "ref" in field_violations(neither)
    long_purpose = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(name="x", purpose="p" * 300)))
    assert "purpose" in field_violations(long_purpose)


async def test_200_concurrent_resolves_all_succeed_and_are_all_audited(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request(password="concurrent"))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    calls = running.broker.store.append_audit
    batches: list[int] = []

    async def counting(events):  # type: ignore[no-untyped-def]
        batches.append(len(events))
        await calls(events)

    running.broker.store.append_audit = counting  # type: ignore[method-assign]
    stub = running.resolver()
    responses = await asyncio.gather(
        *(stub.Resolve(pb.ResolveRequest(connection_id=created.id, purpose=f"call {i}")) for i in range(200))
    )
    assert all(r.secrets["password"] == "concurrent" for r in responses)
    events = await resolve_events(running)
    assert len(events) == 200 and all(e.outcome == "allowed" for e in events)
    assert {e.details["purpose"] for e in events} == {f"call {i}" for i in range(200)}
    assert sum(batches) == 200
    assert len(batches) < 200  # group commit: transactions were shared


async def test_no_release_when_the_audit_cannot_be_written(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request(password="must-not-leak"))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))

    async def broken(events):  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("disk I/O error")

    real = running.broker.store.append_audit
    running.broker.store.append_audit = broken  # type: ignore[method-assign]
    error = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "must-not-leak" not in str(error.details()) + str(error.trailing_metadata())
    running.broker.store.append_audit = real  # type: ignore[method-assign]
    assert (await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))).secrets


@pytest.mark.parametrize("column", ["ciphertext", "wrapped_dek"])
async def test_tampered_or_swapped_ciphertext_is_never_released(running: Running, column: str) -> None:
    admin = running.admin()
    a = await admin.CreateConnection(db_request(name="a", password="secret-a"))
    b = await admin.CreateConnection(db_request(name="b", password="secret-b"))
    c = await admin.CreateConnection(db_request(name="c", password="secret-c"))
    for conn in (a, b, c):
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=conn.id, principal=EXECUTOR))
    db = sqlite3.connect(running.broker.settings.storage_path)
    with db:
        # Row a gets row b's blob (same tenant, same secret version): the AAD binding must catch it.
        db.execute(
            f"UPDATE connections SET {column} = (SELECT {column} FROM connections WHERE id = ?) WHERE id = ?",
            (b.id, a.id),
        )
        # Row c gets one flipped bit.
        (blob,) = db.execute(f"SELECT {column} FROM connections WHERE id = ?", (c.id,)).fetchone()
        flipped = bytes([*blob[:-1], blob[-1] ^ 1])
        db.execute(f"UPDATE connections SET {column} = ? WHERE id = ?", (flipped, c.id))
    db.close()
    running.broker.services.resolver._cache.clear()  # the broker would otherwise serve its cached (good) rows
    for conn in (a, c):
        error = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(connection_id=conn.id)))
        assert error.code() == grpc.StatusCode.DATA_LOSS
        assert "secret-" not in str(error.details())
    assert (await running.resolver().Resolve(pb.ResolveRequest(connection_id=b.id))).secrets[
        "password"
    ] == "secret-b"
    failed = [e for e in await resolve_events(running) if e.outcome == "failed"]
    assert {e.connection_id for e in failed} == {a.id, c.id} and {e.reason for e in failed} == {
        "decrypt_failed"
    }


async def test_control_characters_are_invalid_argument_not_a_driver_error(running: Running) -> None:
    for request in (
        pb.ResolveRequest(name="bad\x00name"),
        pb.ResolveRequest(connection_id="conn_\x00"),
        pb.ResolveRequest(name="ok", purpose="line\nbreak"),
    ):
        error = await rpc_error(running.resolver().Resolve(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    label = await rpc_error(running.admin().CreateConnection(db_request(name="nul", env="a\x00b")))
    assert "labels.env" in field_violations(label)


# ------------------------------------------------- who received a value?


async def test_the_audit_finds_every_executor_that_received_a_leaked_value(
    running: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request(name="leaky", password="leaked-pw-1"))
    for principal in (EXECUTOR, EXECUTOR2):
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=principal))
    await running.resolver("executor").Resolve(pb.ResolveRequest(connection_id=created.id))
    await running.resolver("executor2").Resolve(pb.ResolveRequest(connection_id=created.id))
    await admin.UpdateConnection(pb.UpdateConnectionRequest(id=created.id, secrets={"password": "new-pw-2"}))
    await running.resolver("executor2").Resolve(pb.ResolveRequest(connection_id=created.id))

    released = [e for e in await resolve_events(running) if e.outcome == "allowed"]
    assert len(released) == 3
    assert all(set(e.details) == {"fp.password"} for e in released)
    assert all(e.details["fp.password"].startswith("fp1:") for e in released)
    assert "leaked-pw-1" not in str(released) and "new-pw-2" not in str(released)

    export = tmp_path / "audit.jsonl"
    request = pb.ExportAuditEventsRequest()
    request.start_time.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    lines = [json_line(e) async for e in admin.ExportAuditEvents(request)]
    export.write_text("\n".join(lines) + "\n")

    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("leaked-pw-1\n"))
    command = ["audit", "fingerprint", "--data-dir", str(tmp_path), "--search", str(export)]
    assert broker_cli.main(command) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(e["actor"] for e in found) == sorted([EXECUTOR, EXECUTOR2])

    monkeypatch.setattr("sys.stdin", io.StringIO("never-released"))
    assert broker_cli.main(command) == 1
    assert capsys.readouterr().out == ""


async def test_superseded_at_is_reported_only_within_its_grace(make_broker: Callable[..., object]) -> None:
    now = [datetime.now(UTC)]
    running: Running = await make_broker(  # type: ignore[misc]
        clock=lambda: now[0], superseded_grace_seconds=60.0
    )
    try:
        admin = running.admin()
        created = await admin.CreateConnection(db_request(name="graceful", password="v1"))
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
        await admin.UpdateConnection(pb.UpdateConnectionRequest(id=created.id, secrets={"password": "v2"}))
        request = pb.ResolveRequest(connection_id=created.id, known_secret_version=1)

        now[0] += timedelta(seconds=59)
        assert (await running.resolver().Resolve(request)).HasField("superseded_at")
        # Past the grace, whether or not the periodic purge has run yet.
        now[0] += timedelta(seconds=2)
        late = await running.resolver().Resolve(request)
        assert late.secret_version == 2 and not late.HasField("superseded_at")
    finally:
        await running.close()
        await running.broker.stop(grace=0)
