"""brokerctl without a server: parsing, the requests each command builds, output and errors."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from broker import pki
from broker._proto import broker_pb2 as pb
from broker.cli import _output as out
from broker.cli import brokerctl
from broker.cli._ctl_args import build_parser
from broker.cli._rpc import ClientTls, Session, describe_error

CANARY = "canary-51d2-secret"
ID1 = "conn_00000000000000000000000001"  # the shape of a connection id: an id, not a name
ID2 = "conn_00000000000000000000000002"
ID9 = "conn_00000000000000000000000009"


class FakeStub:
    """Records each call; answers from `replies[method]` (a list is consumed in order)."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, method: str) -> Any:
        def call(request: Any, timeout: float | None = None) -> Any:
            self.calls.append((method, _copy(request)))
            reply = self.replies[method]
            if isinstance(reply, list):
                reply = reply.pop(0)
            if isinstance(reply, BaseException):
                raise reply
            return reply

        return call


def _copy(request: Any) -> Any:
    clone = type(request)()
    clone.CopyFrom(request)
    return clone


class FakeSession:
    def __init__(self, replies: dict[str, Any]) -> None:
        self.admin = FakeStub(replies)
        self.resolver = FakeStub(replies)
        self.proxy = FakeStub(replies)
        self.timeout = 10.0
        self.addr = "127.0.0.1:50051"
        self.server_name = None
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a FakeSession for the next brokerctl.main call; returns a setter for replies."""
    sessions: list[FakeSession] = []

    def install(**replies: Any) -> FakeSession:
        session = FakeSession(replies)
        sessions.append(session)
        monkeypatch.setattr(brokerctl, "open_session", lambda args: session)
        return session

    yield install
    assert all(s.closed for s in sessions)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def connection(**overrides: Any) -> pb.Connection:
    c = pb.Connection(
        id=ID1,
        name="orders-db",
        type="database",
        provider="postgres",
        secret_fields=["password"],
        status=pb.CONNECTION_STATUS_ACTIVE,
        etag="3",
    )
    c.config.update({"host": "db.internal", "port": 5432})
    c.updated_at.FromDatetime(dt.datetime(2025, 1, 2, 3, 4, 5))
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


# ------------------------------------------------------------------ parsing


def test_global_options_work_before_and_after_the_command() -> None:
    parser = build_parser()
    before = parser.parse_args(["--json", "--addr", "h:1", "--data-dir", "d", "types"])
    after = parser.parse_args(["types", "--json", "--addr", "h:1", "--data-dir", "d"])
    for args in (before, after):
        assert args.json is True and args.addr == "h:1" and args.data_dir == Path("d")
    defaults = parser.parse_args(["types"])
    assert defaults.json is False
    # Not given is None: _ctl_settings fills it from BROKER_* variables, a profile or the dev defaults.
    assert defaults.addr is None and defaults.resolve_addr is None and defaults.data_dir is None


def test_help_and_docstring_give_every_exit_status() -> None:
    epilog = build_parser().epilog or ""
    for status in ("0 ", "1 ", "2 ", "130 ", "141 "):
        assert f"\n  {status}" in epilog
    assert brokerctl.__doc__ is not None and "130" in brokerctl.__doc__ and "141" in brokerctl.__doc__


def test_create_requires_a_type(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["create", "x"])
    assert info.value.code == 2
    assert "--type" in capsys.readouterr().err


def test_grant_expiry_options_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["grant", "c", "p", "--expires-in", "1h", "--expires-at", "2030-01-01"])


def test_default_identities_come_from_the_data_dir(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--data-dir", str(tmp_path), "types"])
    session = brokerctl.open_session(args)
    assert session._admin == (
        "127.0.0.1:50051",
        ClientTls(*(tmp_path / "tls" / n for n in ("ca.pem", "admin.pem", "admin-key.pem"))),
    )
    resolve_files = (tmp_path / "tls" / n for n in ("ca.pem", "executor.pem", "executor-key.pem"))
    assert session._resolve == ("127.0.0.1:50052", ClientTls(*resolve_files))
    override = build_parser().parse_args(
        ["resolve", "x", "--cert", "c.pem", "--key", "k.pem", "--ca", "a.pem"]
    )
    assert brokerctl.open_session(override)._resolve[1] == ClientTls(
        Path("a.pem"), Path("c.pem"), Path("k.pem")
    )


def test_missing_certificate_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert brokerctl.main(["--data-dir", str(tmp_path), "types"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the CA certificate" in err and "broker dev" in err


# ----------------------------------------------------------------- requests


def test_create_builds_the_request(fake: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pw").write_text(CANARY + "\n")
    session = fake(CreateConnection=connection())
    argv = ["create", "orders-db", "--type", "database", "--provider", "postgres", "--config", "port=5432"]
    argv += [
        "--config",
        "host=db.internal",
        "--secret",
        f"password=@{tmp_path / 'pw'}",
        "--label",
        "team=pay",
    ]
    assert brokerctl.main(argv) == 0
    [(method, request)] = session.admin.calls
    assert method == "CreateConnection"
    assert (request.name, request.type, request.provider) == ("orders-db", "database", "postgres")
    assert dict(request.config) == {"port": 5432, "host": "db.internal"}
    assert dict(request.secrets) == {"password": CANARY}
    assert dict(request.labels) == {"team": "pay"}
    out = capsys.readouterr().out
    assert "orders-db" in out and "password" in out and CANARY not in out


def test_update_sends_only_what_was_given(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    session = fake(UpdateConnection=connection())
    assert brokerctl.main(["update", ID1, "--name", "renamed"]) == 0
    request = session.admin.calls[0][1]
    assert request.name == "renamed"
    assert not request.HasField("config") and not request.HasField("labels")

    session = fake(UpdateConnection=connection())
    monkeypatch.setattr("sys.stdin", Tty())
    monkeypatch.setattr("getpass.getpass", lambda prompt="": CANARY)
    argv = ["update", ID1, "--config", "port=null", "--label", "a=1", "--secret", "password"]
    argv += ["--clear-secret", "sslkey", "--etag", "3"]
    assert brokerctl.main(argv) == 0
    request = session.admin.calls[0][1]
    assert not request.HasField("name")
    assert request.config.fields["port"].WhichOneof("kind") == "null_value"
    assert dict(request.labels.values) == {"a": "1"}
    assert dict(request.secrets) == {"password": CANARY}
    assert list(request.clear_secrets) == ["sslkey"] and request.etag == "3"


def test_ungrant_all_asks_for_every_connection_and_never_names_one(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    principal = "spiffe://broker.local/tenant/default/executor/demo"
    session = fake(RevokeAccess=[pb.RevokeAccessResponse(grants_removed=3), pb.RevokeAccessResponse()])
    assert brokerctl.main(["ungrant", "--all", principal]) == 0
    assert brokerctl.main(["ungrant", principal, "--all", "--json"]) == 0
    requests = [request for _, request in session.admin.calls]
    assert requests == [pb.RevokeAccessRequest(principal=principal, every_connection=True)] * 2
    text, json_line = capsys.readouterr().out.splitlines()
    assert text == f"{principal} can no longer use any connection: removed 3 grants; its leases end with them"
    assert json.loads(json_line) == {"grants_removed": 0}  # written out, although proto3 JSON drops 0
    # One connection and --all, or neither: a usage error, and nothing is called.
    session = fake()
    assert brokerctl.main(["ungrant", "--all", ID1, principal]) == 2
    assert brokerctl.main(["ungrant", principal]) == 2
    assert session.admin.calls == []
    usage = capsys.readouterr().err.splitlines()
    assert usage == [
        "brokerctl: error: ungrant --all takes the principal only, not a connection",
        "brokerctl: error: ungrant needs ID_OR_NAME and PRINCIPAL, or --all PRINCIPAL",
    ]


def test_update_clear_labels_sends_an_empty_label_set(fake: Any) -> None:
    session = fake(UpdateConnection=connection())
    assert brokerctl.main(["update", ID1, "--clear-labels"]) == 0
    request = session.admin.calls[0][1]
    assert request.HasField("labels") and not request.labels.values


def test_update_with_nothing_to_change_is_refused(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    session = fake()
    assert brokerctl.main(["update", ID1]) == 2
    assert session.admin.calls == []
    assert "nothing to update" in capsys.readouterr().err


def test_list_all_follows_page_tokens(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pages = [
        pb.ListConnectionsResponse(connections=[connection(id=ID1)], next_page_token="t1"),
        pb.ListConnectionsResponse(connections=[connection(id=ID2, name="other")]),
    ]
    session = fake(ListConnections=pages)
    argv = ["list", "--all", "--status", "deleted", "--label", "team=pay", "--type", "database", "--json"]
    assert brokerctl.main(argv) == 0
    tokens = [request.page_token for _, request in session.admin.calls]
    assert tokens == ["", "t1"]
    first = session.admin.calls[0][1]
    assert first.status == pb.CONNECTION_STATUS_DELETED and dict(first.labels) == {"team": "pay"}
    doc = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in doc["connections"]] == [ID1, ID2]
    assert doc["connections"][0]["secret_fields"] == ["password"]


def test_list_table_and_next_page_hint(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(ListConnections=pb.ListConnectionsResponse(connections=[connection()], next_page_token="tok"))
    assert brokerctl.main(["list"]) == 0
    captured = capsys.readouterr()
    header, row = captured.out.splitlines()
    assert header.split() == ["ID", "NAME", "TYPE", "PROVIDER", "STATUS", "SECRETS", "UPDATED"]
    assert row.split() == [
        ID1,
        "orders-db",
        "database",
        "postgres",
        "active",
        "password",
        "2025-01-02T03:04:05Z",
    ]
    assert header.index("NAME") == row.index("orders-db")  # aligned
    assert "--page-token tok" in captured.err


def test_grant_with_expires_in(fake: Any) -> None:
    session = fake(GrantAccess=pb.Grant(connection_id=ID1, principal="p"))
    before = dt.datetime.now(dt.UTC)
    assert brokerctl.main(["grant", ID1, "spiffe://x/tenant/t/executor/e", "--expires-in", "1h"]) == 0
    request = session.admin.calls[0][1]
    expires = request.expires_at.ToDatetime(tzinfo=dt.UTC)
    assert dt.timedelta(minutes=59) < expires - before <= dt.timedelta(hours=1, seconds=5)
    assert request.principal == "spiffe://x/tenant/t/executor/e"


def test_grant_without_expiry_leaves_it_unset(fake: Any) -> None:
    session = fake(GrantAccess=pb.Grant())
    assert brokerctl.main(["grant", ID1, "p"]) == 0
    assert not session.admin.calls[0][1].HasField("expires_at")


def test_audit_pages_until_the_limit(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    page = [pb.AuditEvent(id=i, actor="a", action="connection.create", outcome="succeeded") for i in range(3)]
    session = fake(
        ListAuditEvents=[
            pb.ListAuditEventsResponse(events=page, next_page_token="n"),
            pb.ListAuditEventsResponse(events=page, next_page_token="m"),
        ]
    )
    assert brokerctl.main(["audit", "--limit", "4", "--since", "1h", "--action", "connection.create"]) == 0
    first = session.admin.calls[0][1]
    assert first.page_size == 4 and first.action == "connection.create"
    assert first.HasField("start_time") and not first.HasField("end_time")
    assert len(session.admin.calls) == 2
    assert len(capsys.readouterr().out.splitlines()) == 1 + 4


def test_resolve_by_name_uses_the_resolver(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    reply = pb.ResolveResponse(connection_id=ID1, name="orders-db", secrets={"password": CANARY})
    session = fake(Resolve=reply)
    assert brokerctl.main(["resolve", "orders-db", "--purpose", "debug"]) == 0
    [(method, request)] = session.resolver.calls
    assert method == "Resolve" and request.name == "orders-db" and request.purpose == "debug"
    assert not request.connection_id  # the executor cannot list: the broker looks the name up
    shown = capsys.readouterr().out
    assert CANARY in shown  # resolve is the one command that shows a secret
    assert "secret version" in shown and "superseded" not in shown
    session = fake(Resolve=reply)
    assert brokerctl.main(["resolve", ID1, "--by-name"]) == 0  # old scripts: the name reading, forced
    assert session.resolver.calls[0][1].name == ID1


def test_resolve_shows_when_the_version_held_was_superseded(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    reply = pb.ResolveResponse(connection_id=ID1, name="orders-db", secret_version=4)
    reply.superseded_at.FromSeconds(1_700_000_000)
    session = fake(Resolve=reply)
    assert brokerctl.main(["resolve", ID1, "--known-version", "3"]) == 0
    [(_, request)] = session.resolver.calls
    assert request.known_secret_version == 3
    shown = capsys.readouterr().out
    assert "4" in shown and "superseded" in shown and "2023-11-14" in shown


def test_resolve_help_says_it_prints_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["resolve", "--help"])
    shown = capsys.readouterr().out
    assert "PRINT ITS SECRETS" in shown and "--by-name" not in shown  # accepted, no longer needed


def test_purge_needs_confirmation(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    session = fake(PurgeConnection=pb.PurgeConnectionResponse(id=ID1))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a terminal
    assert brokerctl.main(["purge", ID1]) == 2
    assert session.admin.calls == []
    assert brokerctl.main(["purge", ID1, "--yes"]) == 0
    assert session.admin.calls[0][1].id == ID1


def test_purge_asks_at_a_terminal(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    session = fake(PurgeConnection=pb.PurgeConnectionResponse(id=ID1))
    monkeypatch.setattr("sys.stdin", Tty("n\n"))
    assert brokerctl.main(["purge", ID1]) == 1
    monkeypatch.setattr("sys.stdin", Tty("yes\n"))
    assert brokerctl.main(["purge", ID1]) == 0
    assert len(session.admin.calls) == 1


def test_types_marks_secret_fields_and_wraps_to_the_width(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = [pb.FieldSpec(name="host"), pb.FieldSpec(name="password", secret=True)]
    long = " ".join(["words"] * 40)
    types = pb.ListConnectionTypesResponse(
        types=[pb.ConnectionType(name="database", fields=fields, description=long, providers=["a", "b"])]
    )
    fake(ListConnectionTypes=types)
    assert brokerctl.main(["types"]) == 0
    shown = capsys.readouterr().out
    assert "fields: host, password*" in shown and "providers: a, b" in shown
    rendered = out.render_types(types, 60).splitlines()
    assert max(len(line) for line in rendered) <= 60
    assert rendered[:2] == ["TYPE      DESCRIPTION", "database  " + " ".join(["words"] * 8)]
    assert rendered[2].startswith("          words")  # continued under the description


def test_types_with_a_type_shows_each_field(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    driver = pb.FieldSpec(
        name="driver", kind=pb.FIELD_KIND_ENUM, required=True, choices=["pg", "my"], description="Engine."
    )
    port = pb.FieldSpec(name="port", kind=pb.FIELD_KIND_INTEGER)
    port.default_value.number_value = 5432
    secret = pb.FieldSpec(name="password", kind=pb.FIELD_KIND_STRING, secret=True)
    database = pb.ConnectionType(name="database", description="A database.", fields=[driver, port, secret])
    fake(ListConnectionTypes=pb.ListConnectionTypesResponse(types=[database, pb.ConnectionType(name="aws")]))
    assert brokerctl.main(["types", "database"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "database: A database.",
        "",
        "FIELD     DETAILS",
        "driver    enum, required, one of: pg | my",
        "          Engine.",
        "port      integer, optional, default 5432",
        "password  string, optional, SECRET",
    ]
    fake(ListConnectionTypes=pb.ListConnectionTypesResponse(types=[database, pb.ConnectionType(name="aws")]))
    assert brokerctl.main(["types", "--json", "database"]) == 0
    assert json.loads(capsys.readouterr().out)["fields"][1]["default_value"] == 5432
    fake(ListConnectionTypes=pb.ListConnectionTypesResponse(types=[database, pb.ConnectionType(name="aws")]))
    assert brokerctl.main(["types", "nosuch"]) == 2
    assert (
        capsys.readouterr().err
        == "brokerctl: error: no connection type nosuch; the types are: database, aws\n"
    )


def test_grants_mark_expired_ones_and_active_hides_them(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    now = dt.datetime.now(dt.UTC)
    grants = [pb.Grant(connection_id=ID1, principal=p) for p in ("p-old", "p-new", "p-forever")]
    grants[0].expires_at.FromDatetime(now - dt.timedelta(seconds=1))
    grants[1].expires_at.FromDatetime(now + dt.timedelta(hours=1))
    fake(ListGrants=pb.ListGrantsResponse(grants=grants))
    assert brokerctl.main(["grants"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0][:6] == ["CONNECTION", "PRINCIPAL", "STATE", "MODE", "SCOPE", "EXPIRES"]
    assert [r[1:3] for r in rows[1:]] == [["p-old", "expired"], ["p-new", "active"], ["p-forever", "active"]]
    fake(ListGrants=pb.ListGrantsResponse(grants=grants))
    assert brokerctl.main(["grants", "--active", "--json"]) == 0
    assert [g["principal"] for g in json.loads(capsys.readouterr().out)["grants"]] == ["p-new", "p-forever"]


def test_restore_and_purge_look_for_a_deleted_connection_first(fake: Any) -> None:
    deleted = pb.ListConnectionsResponse(connections=[connection(id=ID2, name="orders-db")])
    session = fake(ListConnections=[deleted, deleted], RestoreConnection=connection(id=ID2))
    session.admin.replies["PurgeConnection"] = pb.PurgeConnectionResponse(id=ID2)
    assert brokerctl.main(["restore", "orders-db"]) == 0
    assert brokerctl.main(["purge", "orders-db", "--yes"]) == 0
    lookups = [r for m, r in session.admin.calls if m == "ListConnections"]
    assert [r.status for r in lookups] == [pb.CONNECTION_STATUS_DELETED] * 2
    assert [r.id for m, r in session.admin.calls if m != "ListConnections"] == [ID2, ID2]


def test_tables_show_non_ascii_as_it_is() -> None:
    c = connection()
    c.labels["team"] = "équipe"
    c.config.update({"db": "héllo\u202e"})
    shown = out.render_connection(c)
    assert '"db": "héllo\\u202e"' in shown and "team=équipe" in shown  # bidi still escaped


def test_invisible_characters_are_escaped_so_different_text_never_looks_the_same() -> None:
    # Bidi marks, zero-width characters, odd spaces and separators, a private-use character.
    for char, escaped in {
        "\u200b": "\\u200b",
        "\u200e": "\\u200e",
        "\u061c": "\\u061c",
        "\ufeff": "\\ufeff",
        "\u00a0": "\\xa0",
        "\u2028": "\\u2028",
        "\U000e0041": "\\U000e0041",
    }.items():
        assert out.shown(f"ops{char}team") == f"ops{escaped}team"
    c = connection()
    c.config.update({"owner": "ops\u200bteam"})
    assert '"owner": "ops\\u200bteam"' in out.render_connection(c)
    assert out.shown("日本語 é ü 😀") == "日本語 é ü 😀"


# ------------------------------------------------------------------- errors


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[Any, ...] = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[Any, ...]:
        return self._trailers


def invalid_argument() -> FakeRpcError:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field="config.port", description="must be an integer"
            ),
            error_details_pb2.BadRequest.FieldViolation(field="name", description="is required"),
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad)
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message="2 fields are invalid", details=[detail]
    )
    trailer = (("grpc-status-details-bin", status.SerializeToString()),)
    return FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "2 fields are invalid", trailer)


def test_invalid_argument_lists_each_field(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(CreateConnection=invalid_argument())
    assert brokerctl.main(["create", "x", "--type", "database"]) == 1
    # The status text repeats the violations; only a count is shown above them.
    assert capsys.readouterr().err.splitlines() == [
        "brokerctl: INVALID_ARGUMENT: 2 invalid fields",
        "  config.port: must be an integer",
        "  name: is required",
    ]


def test_an_unknown_id_reads_like_an_unknown_name(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(GetConnection=FakeRpcError(grpc.StatusCode.NOT_FOUND, f"connection {ID9} not found"))
    assert brokerctl.main(["get", ID9]) == 1
    assert capsys.readouterr().err == f"brokerctl: no connection named or with id {ID9}\n"
    missing = FakeRpcError(grpc.StatusCode.NOT_FOUND, f"no grant of connection {ID9} to that principal")
    fake(RevokeAccess=missing)
    assert brokerctl.main(["ungrant", ID9, "p"]) == 1
    assert capsys.readouterr().err == f"brokerctl: NOT_FOUND: {missing.details()}\n"


def test_a_long_violation_list_is_counted_in_full() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f"labels.k{i}", description="is too long")
            for i in range(2)
        ]
        + [error_details_pb2.BadRequest.FieldViolation(field="", description="and 5 more")]
    )
    detail = any_pb2.Any()
    detail.Pack(bad)
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="...", details=[detail])
    error = FakeRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, "...", (("grpc-status-details-bin", status.SerializeToString()),)
    )
    assert describe_error(error, "h:1") == [
        "brokerctl: INVALID_ARGUMENT: 7 invalid fields",
        "  labels.k0: is too long",
        "  labels.k1: is too long",
        "  and 5 more",
    ]


def test_json_errors_go_to_stderr_as_one_object(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(CreateConnection=invalid_argument())
    assert brokerctl.main(["create", "x", "--type", "database", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and json.loads(captured.err) == {
        "code": "INVALID_ARGUMENT",
        "message": "2 invalid fields",
        "violations": [
            {"field": "config.port", "description": "must be an integer"},
            {"field": "name", "description": "is required"},
        ],
    }
    fake(ListConnectionTypes=FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"))
    assert brokerctl.main(["--json", "types"]) == 1
    doc = json.loads(capsys.readouterr().err)
    assert doc["code"] == "UNAVAILABLE" and "127.0.0.1:50051" in doc["hint"] and "violations" not in doc
    fake(RotateMasterKey=FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "not an operator"))
    assert brokerctl.main(["keys", "rotate", "--json"]) == 1
    assert "master_key.operators" in json.loads(capsys.readouterr().err)["hint"]
    fake()
    assert brokerctl.main(["list", "--page-size", "5000", "--json"]) == 2
    assert json.loads(capsys.readouterr().err) == {
        "code": "USAGE",
        "message": "--page-size must be between 1 and 1000",
    }


def test_command_line_errors_are_json_with_json_and_argparse_text_without(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert brokerctl.main(["--json", "grant", ID1]) == 2
    doc = json.loads(capsys.readouterr().err)
    assert doc["code"] == "USAGE" and doc["message"] == "the following arguments are required: principal"
    assert doc["usage"].startswith("usage: brokerctl grant")
    assert brokerctl.main(["grant", ID1]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: brokerctl grant")
    assert err.endswith("brokerctl grant: error: the following arguments are required: principal\n")


def test_ctrl_c_anywhere_is_status_130_and_a_newline(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    session = fake(ListConnections=KeyboardInterrupt())
    assert brokerctl.main(["list"]) == 130
    assert capsys.readouterr().err == "\n" and session.closed


def test_unreachable_broker_gets_a_hint_with_the_address() -> None:
    error = FakeRpcError(
        grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; Connection refused"
    )
    lines = describe_error(error, "127.0.0.1:6000")
    assert lines[0].startswith("brokerctl: UNAVAILABLE: failed to connect")
    assert "nothing is listening on 127.0.0.1:6000" in lines[1]
    tls = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Ssl handshake failed: CERTIFICATE_VERIFY_FAILED")
    assert "--ca" in describe_error(tls, "h:1")[1]


# -------------------------------------------------------------- master keys


def rotated() -> pb.RotateMasterKeyResponse:
    return pb.RotateMasterKeyResponse(
        active_kek_id="kek_new", previous_kek_id="kek_old", deks_by_kek={"kek_old": 12}
    )


def test_keys_rotate_calls_rotate_master_key_and_shows_the_keys(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    session = fake(RotateMasterKey=rotated())
    assert brokerctl.main(["keys", "rotate"]) == 0
    [(method, request)] = session.admin.calls
    assert method == "RotateMasterKey" and request == pb.RotateMasterKeyRequest()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[:2] == ["active key:    kek_new", "previous key:  kek_old"]
    assert [line.split() for line in lines[3:]] == [
        ["KEY", "STATE", "DATA", "KEYS"],
        ["kek_new", "active", "0"],  # listed even though it wraps nothing yet
        ["kek_old", "old", "12"],
    ]
    assert "kek_new is now the active master key (was kek_old)" in captured.err
    assert "broker keys rewrap" in captured.err


def test_keys_rotate_json_keeps_stdout_machine_readable(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake(RotateMasterKey=rotated())
    assert brokerctl.main(["keys", "rotate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "active_kek_id": "kek_new",
        "previous_kek_id": "kek_old",
        "deks_by_kek": {"kek_old": 12},  # a number, though int64 is a string in proto3 JSON
    }


def test_keys_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["keys"])
    assert info.value.code == 2
    assert "KEYS_COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("code", "details", "hint"),
    [
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "rotating the master key needs a principal listed in master_key.operators",
            "must be listed in the broker's master_key.operators",
        ),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "this broker reads a single master key (master_key.file or BROKER_MASTER_KEY); "
            "rotation needs master_key.dir",
            "`broker keys init --import`",
        ),
    ],
)
def test_keys_rotate_refusals_say_what_to_change(
    fake: Any, capsys: pytest.CaptureFixture[str], code: grpc.StatusCode, details: str, hint: str
) -> None:
    fake(RotateMasterKey=FakeRpcError(code, details))
    assert brokerctl.main(["keys", "rotate"]) == 1
    captured = capsys.readouterr()
    status, hint_line = captured.err.splitlines()
    assert status == f"brokerctl: {code.name}: {details}"
    assert hint_line.startswith("brokerctl: hint: ") and hint in hint_line
    assert captured.out == ""


def test_keys_rotate_other_errors_are_reported_as_usual(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    fake(RotateMasterKey=FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"))
    assert brokerctl.main(["keys", "rotate"]) == 1
    assert capsys.readouterr().err == "brokerctl: UNIMPLEMENTED: Method not found!\n"


def test_session_opens_channels_lazily_and_closes_them(tmp_path: Path) -> None:
    files = ClientTls(tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem")
    session = Session("a:1", files, "b:2", files, timeout=1.0)
    session.close()  # nothing opened, nothing read: the files do not even exist
    assert session.addr == "a:1"


def test_session_reuses_one_channel_per_listener(tmp_path: Path) -> None:
    pki.ensure_dev_layout(tmp_path)
    tls = tmp_path / "tls"
    admin = ClientTls(tls / "ca.pem", tls / "admin.pem", tls / "admin-key.pem")
    executor = ClientTls(tls / "ca.pem", tls / "executor.pem", tls / "executor-key.pem")
    session = Session("127.0.0.1:1", admin, "127.0.0.1:2", executor, timeout=1.0)
    assert session.admin is session.admin  # channels are idle until a call, so no socket is opened
    assert session.addr == "127.0.0.1:1"
    assert session.resolver is session.resolver
    assert session.addr == "127.0.0.1:2"
    assert len(session._channels) == 2
    session.close()
    assert session._channels == []


HOSTILE = "Lists files.\x1b]0;owned\x07\x1b[2J\u202eexe.txt\x9b1m"


def test_text_from_servers_cannot_drive_the_terminal(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A tool description or error text with escape sequences is shown escaped, never executed."""
    tool = pb.McpTool(name="ls\x1b[31m", description=HOSTILE)
    fake(ListMcpTools=pb.ListMcpToolsResponse(tools=[tool]))
    assert brokerctl.main(["mcp", "tools", ID1]) == 0
    fake(GetConnection=FakeRpcError(grpc.StatusCode.NOT_FOUND, f"no {HOSTILE}"))
    assert brokerctl.main(["get", ID1]) == 1
    captured = capsys.readouterr()
    for text in (captured.out, captured.err):
        assert not any(c in text for c in "\x1b\x07\x9b\u202e"), repr(text)
    assert "ls\\x1b[31m" in captured.out and "Lists files.\\x1b]0;owned\\x07" in captured.out
    assert "\\u202eexe.txt" in captured.err
    assert out.shown("héllo") == "héllo"  # everything printable is shown as it is


def test_proxy_sends_the_request_and_prints_the_body_as_it_is(
    fake: Any, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(b'{"q": 1}')
    answer = pb.ProxyHttpResponse(status=201, headers=[pb.HttpHeader(name="x-id", value="7")], body=b"\xffok")
    session = fake(ProxyHttp=[answer, answer, pb.ProxyHttpResponse(status=404, body=b"nope")])
    argv = ["proxy", "github", "post", "/repos", "--query", "a=1", "-H", "Accept: application/json", "--data"]
    assert brokerctl.main([*argv, f"@{body}"]) == 0
    assert capsysbinary.readouterr().out == b"\xffok"  # bytes as they came, nothing added
    [(called, request)] = session.proxy.calls
    assert called == "ProxyHttp"
    assert (request.name, request.method, request.path, request.query, request.body) == (
        "github",
        "POST",
        "/repos",
        "a=1",
        b'{"q": 1}',
    )
    assert [(h.name, h.value) for h in request.headers] == [("Accept", "application/json")]
    assert brokerctl.main(["proxy", ID1, "GET", "/x", "-i"]) == 0
    assert capsysbinary.readouterr().out == b"HTTP 201\nx-id: 7\n\n\xffok"
    assert session.proxy.calls[1][1].connection_id == ID1
    assert brokerctl.main(["proxy", "github", "GET", "/missing"]) == 1  # 4xx and 5xx: exit 1, like curl -f
    assert brokerctl.main(["proxy", "github", "GET", "/x", "-H", "no-colon"]) == 2


def test_mcp_call_sends_the_arguments_and_prints_the_text(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    text = pb.CallMcpToolResponse(content=[struct_pb2.Struct()])
    text.content[0].update({"type": "text", "text": "3 issues found"})
    failed = pb.CallMcpToolResponse(is_error=True)
    session = fake(CallMcpTool=[text, failed])
    argv = ["mcp", "call", "tools", "search", "--arg", "q=open bugs", "--arg", "limit=3"]
    assert brokerctl.main(argv) == 0
    assert capsys.readouterr().out == "3 issues found\n"
    [(_, request)] = session.proxy.calls
    assert (request.name, request.tool) == ("tools", "search")
    assert dict(request.arguments) == {"q": "open bugs", "limit": 3}
    assert brokerctl.main(["mcp", "call", "tools", "search"]) == 1  # the tool reported an error


# ------------------------------------------------------------------ leases


def lease(**overrides: Any) -> pb.Lease:
    x = pb.Lease(
        id="lease_1",
        connection_id=ID1,
        principal="spiffe://x/tenant/t/executor/e",
        username="brk_0123456789abcdef",
        state=pb.LEASE_STATE_REVOKING,
        revoke_reason="expired",
        last_error="unreachable",
        revocation_attempts=3,
        run_id="run-7",
    )
    x.expires_at.FromDatetime(dt.datetime(2026, 1, 2, 3, 4, 5))
    x.max_expires_at.FromDatetime(dt.datetime(2026, 1, 3, 3, 4, 5))
    for key, value in overrides.items():
        setattr(x, key, value)
    return x


def test_leases_sends_the_filters_and_shows_a_table(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    session = fake(ListLeases=pb.ListLeasesResponse(leases=[lease()], next_page_token="tok"))
    argv = ["leases", "--connection", ID1, "--principal", "p", "--state", "revoking", "--run-id", "run-7"]
    assert brokerctl.main(argv) == 0
    [(method, request)] = session.admin.calls
    assert method == "ListLeases" and request.connection_id == ID1 and request.principal == "p"
    assert request.state == pb.LEASE_STATE_REVOKING and request.run_id == "run-7"
    captured = capsys.readouterr()
    header, row = captured.out.splitlines()
    assert header.split()[:6] == ["ID", "CONNECTION", "PRINCIPAL", "USER", "STATE", "EXPIRES"]
    assert "REASON / LAST ERROR" in header and header.endswith("ATTEMPTS")
    assert row.split() == [
        "lease_1",
        ID1,
        "spiffe://x/tenant/t/executor/e",
        "brk_0123456789abcdef",
        "revoking",
        "2026-01-02T03:04:05Z",
        "expired",
        "/",
        "unreachable",
        "3",
    ]
    assert "--page-token tok" in captured.err


def test_leases_all_follows_page_tokens_and_json_keeps_numbers(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    session = fake(
        ListLeases=[
            pb.ListLeasesResponse(leases=[lease()], next_page_token="t1"),
            pb.ListLeasesResponse(leases=[lease(id="lease_2")]),
        ]
    )
    assert brokerctl.main(["leases", "--all", "--json"]) == 0
    assert [request.page_token for _, request in session.admin.calls] == ["", "t1"]
    doc = json.loads(capsys.readouterr().out)
    assert [x["id"] for x in doc["leases"]] == ["lease_1", "lease_2"]
    assert (
        doc["leases"][0]["revocation_attempts"] == 3 and doc["leases"][0]["state"] == "LEASE_STATE_REVOKING"
    )


def test_leases_rejects_an_unknown_state(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert brokerctl.main(["leases", "--state", "gone"]) == 2
    assert "invalid choice: 'gone'" in capsys.readouterr().err


def test_leases_revoke_needs_a_filter_and_prints_the_count(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    session = fake(RevokeLeases=pb.RevokeLeasesResponse(revoked=2))
    assert brokerctl.main(["leases", "revoke"]) == 2
    assert "needs --connection, --principal, --prefix or --run-id" in capsys.readouterr().err
    assert session.admin.calls == []
    assert brokerctl.main(["leases", "revoke", "--prefix", "brk_", "--run-id", "r", "--principal", "p"]) == 0
    [(method, request)] = session.admin.calls
    assert method == "RevokeLeases"
    assert (request.username_prefix, request.run_id, request.principal, request.lease_id) == (
        "brk_",
        "r",
        "p",
        "",
    )
    assert capsys.readouterr().out == "queued 2 leases for revocation\n"


def test_leases_revoke_abandon_says_what_it_did(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    session = fake(RevokeLeases=pb.RevokeLeasesResponse(revoked=3))
    assert brokerctl.main(["leases", "revoke", "--run-id", "r", "--abandon"]) == 0
    [(_, request)] = session.admin.calls
    assert request.abandon and request.run_id == "r"
    assert capsys.readouterr().out == "marked 3 leases revoked without dropping their users\n"


def test_leases_revoke_json_says_zero(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # proto3 JSON leaves a 0 out; a script must still read the count.
    fake(RevokeLeases=pb.RevokeLeasesResponse(revoked=0))
    assert brokerctl.main(["leases", "revoke", "--run-id", "r", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"revoked": 0}


def test_lease_revoke_names_one_lease_and_an_unknown_one_fails(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    session = fake(RevokeLeases=[pb.RevokeLeasesResponse(revoked=1), pb.RevokeLeasesResponse(revoked=0)])
    assert brokerctl.main(["lease", "revoke", "lease_1"]) == 0
    assert session.admin.calls[0][1] == pb.RevokeLeasesRequest(lease_id="lease_1")
    assert capsys.readouterr().out == "queued lease lease_1 for revocation\n"
    assert brokerctl.main(["lease", "revoke", "lease_9", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert json.loads(captured.err)["code"] == "NOT_FOUND"


def test_lease_needs_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    assert brokerctl.main(["lease"]) == 2
    assert "LEASE_COMMAND" in capsys.readouterr().err


def test_resolve_sends_the_run_id_and_shows_the_lease(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    reply = pb.ResolveResponse(connection_id=ID1, name="orders-db", secrets={"password": CANARY})
    reply.config.update({"username": "brk_0123456789abcdef"})
    reply.lease.CopyFrom(lease(state=pb.LEASE_STATE_ACTIVE, revoke_reason="", last_error=""))
    session = fake(Resolve=reply)
    assert brokerctl.main(["resolve", "orders-db", "--run-id", "run-7"]) == 0
    assert session.resolver.calls[0][1].run_id == "run-7"
    shown = dict(line.split(":  ", 1) for line in capsys.readouterr().out.splitlines())
    shown = {key.rstrip(":"): value.strip() for key, value in shown.items()}
    assert shown["lease"] == "lease_1" and shown["lease user"] == "brk_0123456789abcdef"
    assert shown["lease expires"] == "2026-01-02T03:04:05Z" and shown["lease max"] == "2026-01-03T03:04:05Z"
    assert shown["lease run"] == "run-7" and shown["secret password"] == CANARY


def test_resolve_without_a_lease_shows_none(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fake(Resolve=pb.ResolveResponse(connection_id=ID1, name="orders-db"))
    assert brokerctl.main(["resolve", ID1]) == 0
    assert "lease" not in capsys.readouterr().out


def test_leases_revoke_keeps_filters_given_before_revoke(fake: Any) -> None:
    # `leases --connection A revoke --run-id R` must not widen to every connection's run R.
    session = fake(RevokeLeases=pb.RevokeLeasesResponse(revoked=1))
    assert brokerctl.main(["leases", "--connection", ID1, "revoke", "--run-id", "r"]) == 0
    [(_, request)] = session.admin.calls
    assert (request.connection_id, request.run_id) == (ID1, "r")


def test_mcp_tools_shows_the_servers_hints_compactly_and_json_has_them(
    fake: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    drop = pb.McpTool(
        name="drop_table",
        description="Drops a table.",
        title="Drop a table",
        annotations=pb.McpToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False),
        task_support="optional",
    )
    drop.output_schema.update({"type": "object"})
    read = pb.McpTool(
        name="read", description="Reads.", annotations=pb.McpToolAnnotations(read_only_hint=True)
    )
    export = pb.McpTool(name="export", task_support="required", not_callable="runs only as an MCP task")
    plain = pb.McpTool(name="plain", description="Nothing said.")
    fake(ListMcpTools=pb.ListMcpToolsResponse(tools=[drop, read, export, plain]))
    assert brokerctl.main(["mcp", "tools", ID1]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TOOL", "HINTS", "PARAMETERS", "DESCRIPTION"]
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert rows == {
        "drop_table": "writes,destructive,closed-world,task-optional",
        "read": "read-only",
        "export": "task-required,not-callable",
        "plain": "-",
    }
    assert "Drop a table: Drops a table." in lines[1]

    fake(ListMcpTools=pb.ListMcpToolsResponse(tools=[drop, export]))
    assert brokerctl.main(["mcp", "tools", ID1, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["tools"]
    # A hint set to false is there: unset and false are different statements.
    assert shown[0]["annotations"] == {
        "read_only_hint": False,
        "destructive_hint": True,
        "open_world_hint": False,
    }
    assert (shown[0]["title"], shown[0]["task_support"], shown[0]["output_schema"]) == (
        "Drop a table",
        "optional",
        {"type": "object"},
    )
    assert shown[1]["not_callable"] == "runs only as an MCP task"
