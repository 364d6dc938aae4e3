"""Malformed input over real mTLS is INVALID_ARGUMENT naming the field: never INTERNAL or UNKNOWN,
never an error too large to deliver, and nothing is written."""

from __future__ import annotations

import base64

import grpc
import pytest

from broker import metrics
from broker._proto import broker_pb2 as pb
from broker.catalog import MAX_JSON_DEPTH
from broker.model import AuditFilter, ConnectionFilter, GrantFilter, SecurityEventFilter
from broker.service import paging
from tests.conftest import Running
from tests.helpers import EXECUTOR, db_request, field_violations, rpc_error, struct

# gRPC refuses a header block over 8 KiB; the error must fit well inside it.
METADATA_LIMIT = 8 * 1024


async def audit_count(running: Running) -> int:
    events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(page_size=1000))
    return len(events.events)


def trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    """What the error's status message and trailers take on the wire (binary values in base64)."""
    size = len((error.details() or "").encode())
    for key, value in error.trailing_metadata() or ():
        raw = value if isinstance(value, bytes) else value.encode()
        size += len(key) + (len(base64.b64encode(raw)) if key.endswith("-bin") else len(raw))
    return size


def draft(config: dict[str, object]) -> pb.ConnectionDraft:
    return pb.ConnectionDraft(name="d", type="http", config=struct(config), secrets={"token": "t0ken"})


# ----------------------------------------------------------------- NaN and Infinity in a Struct


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
async def test_non_finite_numbers_in_any_struct_name_the_field(running: Running, number: float) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request())
    before = await audit_count(running)

    create = db_request(name="other")
    create.config["port"] = number
    update = pb.UpdateConnectionRequest(id=created.id, config=struct({"options": {"timeouts": [1, number]}}))
    http = {"base_url": "https://api.example.com", "retry": number}
    oauth = pb.ConnectionDraft(name="o", provider="github", config=struct({"client_id": "c", "x": number}))
    calls = {
        "config.port": admin.CreateConnection(create),
        "config.options.timeouts[1]": admin.UpdateConnection(update),
        "draft.config.retry": admin.TestConnection(pb.TestConnectionRequest(draft=draft(http))),
        "draft.config.x": admin.BeginAuthorization(
            pb.BeginAuthorizationRequest(draft=oauth, redirect_uri="http://127.0.0.1/cb")
        ),
    }
    for field, call in calls.items():
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.details())
        assert "NaN or Infinity" in field_violations(error)[field]

    discover = pb.ConnectionDraft(
        name="m", type="mcp", config=struct({"url": "https://mcp.example", "n": number})
    )
    error = await rpc_error(admin.DiscoverMcpTools(pb.DiscoverMcpToolsRequest(draft=discover)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "draft.config.n" in field_violations(error)

    assert await audit_count(running) == before
    assert (await admin.GetConnection(pb.GetConnectionRequest(id=created.id))).etag == created.etag


async def test_a_key_that_is_no_field_name_is_not_quoted(running: Running) -> None:
    request = db_request()
    request.config.update({"p@ss w0rd!": float("nan")})
    error = await rpc_error(running.admin().CreateConnection(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "p@ss" not in error.details()
    assert "config" in field_violations(error)


# ----------------------------------------------------------------- numbers a double cannot carry exactly

EXACT = 2**53 - 1  # the largest integer every number in a Struct (a double) holds exactly


async def test_integers_beyond_2_53_or_not_whole_are_refused_naming_the_field(running: Running) -> None:
    # 2**53 + 1 arrives as 2**53: stored, it would silently be another number than the one sent.
    admin = running.admin()
    custom = pb.CreateConnectionRequest(
        name="ids",
        type="custom",
        config=struct({"account": EXACT, "nested": {"n": [-EXACT]}}),
        secrets={"k": "v"},
    )
    created = await admin.CreateConnection(custom)
    assert created.config["account"] == EXACT and created.config["nested"]["n"][0] == -EXACT
    before = await audit_count(running)

    too_big = pb.CreateConnectionRequest(
        name="ids2", type="custom", config=struct({"account": 2**53 + 1}), secrets={"k": "v"}
    )
    update = pb.UpdateConnectionRequest(
        id=created.id,
        config=struct({"nested": {"n": [1, -(2**60)]}, "other": 1}),
        labels=pb.Labels(values={"a": "b"}),
    )
    port = db_request(name="port")
    port.config["port"] = 2.0**64
    fraction = db_request(name="fraction")
    fraction.config.update({"port": 5432.5, "dynamic": True, "default_ttl": 3600.25})
    http = {"base_url": "https://api.example.com", "timeout_seconds": 1e300}
    calls = {
        ("config.account",): admin.CreateConnection(too_big),
        ("config.nested.n[1]",): admin.UpdateConnection(update),
        ("config.port",): admin.CreateConnection(port),
        ("config.port", "config.default_ttl"): admin.CreateConnection(fraction),
        ("draft.config.timeout_seconds",): admin.TestConnection(pb.TestConnectionRequest(draft=draft(http))),
    }
    for fields, call in calls.items():
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, error.details())
        violations = field_violations(error)
        for field in fields:
            assert field in violations, (field, violations)
        if fields != ("config.port", "config.default_ttl"):
            assert "9007199254740991" in violations[fields[0]]
    assert (
        "must be an integer"
        in field_violations(await rpc_error(admin.CreateConnection(fraction)))["config.default_ttl"]
    )

    # Nothing was written: no audit event, the connection as it was, no new connection.
    assert await audit_count(running) == before
    got = await admin.GetConnection(pb.GetConnectionRequest(id=created.id))
    assert got.etag == created.etag and got.config["nested"]["n"][0] == -EXACT
    assert [c.name for c in (await admin.ListConnections(pb.ListConnectionsRequest())).connections] == ["ids"]


def nested(levels: int) -> dict[str, object]:
    """A config whose objects nest `levels` deep, itself counted."""
    value: dict[str, object] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


async def test_a_config_nested_deeper_than_any_client_reads_back_is_refused(running: Running) -> None:
    # One stored connection that a client's protobuf reader cannot read would make every listing
    # of its tenant unreadable (INTERNAL "Exception deserializing response!" in every Python client).
    admin = running.admin()
    deepest = await admin.CreateConnection(
        pb.CreateConnectionRequest(
            name="deep", type="custom", config=struct(nested(MAX_JSON_DEPTH)), secrets={"k": "v"}
        )
    )
    listed = await admin.ListConnections(pb.ListConnectionsRequest())
    assert [c.id for c in listed.connections] == [deepest.id]
    before = await audit_count(running)
    deeper = struct(nested(MAX_JSON_DEPTH + 1))
    calls = [
        admin.CreateConnection(
            pb.CreateConnectionRequest(name="deeper", type="custom", config=deeper, secrets={"k": "v"})
        ),
        admin.UpdateConnection(pb.UpdateConnectionRequest(id=deepest.id, config=deeper)),
    ]
    for call in calls:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert f"deeper than {MAX_JSON_DEPTH - 1} levels" in field_violations(error)["config.a"]
    assert await audit_count(running) == before
    listed = await admin.ListConnections(pb.ListConnectionsRequest())
    assert [(c.id, c.etag) for c in listed.connections] == [(deepest.id, deepest.etag)]


# ----------------------------------------------------------------- forged page tokens


# The filters of a listing called with none: a forged token gets past the digest check.
UNFILTERED = {
    "connections": ConnectionFilter(),
    "grants": GrantFilter(),
    "audit": AuditFilter(),
    "security": SecurityEventFilter(),
    "other": GrantFilter(),
}


def forged(kind: str, position: object) -> str:
    return paging.encode_token(kind, position, UNFILTERED[kind])


def raw_token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# Positions of the wrong shape for every listing: event ids out of BIGINT range, a bool, a float.
FORGED_POSITIONS = [10**30, -(10**30), 2**63, 0, -1, True, 1.5, None, {"a": 1}, [1, 2]]
GARBAGE_TOKENS = [
    "!!!!",
    "a" * 5000,
    raw_token("[" * 5000 + "]" * 5000),
    raw_token('["connections", "\\ud800"]'),
    raw_token('["grants", ["\\ud800", "x"]]'),
    raw_token('["audit", 1e999]'),
    raw_token("1" * 4000),
]


async def test_forged_page_tokens_are_invalid_argument_on_every_listing(running: Running) -> None:
    admin = running.admin()
    listings = {
        "connections": lambda t: admin.ListConnections(pb.ListConnectionsRequest(page_token=t)),
        "grants": lambda t: admin.ListGrants(pb.ListGrantsRequest(page_token=t)),
        "audit": lambda t: admin.ListAuditEvents(pb.ListAuditEventsRequest(page_token=t)),
        "security": lambda t: admin.ListSecurityEvents(pb.ListSecurityEventsRequest(page_token=t)),
    }
    for kind, listing in listings.items():
        tokens = [forged(kind, p) for p in FORGED_POSITIONS] + [forged("other", "x")] + GARBAGE_TOKENS
        if kind in ("audit", "security"):
            tokens.append(forged(kind, "conn_x"))
        for token in tokens:
            error = await rpc_error(listing(token))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (kind, token[:80], error.details())
            assert "page_token" in field_violations(error)


# ----------------------------------------------------------------- unbounded lists


async def test_label_filters_are_capped(running: Running) -> None:
    admin = running.admin()
    await admin.CreateConnection(db_request(team="payments"))
    many = {f"k{i}": "v" for i in range(1001)}
    error = await rpc_error(admin.ListConnections(pb.ListConnectionsRequest(labels=many)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 64" in field_violations(error)["labels"]
    # The cap is the one stored labels obey: 64 filters still run.
    at_cap = {"team": "payments", **{f"k{i}": "v" for i in range(63)}}
    assert not (await admin.ListConnections(pb.ListConnectionsRequest(labels=at_cap))).connections
    found = await admin.ListConnections(pb.ListConnectionsRequest(labels={"team": "payments"}))
    assert len(found.connections) == 1


async def test_filters_longer_than_any_stored_value_or_of_unknown_enums_are_refused(running: Running) -> None:
    """A 1 MB filter matches nothing and only costs a query; an unknown status number read as
    "unspecified" would list what the caller did not ask for."""
    admin = running.admin()
    created = await admin.CreateConnection(db_request())
    long = "c" * 100_000
    calls = {
        "name_prefix": admin.ListConnections(pb.ListConnectionsRequest(name_prefix=long)),
        "type": admin.ListConnections(pb.ListConnectionsRequest(type=long)),
        "status": admin.ListConnections(pb.ListConnectionsRequest(status=99)),
        "actor": admin.ListAuditEvents(pb.ListAuditEventsRequest(actor=long)),
        "action": admin.ListAuditEvents(pb.ListAuditEventsRequest(action=long)),
        "principal": admin.ListGrants(pb.ListGrantsRequest(principal=long)),
        "connection_id": admin.ListSecurityEvents(pb.ListSecurityEventsRequest(connection_id=long)),
        "id": admin.GetConnection(pb.GetConnectionRequest(id=long)),
    }
    for field, call in calls.items():
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.details())
        assert field in field_violations(error), (field, error.details())
    # At the bound, a filter is still a filter (and an unknown id still NOT_FOUND).
    assert not (await admin.ListConnections(pb.ListConnectionsRequest(name_prefix="c" * 2048))).connections
    deleted = await admin.ListConnections(pb.ListConnectionsRequest(status=pb.CONNECTION_STATUS_DELETED))
    assert not deleted.connections
    listed = await admin.ListConnections(pb.ListConnectionsRequest(status=pb.CONNECTION_STATUS_UNSPECIFIED))
    assert [c.id for c in listed.connections] == [created.id]
    missing = await rpc_error(admin.GetConnection(pb.GetConnectionRequest(id="c" * 2048)))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_other_repeated_fields_are_capped(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request())
    clear = pb.UpdateConnectionRequest(id=created.id, clear_secrets=[f"s{i}" for i in range(5000)])
    error = await rpc_error(admin.UpdateConnection(clear))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "clear_secrets" in field_violations(error)

    oauth = pb.ConnectionDraft(name="o", provider="github", config=struct({"client_id": "c"}))
    for scopes in ([f"s{i}" for i in range(5000)], ["has space"]):
        begin = pb.BeginAuthorizationRequest(draft=oauth, redirect_uri="http://127.0.0.1/cb", scopes=scopes)
        error = await rpc_error(admin.BeginAuthorization(begin))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "scopes" in field_violations(error)
    bad_uri = pb.BeginAuthorizationRequest(draft=oauth, redirect_uri="http://[::1/cb")
    error = await rpc_error(admin.BeginAuthorization(bad_uri))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "redirect_uri" in field_violations(error)


# ----------------------------------------------------------------- errors that can be delivered


async def test_many_violations_are_capped_to_a_deliverable_error(running: Running) -> None:
    request = db_request()
    request.secrets.update({f"unknown_secret_{i:03d}_{'x' * 40}": "v" for i in range(100)})
    error = await rpc_error(running.admin().CreateConnection(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(error)
    assert 2 <= len(violations) <= 11
    assert violations[""].startswith("and ") and violations[""].endswith(" more")
    assert trailer_bytes(error) < METADATA_LIMIT // 2


async def test_one_violation_per_field_for_an_oversized_secret(running: Running) -> None:
    error = await rpc_error(running.admin().CreateConnection(db_request(password="x" * (1 << 20))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().count("secrets.password") == 1
    assert list(field_violations(error)) == ["secrets.password"]


# ----------------------------------------------------------------- bytes that are not the message

GET_CONNECTION = "/broker.v1.AdminService/GetConnection"


def raw_call(running: Running, who: str, port: int, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    channel = running.channel(running.identities[who], port)
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def malformed_count(method: str) -> float:
    service, name = method.split("/")[1].rpartition(".")[2], method.rpartition("/")[2]
    value = metrics.REGISTRY.get_sample_value(
        "broker_malformed_requests_total", {"service": service, "method": name}
    )
    return value or 0.0


async def test_a_body_that_does_not_decode_is_invalid_argument(running: Running) -> None:
    before = malformed_count(GET_CONNECTION)
    error = await rpc_error(
        raw_call(running, "admin", running.broker.admin_port, GET_CONNECTION)(b"\xff\xff\xff")
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in error.details()
    assert "DecodeError" not in error.details() and "class" not in error.details()
    assert malformed_count(GET_CONNECTION) == before + 1
    logs = running.logs.getvalue()
    assert logs.count("malformed_request") == 1
    assert "Traceback" not in logs

    resolve = raw_call(running, "executor", running.broker.resolve_port, "/broker.v1.ResolveService/Resolve")
    error = await rpc_error(resolve(b"\x0a\xff\x01"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

    channel = running.channel(running.identities["admin"], running.broker.admin_port)
    export = channel.unary_stream(
        "/broker.v1.AdminService/ExportAuditEvents", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in export(b"\x0a\x05\x08"):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_malformed_body_still_checks_and_audits_the_caller(running: Running) -> None:
    before = await audit_count(running)
    garbage = b"\xff" * 64
    wrong_role = raw_call(running, "executor", running.broker.admin_port, GET_CONNECTION)
    error = await rpc_error(wrong_role(garbage))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    events = (await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="rpc.denied"))).events
    assert [(e.actor, e.reason) for e in events] == [(EXECUTOR, "wrong_role")]
    assert await audit_count(running) == before + 1

    unknown = raw_call(running, "no_spiffe", running.broker.admin_port, GET_CONNECTION)
    error = await rpc_error(unknown(garbage))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
