"""AdminService over real mTLS: the connection lifecycle, validation and paging."""

from __future__ import annotations

import grpc

from broker._proto import broker_pb2 as pb
from tests.conftest import Running
from tests.helpers import EXECUTOR, db_request, field_violations, rpc_error, struct


async def audit_count(running: Running) -> int:
    events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))
    return len(events.events)


async def test_list_connection_types_describes_secret_fields(running: Running) -> None:
    types = {
        t.name: t for t in (await running.admin().ListConnectionTypes(pb.ListConnectionTypesRequest())).types
    }
    assert {
        "database",
        "http",
        "smtp",
        "webhook",
        "api_key",
        "oauth2",
        "mcp",
        "ssh",
        "aws",
        "gcp",
        "azure",
        "custom",
    } <= set(types)
    fields = {f.name: f for f in types["database"].fields}
    assert fields["password"].secret and not fields["host"].secret
    assert fields["port"].kind == pb.FIELD_KIND_INTEGER
    withheld = {f.name for f in types["oauth2"].fields if f.withheld}
    assert withheld == {"client_secret", "refresh_token"} and not fields["password"].withheld


async def test_create_returns_redacted_summary_with_defaults(running: Running) -> None:
    created = await running.admin().CreateConnection(db_request(password="hunter2", team="payments"))
    assert created.id.startswith("conn_")
    assert created.status == pb.CONNECTION_STATUS_ACTIVE
    assert created.test_status == pb.TEST_STATUS_UNTESTED
    assert list(created.secret_fields) == ["password"]
    assert created.config["port"] == 5432  # default per driver
    assert created.config["ssl"] is True  # remote host
    assert "password" not in created.config
    assert dict(created.labels) == {"team": "payments"}
    assert "hunter2" not in str(created)
    fetched = await running.admin().GetConnection(pb.GetConnectionRequest(id=created.id))
    assert fetched == created


async def test_invalid_input_names_fields_and_writes_nothing(running: Running) -> None:
    admin = running.admin()
    before = await audit_count(running)
    bad = pb.CreateConnectionRequest(
        name="bad",
        type="database",
        config=struct({"driver": "postgresql", "host": "db", "port": 70000, "password": "oops"}),
        secrets={},
    )
    error = await rpc_error(admin.CreateConnection(bad))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(error)
    assert {"config.port", "config.password", "config.database"} <= set(violations)
    assert "oops" not in (error.details() or "")

    unknown_type = await rpc_error(
        admin.CreateConnection(pb.CreateConnectionRequest(name="x", type="telepathy"))
    )
    assert "type" in field_violations(unknown_type)
    bad_name = await rpc_error(admin.CreateConnection(db_request(name="")))
    assert "name" in field_violations(bad_name)
    bad_label = await rpc_error(admin.CreateConnection(db_request(name="ok", **{"Bad Key": "v"})))
    assert "labels" in field_violations(bad_label)

    listed = await admin.ListConnections(pb.ListConnectionsRequest(status=pb.CONNECTION_STATUS_UNSPECIFIED))
    assert list(listed.connections) == []
    assert await audit_count(running) == before


async def test_a_credential_pasted_into_config_is_refused_never_stored_or_shown(running: Running) -> None:
    """Config is stored in clear and shown to every admin: a credential put there by mistake
    (in a URL's query, a header, a driver option, a CA field, a custom value) is refused, its
    field named, the value never echoed, nothing written."""
    admin = running.admin()
    leaked = "sk-live-5f1c0ffee0ddba11"
    pem_key = f"-----BEGIN RSA PRIVATE KEY-----\n{leaked}\n-----END RSA PRIVATE KEY-----\n"

    def http(**config: object) -> pb.CreateConnectionRequest:
        config = {"base_url": "https://api.example.com/v1", "auth_type": "bearer", **config}
        return pb.CreateConnectionRequest(
            name="h", type="http", config=struct(config), secrets={"token": "t"}
        )

    def database(**config: object) -> pb.CreateConnectionRequest:
        request = db_request(name="d")
        request.config.update(config)
        return request

    def custom(**config: object) -> pb.CreateConnectionRequest:
        return pb.CreateConnectionRequest(name="c", type="custom", config=struct(config), secrets={"k": "v"})

    hook = {"url": f"https://hooks.example.com/in?sig={leaked}", "auth_type": "none"}
    mcp = {"server_url": f"https://mcp.example.com/mcp?api_key={leaked}"}
    requests = {
        "config.base_url": [
            http(base_url=f"https://api.example.com/v1?access_token={leaked}"),
            http(base_url=f"https://api.example.com/v1?q=1&key={leaked}"),
            http(base_url=f"https://api.example.com/v1#X-Amz-Signature={leaked}"),
        ],
        "config.url": [pb.CreateConnectionRequest(name="w", type="webhook", config=struct(hook))],
        "config.server_url": [pb.CreateConnectionRequest(name="m", type="mcp", config=struct(mcp))],
        "config.headers": [
            http(headers={"Private-Token": leaked}),
            http(headers={"X-Goog-Api-Key": leaked}),
            http(headers={"X-Forwarded-Auth": f"Bearer {leaked}"}),
        ],
        "config.options": [database(options={"sslpassword": leaked})],
        "config.ssl_ca": [database(ssl_ca=pem_key)],
        "config.dsn": [custom(dsn=f"postgres://app:{leaked}@db.internal/app")],
        "config.nested": [custom(nested={"pem": [pem_key]})],
    }
    for field, made in requests.items():
        for request in made:
            error = await rpc_error(admin.CreateConnection(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.details())
            assert field in field_violations(error), (field, error.details())
            assert leaked not in error.details() and leaked not in str(error.trailing_metadata())

    # Nor through an update of a connection that is fine: it stays as it was.
    created = await admin.CreateConnection(http())
    before = await audit_count(running)
    update = pb.UpdateConnectionRequest(
        id=created.id, config=struct({"base_url": f"https://api.example.com/v1?password={leaked}"})
    )
    error = await rpc_error(admin.UpdateConnection(update))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "config.base_url" in field_violations(error)
    assert await audit_count(running) == before
    assert await admin.GetConnection(pb.GetConnectionRequest(id=created.id)) == created
    listed = await admin.ListConnections(pb.ListConnectionsRequest())
    assert [c.name for c in listed.connections] == ["h"] and leaked not in str(listed)

    # What only looks alike is still config: a token *URL*, a sort key, ordinary headers and options.
    fine = [
        http(base_url="https://api.example.com/v1?sort_key=name&page=2", headers={"X-Request-Source": "ci"}),
        database(options={"application_name": "broker", "connect_timeout": "5"}),
        custom(token_url="https://auth.example.com/token", owner="ops"),
    ]
    for i, request in enumerate(fine):
        request.name = f"fine-{i}"
        await admin.CreateConnection(request)


async def test_names_are_unique_among_live_connections(running: Running) -> None:
    admin = running.admin()
    first = await admin.CreateConnection(db_request(name="dup"))
    error = await rpc_error(admin.CreateConnection(db_request(name="dup")))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    await admin.DeleteConnection(pb.DeleteConnectionRequest(id=first.id))
    second = await admin.CreateConnection(db_request(name="dup"))
    # The name is taken again, so the first cannot come back under it.
    error = await rpc_error(admin.RestoreConnection(pb.RestoreConnectionRequest(id=first.id)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert second.id != first.id


async def test_partial_update_keeps_secrets_and_checks_etag(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request(password="first-password"))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))

    renamed = await admin.UpdateConnection(
        pb.UpdateConnectionRequest(
            id=created.id, name="renamed", config=struct({"database": "analytics"}), etag=created.etag
        )
    )
    assert (
        renamed.name == "renamed"
        and renamed.config["database"] == "analytics"
        and renamed.config["host"] == "db.internal"
    )
    assert renamed.etag != created.etag
    assert list(renamed.secret_fields) == ["password"]
    resolved = await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
    assert resolved.secrets["password"] == "first-password"  # kept: no secrets in the update

    stale = await rpc_error(
        admin.UpdateConnection(pb.UpdateConnectionRequest(id=created.id, name="x", etag=created.etag))
    )
    assert stale.code() == grpc.StatusCode.ABORTED

    rotated = await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=created.id, secrets={"password": "second-password"}, etag=renamed.etag)
    )
    resolved = await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
    assert resolved.secrets["password"] == "second-password"

    labelled = await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=created.id, labels=pb.Labels(values={"env": "prod"}))
    )
    assert dict(labelled.labels) == {"env": "prod"} and labelled.name == "renamed"
    moved = await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=created.id, config=struct({"port": 6543}), secrets={"password": "p3"})
    )
    removed = await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=created.id, config=struct({"port": None}), secrets={"password": "p3"})
    )
    assert (moved.config["port"], removed.config["port"]) == (6543, 5432)  # the default comes back
    assert rotated.etag != labelled.etag


async def test_pointing_a_connection_elsewhere_needs_its_secrets_again(running: Running) -> None:
    """An admin who can edit but never read a secret must not be able to send it to their own server."""
    admin = running.admin()
    created = await admin.CreateConnection(db_request(password="stays-home"))
    for change in ({"host": "attacker.example"}, {"port": 6543}):
        error = await rpc_error(
            admin.UpdateConnection(pb.UpdateConnectionRequest(id=created.id, config=struct(change)))
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "secrets.password" in field_violations(error)
    assert await admin.GetConnection(pb.GetConnectionRequest(id=created.id)) == created
    api = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="api",
            type="http",
            config=struct({"base_url": "https://api.example.com", "auth_type": "bearer"}),
            secrets={"token": "tok-1234"},
        )
    )
    error = await rpc_error(
        admin.UpdateConnection(
            pb.UpdateConnectionRequest(id=api.id, config=struct({"base_url": "https://attacker.example"}))
        )
    )
    assert "secrets.token" in field_violations(error)
    moved = await admin.UpdateConnection(
        pb.UpdateConnectionRequest(
            id=api.id, config=struct({"base_url": "https://api2.example.com"}), secrets={"token": "tok-5678"}
        )
    )
    assert moved.config["base_url"] == "https://api2.example.com"


async def test_invalid_update_changes_nothing(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request())
    error = await rpc_error(
        admin.UpdateConnection(pb.UpdateConnectionRequest(id=created.id, config=struct({"port": "abc"})))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "config.port" in field_violations(error)
    error = await rpc_error(
        admin.UpdateConnection(
            pb.UpdateConnectionRequest(id=created.id, clear_secrets=["nope"], secrets={"nope": "x"})
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await admin.GetConnection(pb.GetConnectionRequest(id=created.id)) == created


async def test_clearing_a_secret_the_connection_does_not_hold_is_refused_not_ignored(
    running: Running,
) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="ssh",
            type="ssh",
            config=struct({"host": "ssh.example.com", "username": "deploy"}),
            secrets={"password": "pw-1", "private_key": "key-1"},
        )
    )
    before = await audit_count(running)
    refusals = {
        "clear_secrets[0]": pb.UpdateConnectionRequest(id=created.id, clear_secrets=["pasword"]),  # a typo
        "clear_secrets[1]": pb.UpdateConnectionRequest(
            id=created.id,
            clear_secrets=["private_key", "passphrase"],  # a field it does not hold
        ),
        "clear_secrets[2]": pb.UpdateConnectionRequest(
            id=created.id,
            clear_secrets=["private_key", "private_key", "password"],
            secrets={"password": "pw-2"},
        ),
    }
    for field, request in refusals.items():
        error = await rpc_error(admin.UpdateConnection(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        violations = field_violations(error)
        assert list(violations) == [field], violations
    assert (
        "it holds: password, private_key"
        in field_violations(await rpc_error(admin.UpdateConnection(refusals["clear_secrets[0]"])))[
            "clear_secrets[0]"
        ]
    )
    assert await audit_count(running) == before
    assert await admin.GetConnection(pb.GetConnectionRequest(id=created.id)) == created

    cleared = await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=created.id, clear_secrets=["password"])
    )
    assert list(cleared.secret_fields) == ["private_key"]


async def test_an_update_that_changes_nothing_writes_nothing(running: Running) -> None:
    """A no-op update keeps the etag other admins hold valid, and adds no audit event."""
    admin = running.admin()
    created = await admin.CreateConnection(db_request(team="a"))
    before = await audit_count(running)
    same = [
        pb.UpdateConnectionRequest(id=created.id),
        pb.UpdateConnectionRequest(id=created.id, name=created.name, labels=pb.Labels(values={"team": "a"})),
        pb.UpdateConnectionRequest(id=created.id, config=struct({"host": "db.internal", "port": 5432})),
    ]
    for request in same:
        assert await admin.UpdateConnection(request) == created
    assert await audit_count(running) == before
    renamed = await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=created.id, name="other", etag=created.etag)
    )
    assert renamed.name == "other" and renamed.etag != created.etag


async def test_delete_restore_revoke_purge_lifecycle(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request())
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))

    premature = await rpc_error(admin.PurgeConnection(pb.PurgeConnectionRequest(id=created.id)))
    assert premature.code() == grpc.StatusCode.FAILED_PRECONDITION

    deleted = await admin.DeleteConnection(pb.DeleteConnectionRequest(id=created.id))
    assert deleted.status == pb.CONNECTION_STATUS_DELETED and deleted.HasField("deleted_at")
    assert [c.id for c in (await admin.ListConnections(pb.ListConnectionsRequest())).connections] == []
    trash = await admin.ListConnections(pb.ListConnectionsRequest(status=pb.CONNECTION_STATUS_DELETED))
    assert [c.id for c in trash.connections] == [created.id]
    denied = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id)))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED

    restored = await admin.RestoreConnection(pb.RestoreConnectionRequest(id=created.id))
    assert restored.status == pb.CONNECTION_STATUS_ACTIVE
    assert (await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))).secrets["password"]

    revoked = await admin.RevokeConnection(
        pb.RevokeConnectionRequest(id=created.id, reason="leaked in a log")
    )
    assert revoked.status == pb.CONNECTION_STATUS_REVOKED
    listed = await admin.ListConnections(pb.ListConnectionsRequest())
    assert [c.status for c in listed.connections] == [pb.CONNECTION_STATUS_REVOKED]  # stays listed
    denied = await rpc_error(running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id)))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED

    await admin.DeleteConnection(pb.DeleteConnectionRequest(id=created.id))
    purged = await admin.PurgeConnection(pb.PurgeConnectionRequest(id=created.id))
    assert purged.id == created.id
    for call in (
        admin.GetConnection(pb.GetConnectionRequest(id=created.id)),
        admin.RestoreConnection(pb.RestoreConnectionRequest(id=created.id)),
    ):
        assert (await rpc_error(call)).code() == grpc.StatusCode.NOT_FOUND
    assert (await admin.ListGrants(pb.ListGrantsRequest(connection_id=created.id))).grants == []
    actions = [
        e.action
        for e in (await admin.ListAuditEvents(pb.ListAuditEventsRequest(connection_id=created.id))).events
    ]
    assert actions[0] == "connection.purge"
    assert {
        "connection.create",
        "connection.delete",
        "connection.restore",
        "connection.revoke",
        "grant.create",
    } <= set(actions)


async def test_list_filters_and_pages(running: Running) -> None:
    admin = running.admin()
    ids = []
    for i in range(25):
        created = await admin.CreateConnection(db_request(name=f"db-{i:02d}", env="prod" if i % 2 else "dev"))
        ids.append(created.id)
    await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="openai", type="api_key", provider="openai", secrets={"api_key": "sk-x"}
        )
    )
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.ListConnections(
            pb.ListConnectionsRequest(type="database", page_size=10, page_token=token)
        )
        assert len(page.connections) <= 10
        seen += [c.id for c in page.connections]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids  # each exactly once, in creation order
    prod = await admin.ListConnections(pb.ListConnectionsRequest(labels={"env": "prod"}, page_size=100))
    assert len(prod.connections) == 12
    prefixed = await admin.ListConnections(pb.ListConnectionsRequest(name_prefix="db-1"))
    assert sorted(c.name for c in prefixed.connections) == [f"db-1{i}" for i in range(10)]
    by_provider = await admin.ListConnections(pb.ListConnectionsRequest(provider="openai"))
    assert [c.name for c in by_provider.connections] == ["openai"]

    bad_token = await rpc_error(admin.ListConnections(pb.ListConnectionsRequest(page_token="garbage!")))
    assert "page_token" in field_violations(bad_token)

    # A token goes with the filters of the call that returned it (AIP-158): with others its
    # position would silently skip or repeat connections.
    first = await admin.ListConnections(
        pb.ListConnectionsRequest(type="database", labels={"env": "prod"}, page_size=1)
    )
    assert first.next_page_token
    for other in (
        pb.ListConnectionsRequest(type="api_key", labels={"env": "prod"}),
        pb.ListConnectionsRequest(labels={"env": "prod"}),
        pb.ListConnectionsRequest(type="database", labels={"env": "dev"}),
        pb.ListConnectionsRequest(type="database"),
    ):
        other.page_token = first.next_page_token
        moved = await rpc_error(admin.ListConnections(other))
        assert moved.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "other filters" in field_violations(moved)["page_token"]
    # The same filters with another page size: the next page.
    same = await admin.ListConnections(
        pb.ListConnectionsRequest(
            type="database", labels={"env": "prod"}, page_size=5, page_token=first.next_page_token
        )
    )
    assert [c.id for c in same.connections] == [ids[i] for i in (3, 5, 7, 9, 11)]
    bad_size = await rpc_error(admin.ListConnections(pb.ListConnectionsRequest(page_size=-1)))
    assert "page_size" in field_violations(bad_size)


async def test_grants_validate_principal_and_expiry(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request())
    for principal, field in (
        ("not-a-spiffe-id", "principal"),
        ("spiffe://broker.local/tenant/default/admin/cli", "principal"),
        ("spiffe://broker.local/tenant/tenant-b/executor/demo", "principal"),
    ):
        error = await rpc_error(
            admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=principal))
        )
        assert field in field_violations(error)
    past = pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR)
    past.expires_at.FromSeconds(1_000_000)
    assert "expires_at" in field_violations(await rpc_error(admin.GrantAccess(past)))
    missing = await rpc_error(
        admin.GrantAccess(pb.GrantAccessRequest(connection_id="conn_nope", principal=EXECUTOR))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND

    grant = await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    assert grant.created_by == "spiffe://broker.local/tenant/default/admin/cli"
    listed = await admin.ListGrants(pb.ListGrantsRequest(connection_id=created.id))
    assert [g.principal for g in listed.grants] == [EXECUTOR]
    await admin.RevokeAccess(pb.RevokeAccessRequest(connection_id=created.id, principal=EXECUTOR))
    again = await rpc_error(
        admin.RevokeAccess(pb.RevokeAccessRequest(connection_id=created.id, principal=EXECUTOR))
    )
    assert again.code() == grpc.StatusCode.NOT_FOUND


async def test_audit_events_filter_by_action_actor_and_time(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request())
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id, purpose="nightly sync"))

    resolves = await admin.ListAuditEvents(pb.ListAuditEventsRequest(action="connection.resolve"))
    (event,) = resolves.events
    assert (
        event.actor == EXECUTOR and event.outcome == "allowed" and event.details["purpose"] == "nightly sync"
    )
    assert event.request_id and event.peer.startswith("ipv4:127.0.0.1")
    by_actor = await admin.ListAuditEvents(
        pb.ListAuditEventsRequest(actor="spiffe://broker.local/tenant/default/admin/cli")
    )
    assert [e.action for e in by_actor.events] == ["grant.create", "connection.create"]  # newest first

    window = pb.ListAuditEventsRequest()
    window.start_time.FromDatetime(event.time.ToDatetime())
    assert [e.id for e in (await admin.ListAuditEvents(window)).events] == [event.id]
    window.end_time.FromDatetime(event.time.ToDatetime())
    inverted = await rpc_error(admin.ListAuditEvents(window))
    assert "end_time" in field_violations(inverted)

    pages: list[int] = []
    token = ""
    while True:
        page = await admin.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1, page_token=token))
        pages += [e.id for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert pages == sorted(pages, reverse=True) and len(pages) == 3
