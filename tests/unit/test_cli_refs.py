"""One way to name a connection: an id as given, or a name looked up live-first (deleted-first to restore)."""

from __future__ import annotations

import grpc
import pytest

from broker._proto import broker_pb2 as pb
from broker.cli._input import UsageError
from broker.cli._refs import UnknownConnection, connection_id, is_unknown_connection, looks_like_id
from tests.unit.test_cli_brokerctl import FakeRpcError, FakeStub

LIVE, GONE, GONE2 = ("conn_" + c * 26 for c in "abc")


def admin(*, live: list[pb.Connection], deleted: list[pb.Connection]) -> FakeStub:
    """A stub whose ListConnections answers by the status asked for, as the broker does."""
    stub = FakeStub({})
    by_status = {pb.CONNECTION_STATUS_UNSPECIFIED: live, pb.CONNECTION_STATUS_DELETED: deleted}

    def list_connections(request: pb.ListConnectionsRequest, timeout: float | None = None) -> object:
        stub.calls.append(("ListConnections", request))
        found = [c for c in by_status[request.status] if c.name.startswith(request.name_prefix)]
        return pb.ListConnectionsResponse(connections=found)

    stub.ListConnections = list_connections  # type: ignore[method-assign]
    return stub


def test_an_id_is_taken_as_it_is_and_anything_else_is_a_name() -> None:
    assert looks_like_id(LIVE) and not looks_like_id("conn_1") and not looks_like_id("orders")
    stub = admin(live=[], deleted=[])
    assert connection_id(stub, GONE, 1.0) == GONE and stub.calls == []


def test_live_first_or_deleted_first_then_the_other() -> None:
    live, gone = pb.Connection(id=LIVE, name="db"), pb.Connection(id=GONE, name="db")
    prefixed = pb.Connection(id=GONE2, name="db-old")
    stub = admin(live=[live, prefixed], deleted=[gone])
    assert connection_id(stub, "db", 1.0) == LIVE
    assert connection_id(stub, "db", 1.0, deleted=True) == GONE
    only_live = admin(live=[live], deleted=[])
    assert connection_id(only_live, "db", 1.0, deleted=True) == LIVE  # the broker then says why not
    only_gone = admin(live=[], deleted=[gone])
    assert connection_id(only_gone, "db", 1.0) == GONE  # `get` still shows a deleted one


def test_two_deleted_connections_with_the_name_are_the_users_choice() -> None:
    stub = admin(live=[], deleted=[pb.Connection(id=GONE, name="db"), pb.Connection(id=GONE2, name="db")])
    with pytest.raises(UsageError) as info:
        connection_id(stub, "db", 1.0, deleted=True)
    assert str(info.value) == f"2 deleted connections are named db: {GONE}, {GONE2}; pass one of the ids"


@pytest.mark.parametrize(
    ("ref", "shown"), [("nosuch", "nosuch"), ("conn_1", "conn_1"), ("bad\x1bname", "bad\\x1bname"), ("", "")]
)
def test_an_unknown_ref_is_one_message_with_the_ref_shown_safely(ref: str, shown: str) -> None:
    stub = admin(live=[pb.Connection(id=LIVE, name="nosuch-prefix")], deleted=[])
    with pytest.raises(UnknownConnection) as info:
        connection_id(stub, ref, 1.0)
    assert info.value.message == f"no connection named or with id {shown}"
    if not ref.isprintable() or not ref:
        assert stub.calls == []  # no name the broker accepts: not worth a call


def test_only_the_brokers_unknown_connection_answer_counts_as_unknown() -> None:
    assert is_unknown_connection(FakeRpcError(grpc.StatusCode.NOT_FOUND, f"connection {LIVE} not found"))
    assert is_unknown_connection(
        FakeRpcError(grpc.StatusCode.NOT_FOUND, "connection (not a valid id) not found")
    )
    grant = FakeRpcError(grpc.StatusCode.NOT_FOUND, f"no grant of connection {LIVE} to that principal")
    assert not is_unknown_connection(grant)
    assert not is_unknown_connection(FakeRpcError(grpc.StatusCode.INTERNAL, f"connection {LIVE} not found"))
