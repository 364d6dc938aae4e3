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

import grpc
import prometheus_client
from google.protobuf.message import Message

from broker import metrics
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
    # OAuth, security and audit RPCs, with the canary where a secret or a state would go.
    oauth_draft = pb.ConnectionDraft(
        name="oauth-canary", type="oauth2", provider="custom", secrets={"client_secret": CANARY},
        config=struct({"client_id": "c1", "authorize_url": "https://idp.example/a", "token_url": "https://idp.example/t"}),
    )  # fmt: skip
    begun = await admin.BeginAuthorization(
        pb.BeginAuthorizationRequest(draft=oauth_draft, redirect_uri="http://127.0.0.1:8976/cb")
    )
    responses.append(begun)
    await bad(admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=CANARY, code=CANARY)))
    await bad(admin.CompleteAuthorization(pb.CompleteAuthorizationRequest(state=begun.state, code=CANARY)))
    await bad(admin.ReinstateConnection(pb.ReinstateConnectionRequest(id=CANARY)))
    await ok(admin.ReinstateConnection(pb.ReinstateConnectionRequest(id=created.id, reason="routine")))
    await ok(admin.ListSecurityEvents(pb.ListSecurityEventsRequest()))
    await ok(admin.VerifyAuditLog(pb.VerifyAuditLogRequest()))
    async for exported in admin.ExportAuditEvents(pb.ExportAuditEventsRequest()):
        responses.append(exported)
    audit = await admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))
    responses.append(audit)
    assert_absent(prometheus_client.generate_latest(metrics.REGISTRY), "metrics")
    await running.broker.services.resolver.flush_last_used()

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


async def test_malformed_oversized_and_wrongly_typed_input_leaks_nothing(running: Running) -> None:
    """Refused input never comes back: not in the error, the logs, the audit trail or the metrics."""
    admin = running.admin()
    huge = CANARY * 5000  # ~120 KB
    c, pg = struct, {"driver": "postgresql"}
    refused = [
        pb.CreateConnectionRequest(
            name=huge, type="database", config=c({"driver": "sqlite", "database": "/x"})
        ),
        pb.CreateConnectionRequest(
            name="big", type="custom", config=c({"blob": huge}), secrets={"k": "v1234"}
        ),
        pb.CreateConnectionRequest(name="many", type="custom", secrets={f"s{i}": CANARY for i in range(100)}),
        pb.CreateConnectionRequest(name="long", type="custom", secrets={"k": huge * 2}),
        pb.CreateConnectionRequest(
            name="typed", type="database", config=c({**pg, "port": [CANARY], "ssl": CANARY})
        ),
        pb.CreateConnectionRequest(name="label", type="custom", secrets={"k": "v1234"}, labels={CANARY: "x"}),
        pb.CreateConnectionRequest(name="label2", type="custom", secrets={"k": "v1234"}, labels={"k": huge}),
        pb.CreateConnectionRequest(name="url", type="http", config=c({"base_url": f"https://{CANARY}@x/"})),
        pb.CreateConnectionRequest(
            name="hdr",
            type="http",
            config=c({"base_url": "https://x.example", "headers": {"Authorization": CANARY}}),
        ),
    ]
    texts: list[str] = []
    for request in refused:
        try:
            await admin.CreateConnection(request)
        except grpc.aio.AioRpcError as exc:
            error = exc
        else:
            raise AssertionError(f"accepted: {request.name[:20]}")
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request.name[:20]
        texts.append(str(error.details()) + str(error.trailing_metadata()))
    assert (await admin.ListConnections(pb.ListConnectionsRequest())).connections == []
    bad_time = pb.GrantAccessRequest(
        connection_id="conn_x", principal="spiffe://broker.local/tenant/default/executor/demo"
    )
    bad_time.expires_at.seconds, bad_time.expires_at.nanos = 2**40, 5
    texts.append(str((await rpc_error(admin.GrantAccess(bad_time))).details()))
    purpose = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(name="x", purpose=huge)))
    texts.append(str(purpose.details()))
    audit = await admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))
    for text in (*texts, running.logs.getvalue(), str(audit)):
        assert_absent(text.encode(), "a refusal")
