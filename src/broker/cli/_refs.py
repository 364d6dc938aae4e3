"""Which connection a user means: every `brokerctl` command takes an id or a name, the same way.

An argument shaped like a connection id (`conn_` and 26 base-32 characters) is an id;
anything else is a name, looked up with ListConnections. A name is unique among live
connections, but deleted ones may share it (with each other and with a live one), so the
lookup prefers the state the command acts on: `restore` and `purge` want a deleted
connection, every other command a live one. Several deleted connections with the name
leave the choice to the user, who is shown their ids.

A name nobody has and an id the broker does not know read the same:
"no connection named or with id X".
"""

from __future__ import annotations

import re
from typing import Any

import grpc

from broker._proto import broker_pb2
from broker.cli._input import UsageError
from broker.cli._output import shown
from broker.cli._rpc import pages

_ID = re.compile(r"conn_[0-9a-z]{26}")
# What the broker answers for an id it does not know, well-formed or not (service/lookup.py).
_NOT_FOUND = re.compile(r"connection (?:\S+|\(not a valid id\)) not found")
_PAGE = 1000
_LIVE = broker_pb2.CONNECTION_STATUS_UNSPECIFIED  # every connection not deleted
_DELETED = broker_pb2.CONNECTION_STATUS_DELETED


class UnknownConnection(LookupError):
    """No connection has this id or name; the CLI prints `message` and exits with status 1."""

    def __init__(self, ref: str) -> None:
        super().__init__(ref)
        self.message = f"no connection named or with id {shown(ref)}"


class NameTaken(LookupError):
    """A live connection has this name already; the CLI prints `message` and exits with status 1."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.message = f"a connection named {shown(name)!r} already exists"


def check_name_free(admin: Any, name: str, timeout: float) -> None:
    """`NameTaken` when a live connection has `name`: for a command that must not start (and leave
    something behind elsewhere, such as a registered client) only to be refused at the end."""
    if _named(admin, name, _LIVE, timeout):
        raise NameTaken(name)


def looks_like_id(ref: str) -> bool:
    """True when `ref` has the shape of a connection id (a name of that shape is taken as an id)."""
    return _ID.fullmatch(ref) is not None


def connection_id(admin: Any, ref: str, timeout: float, *, deleted: bool = False) -> str:
    """The id `ref` means: an id as given, or the id of the connection with that exact name.

    A live connection is preferred, or a deleted one with `deleted` (restore, purge); the
    other state is the fallback, so the broker can say why the command does not apply.
    """
    if looks_like_id(ref):
        return ref
    if not ref or not ref.isprintable():
        # Not a name the broker accepts, so no connection has it; not worth a call.
        raise UnknownConnection(ref)
    for status in (_DELETED, _LIVE) if deleted else (_LIVE, _DELETED):
        ids = _named(admin, ref, status, timeout)
        if len(ids) > 1:
            named = f"{len(ids)} deleted connections are named {shown(ref)}"
            raise UsageError(f"{named}: {', '.join(ids)}; pass one of the ids")
        if ids:
            return ids[0]
    raise UnknownConnection(ref)


def is_unknown_connection(error: grpc.RpcError) -> bool:
    """True when the broker answered that a connection id is unknown (not, say, a missing grant)."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else ""
    return code == grpc.StatusCode.NOT_FOUND and _NOT_FOUND.fullmatch(details or "") is not None


def _named(admin: Any, name: str, status: broker_pb2.ConnectionStatus, timeout: float) -> list[str]:
    request = broker_pb2.ListConnectionsRequest(name_prefix=name, status=status, page_size=_PAGE)
    return [c.id for c in pages(admin.ListConnections, request, "connections", timeout) if c.name == name]
