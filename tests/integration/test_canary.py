"""Invariants 1, 2 and 5: a canary secret is found nowhere but in the Resolve response.

Every RPC is driven, good and bad, with the canary as a secret value (and as a
value in places it does not belong); then the database files, every admin
response, the logs and the audit table are searched for it in plain, base64,
URL-encoded and hex forms.
"""

from __future__ import annotations

import base64
import sqlite3
import urllib.parse
from pathlib import Path

from google.protobuf.message import Message

from broker._proto import broker_pb2 as pb
from tests.conftest import Running
from tests.helpers import EXECUTOR, db_request, rpc_error, struct

CANARY = "CANARY-7f3a9c-s3cr3t+/="


def forms(value: str) -> list[bytes]:
    raw = value.encode()
    return [
        raw,
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw),
        urllib.parse.quote(value, safe="").encode(),
        urllib.parse.quote_plus(value).encode(),
        raw.hex().encode(),
        value[:12].encode(),  # a distinctive prefix, in case something truncates
    ]


def assert_absent(haystack: bytes, where: str) -> None:
    for form in forms(CANARY):
        assert form not in haystack, f"canary ({form!r}) found in {where}"


async def test_canary_appears_only_in_the_resolve_response(running: Running) -> None:
    admin = running.admin()
    responses: list[Message] = []

    async def ok(call: object) -> None:
        responses.append(await call)  # type: ignore[misc]

    async def bad(call: object) -> None:
        error = await rpc_error(call)  # type: ignore[arg-type]
        responses.append(
            pb.AuditEvent(reason=str(error.details()), details={"trailers": str(error.trailing_metadata())})
        )

    await ok(admin.ListConnectionTypes(pb.ListConnectionTypesRequest()))
    created = await admin.CreateConnection(db_request(name="canary-db", password=CANARY))
    responses.append(created)
    api = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="canary-api",
            type="http",
            config=struct({"base_url": "https://api.example.com", "auth_type": "bearer"}),
            secrets={"token": CANARY},
        )
    )
    responses.append(api)
    # Bad inputs that carry the canary where it must not go.
    await bad(
        admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="x", type="database", config=struct({"driver": "postgresql", "password": CANARY})
            )
        )
    )
    await bad(
        admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="x", type="http", config=struct({"base_url": f"https://u:{CANARY}@h.example"})
            )
        )
    )
    await bad(
        admin.CreateConnection(
            pb.CreateConnectionRequest(name="x", type="http", config=struct({"base_url": CANARY}))
        )
    )
    await bad(
        admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="x", type="database", config=struct({"driver": CANARY}), secrets={CANARY: CANARY}
            )
        )
    )
    await bad(
        admin.CreateConnection(
            pb.CreateConnectionRequest(name="x", type=CANARY, secrets={"password": CANARY})
        )
    )
    await bad(admin.CreateConnection(db_request(name="canary-db", password=CANARY)))  # duplicate name
    await bad(
        admin.UpdateConnection(pb.UpdateConnectionRequest(id=created.id, config=struct({"port": CANARY})))
    )
    await bad(admin.UpdateConnection(pb.UpdateConnectionRequest(id=created.id, secrets={"nope": CANARY})))
    await bad(admin.GetConnection(pb.GetConnectionRequest(id="conn_missing")))
    await bad(admin.ListConnections(pb.ListConnectionsRequest(page_token=CANARY)))
    await bad(admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=CANARY)))

    updated = await admin.UpdateConnection(
        pb.UpdateConnectionRequest(
            id=created.id, secrets={"password": CANARY}, labels=pb.Labels(values={"team": "data"})
        )
    )
    responses.append(updated)
    await ok(admin.GetConnection(pb.GetConnectionRequest(id=created.id)))
    await ok(admin.ListConnections(pb.ListConnectionsRequest()))
    await ok(admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR)))
    await ok(admin.ListGrants(pb.ListGrantsRequest()))

    # Tests and discovery with the canary as a credential: stored, draft, blocked, unresolvable.
    await ok(admin.TestConnection(pb.TestConnectionRequest(id=created.id)))
    await ok(admin.TestConnection(pb.TestConnectionRequest(id=api.id)))
    for config in (
        {"base_url": "http://169.254.169.254/", "auth_type": "bearer"},
        {"base_url": f"https://{CANARY[:8].lower()}.invalid/", "auth_type": "bearer"},
    ):
        draft = pb.ConnectionDraft(type="http", config=struct(config), secrets={"token": CANARY})
        await ok(admin.TestConnection(pb.TestConnectionRequest(draft=draft)))
    metadata = {"server_url": "http://[::ffff:169.254.169.254]/mcp", "auth_type": "bearer"}
    mcp_draft = pb.ConnectionDraft(type="mcp", config=struct(metadata), secrets={"token": CANARY})
    await ok(admin.DiscoverMcpTools(pb.DiscoverMcpToolsRequest(draft=mcp_draft)))
    blocked = {"base_url": "http://169.254.169.254/", "auth_type": "bearer"}
    await bad(
        admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="tested",
                type="http",
                config=struct(blocked),
                secrets={"token": CANARY},
                test_before_save=True,
            )
        )
    )
    await ok(admin.GetConnection(pb.GetConnectionRequest(id=created.id)))

    resolved = await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id, purpose="canary"))
    assert resolved.secrets["password"] == CANARY  # the one place it may appear
    await bad(running.resolver().Resolve(pb.ResolveRequest(connection_id=api.id)))  # no grant
    await bad(running.resolver("executor2").Resolve(pb.ResolveRequest(name="canary-db")))

    await ok(admin.RevokeConnection(pb.RevokeConnectionRequest(id=api.id)))
    await ok(admin.DeleteConnection(pb.DeleteConnectionRequest(id=api.id)))
    await ok(admin.RestoreConnection(pb.RestoreConnectionRequest(id=api.id)))
    await ok(admin.DeleteConnection(pb.DeleteConnectionRequest(id=api.id)))
    await ok(admin.PurgeConnection(pb.PurgeConnectionRequest(id=api.id)))
    await ok(admin.RevokeAccess(pb.RevokeAccessRequest(connection_id=created.id, principal=EXECUTOR)))
    audit = await admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))
    responses.append(audit)
    await running.broker.resolver.flush_last_used()

    for response in responses:
        assert_absent(
            response.SerializeToString() + str(response).encode(), f"admin response {type(response).__name__}"
        )
    assert len(audit.events) >= 10
    logs = running.logs.getvalue()
    assert '"request_id"' in logs
    assert logs.count('"event": "rpc"') >= 20
    assert_absent(logs.encode(), "logs")

    db_path = Path(running.broker.settings.storage_path)
    db = sqlite3.connect(db_path)
    rows = db.execute("SELECT * FROM audit_events").fetchall()
    db.close()
    assert len(rows) == len(audit.events)
    assert_absent(repr(rows).encode(), "audit table")
    # The database before and after a checkpoint: main file and WAL.
    for path in db_path.parent.glob(db_path.name + "*"):
        assert_absent(path.read_bytes(), path.name)
    await running.broker.stop(grace=0)
    for path in db_path.parent.glob(db_path.name + "*"):
        assert_absent(path.read_bytes(), f"{path.name} after shutdown")
