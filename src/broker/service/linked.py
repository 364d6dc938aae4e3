"""MCP connections that authenticate with an oauth2 connection's token (`auth_type` oauth2).

The MCP authorization spec has a client obtain a token for the server from the server's
authorization server (with an RFC 8707 resource indicator naming the server) and keep it fresh.
An `oauth2` connection already does all of that, so an `mcp` connection names one
(`oauth_connection`) and borrows its access token for each session: refreshed as for that
connection (`TokenRefresher`), never stored on the MCP connection, never released by Resolve.

The link holds only while the oauth2 connection is active and its `resource` indicators list the
MCP server's URL: the token was asked for that server, so no other server is ever sent it. (A
change of `resource` drops the oauth2 connection's tokens, `ConnectionService.update`, so the
tokens it holds were always asked for the indicators it lists.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.errors import FailedPrecondition, InvalidArgument
from broker.model import ConnectionRecord, ConnectionStatus
from broker.sensitive import SecretFields
from broker.store import ConnectionStore

LINK = "oauth_connection"


class LinkBroken(FailedPrecondition):
    """The oauth2 connection an MCP connection takes its token from can no longer give it one."""


def is_linked(type_: str, config: Mapping[str, Any]) -> bool:
    """Whether the connection takes its bearer token from an oauth2 connection."""
    return type_ == "mcp" and config.get("auth_type") == "oauth2"


async def _find(connections: ConnectionStore, tenant: str, ref: str) -> ConnectionRecord | None:
    """The connection with this id (deleted or not), else the live one with this name; another
    tenant's is none."""
    record = await connections.get_connection(tenant, ref)
    return record or await connections.find_connection_by_name(tenant, ref)


def _problem(record: ConnectionRecord | None, server_url: str) -> str:
    if record is None:
        return "names no oauth2 connection of this tenant (by id or by name)"
    if not record.live:
        return f"names connection {record.id}, which is deleted"
    if record.type != "oauth2":
        return f"names a {record.type} connection ({record.id}); it must name an oauth2 connection"
    listed = [str(uri) for uri in record.config.get("resource") or []]
    if server_url not in listed:
        # Both URLs first, the remedy last: a field violation is clipped to 200 characters, and
        # the usual mistake (localhost for 127.0.0.1, a trailing slash) shows only side by side.
        return (
            f"names {record.id}, whose resource indicators do not list {server_url}, "
            + (f"only {', '.join(listed)}" if listed else "none at all")
            + ": set server_url to one, or add it there and sign in again"
        )
    return ""


async def link(connections: ConnectionStore, tenant: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """At create and update: the config with `oauth_connection` made the linked connection's id;
    INVALID_ARGUMENT naming the field when it names no oauth2 connection whose tokens are for
    this server."""
    record = await _find(connections, tenant, str(config[LINK]))
    problem = _problem(record, str(config["server_url"]))
    if problem:
        raise InvalidArgument.field(f"config.{LINK}", problem)
    assert record is not None
    return {**dict(config), LINK: record.id}


async def linked_connection(
    connections: ConnectionStore, tenant: str, config: Mapping[str, Any]
) -> ConnectionRecord:
    """At use: the active oauth2 connection to take the token from; `LinkBroken` saying why not."""
    return still_linked(await _find(connections, tenant, str(config[LINK])), config)


def still_linked(record: ConnectionRecord | None, config: Mapping[str, Any]) -> ConnectionRecord:
    """`record` if the MCP connection with `config` may take its token; `LinkBroken` saying why not.
    Asked again of the record a refresh returns: it may carry a change stored meanwhile."""
    problem = _problem(record, str(config["server_url"]))
    if problem:
        raise LinkBroken(f"this MCP connection's {LINK} {problem}")
    assert record is not None
    status = record.presented_status
    if status is not ConnectionStatus.ACTIVE:
        raise LinkBroken(
            f"the oauth2 connection {record.id} this MCP connection takes its token from is {status.value}"
        )
    return record


def bearer(secrets: SecretFields) -> SecretFields:
    """Of an oauth2 connection's secrets, the access token only: what an MCP session sends."""
    return SecretFields({"access_token": secrets.reveal().get("access_token", "")})
