"""`brokerctl`: the admin client. One subcommand per AdminService call, plus `resolve`.

Exit status: 0 on success, 1 when the broker returned an error (or could not be
reached), 2 for a usage problem found before any call (bad flags, missing files).
"""

from __future__ import annotations

import os

# grpc's core reads this once, on import: keep its info lines (a failed TLS handshake is
# logged twice otherwise) out of a terminal tool's output. GRPC_VERBOSITY=INFO brings them back.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import datetime as dt
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from broker._proto import broker_pb2
from broker.cli import _ctl_settings
from broker.cli import _output as out
from broker.cli._ctl_args import build_parser
from broker.cli._input import (
    UsageError,
    parse_config,
    parse_duration,
    parse_labels,
    parse_secrets,
    parse_time,
)
from broker.cli._oauth_callback import CallbackListener, Redirect, parse_redirect
from broker.cli._rpc import Session, describe_error

PROG = "brokerctl"
_MAX_PAGE = 1000
_VERIFY_TIMEOUT = 600.0
_STATUS = {
    "active": broker_pb2.CONNECTION_STATUS_ACTIVE,
    "revoked": broker_pb2.CONNECTION_STATUS_REVOKED,
    "deleted": broker_pb2.CONNECTION_STATUS_DELETED,
}

Handler = Callable[[argparse.Namespace, Session], int]


def main(argv: list[str] | None = None) -> int:
    """Run one brokerctl command; returns the exit status."""
    args = build_parser().parse_args(argv)
    session: Session | None = None
    try:
        session = open_session(args)
        return HANDLERS[args.command](args, session)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        assert session is not None  # no call is made without one
        for line in describe_error(exc, session.addr, PROG, timeout=session.timeout):
            print(line, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if session is not None:
            session.close()


def open_session(args: argparse.Namespace) -> Session:
    """Channels for the admin and the executor identity, as flags, BROKER_* variables and a profile say."""
    settings = _ctl_settings.resolve(args, os.environ, _ctl_settings.profile_file(os.environ))
    return Session(
        settings.addr,
        settings.admin,
        settings.resolve_addr,
        settings.executor,
        timeout=settings.timeout,
        server_name=settings.server_name,
    )


def _types(args: argparse.Namespace, s: Session) -> int:
    reply = s.admin.ListConnectionTypes(broker_pb2.ListConnectionTypesRequest(), timeout=s.timeout)
    return _show(args, reply, out.render_types)


def _create(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.CreateConnectionRequest(
        name=args.name,
        type=args.type,
        provider=args.provider,
        labels=parse_labels(args.label),
    )
    request.config.update(parse_config(args.config, args.config_json))
    request.test_before_save = args.test
    # Secrets last: a prompt should come only once everything else on the line is known good.
    request.secrets.update(parse_secrets(args.secret, PROG))
    reply = s.admin.CreateConnection(request, timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _get(args: argparse.Namespace, s: Session) -> int:
    reply = s.admin.GetConnection(broker_pb2.GetConnectionRequest(id=args.id), timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _list(args: argparse.Namespace, s: Session) -> int:
    if not 0 <= args.page_size <= _MAX_PAGE:
        raise UsageError(f"--page-size must be between 1 and {_MAX_PAGE}")
    request = broker_pb2.ListConnectionsRequest(
        type=args.type,
        provider=args.provider,
        status=_STATUS[args.status] if args.status else broker_pb2.CONNECTION_STATUS_UNSPECIFIED,
        labels=parse_labels(args.label),
        name_prefix=args.name_prefix,
        page_size=args.page_size,
        page_token=args.page_token,
    )
    if args.all:
        connections = list(_pages(s.admin.ListConnections, request, "connections", s.timeout))
        reply = broker_pb2.ListConnectionsResponse(connections=connections)
    else:
        reply = s.admin.ListConnections(request, timeout=s.timeout)
    _show(args, reply, lambda r: out.render_connections(r.connections))
    if reply.next_page_token and not args.json:
        print(f"{PROG}: more: add --page-token {reply.next_page_token}, or use --all", file=sys.stderr)
    return 0


def _update(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.UpdateConnectionRequest(
        id=args.id, etag=args.etag, clear_secrets=args.clear_secret, test_before_save=args.test
    )
    if args.name is not None:
        request.name = args.name
    if args.config or args.config_json is not None:
        request.config.SetInParent()
        request.config.update(parse_config(args.config, args.config_json))
    if args.label is not None or args.clear_labels:
        if args.label and args.clear_labels:
            raise UsageError("--label and --clear-labels do not go together")
        request.labels.SetInParent()
        request.labels.values.update(parse_labels(args.label or []))
    if args.secret:
        request.secrets.update(parse_secrets(args.secret, PROG))
    if not (request.HasField("name") or request.HasField("config") or request.HasField("labels")) and not (
        request.secrets or request.clear_secrets
    ):
        raise UsageError("nothing to update: give --name, --config, --secret, --clear-secret or --label")
    reply = s.admin.UpdateConnection(request, timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _delete(args: argparse.Namespace, s: Session) -> int:
    reply = s.admin.DeleteConnection(broker_pb2.DeleteConnectionRequest(id=args.id), timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _restore(args: argparse.Namespace, s: Session) -> int:
    reply = s.admin.RestoreConnection(broker_pb2.RestoreConnectionRequest(id=args.id), timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _purge(args: argparse.Namespace, s: Session) -> int:
    if not args.yes and not _confirm(f"Purge {args.id} and its secrets for good? This cannot be undone."):
        print(f"{PROG}: not purged", file=sys.stderr)
        return 1
    reply = s.admin.PurgeConnection(broker_pb2.PurgeConnectionRequest(id=args.id), timeout=s.timeout)
    return _show(args, reply, lambda r: f"purged {r.id}")


def _revoke(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.RevokeConnectionRequest(id=args.id, reason=args.reason)
    reply = s.admin.RevokeConnection(request, timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _grant(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.GrantAccessRequest(connection_id=args.id, principal=args.principal)
    now = dt.datetime.now(dt.UTC)
    if args.expires_in:
        request.expires_at.FromDatetime(now + parse_duration(args.expires_in))
    elif args.expires_at:
        request.expires_at.FromDatetime(parse_time(args.expires_at, now))
    reply = s.admin.GrantAccess(request, timeout=s.timeout)
    return _show(args, reply, lambda g: out.render_grants([g]))


def _ungrant(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.RevokeAccessRequest(connection_id=args.id, principal=args.principal)
    reply = s.admin.RevokeAccess(request, timeout=s.timeout)
    return _show(args, reply, lambda _: f"{args.principal} can no longer resolve {args.id}")


def _grants(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.ListGrantsRequest(connection_id=args.connection, principal=args.principal)
    grants = list(_pages(s.admin.ListGrants, request, "grants", s.timeout))
    return _show(args, broker_pb2.ListGrantsResponse(grants=grants), lambda r: out.render_grants(r.grants))


def _audit(args: argparse.Namespace, s: Session) -> int:
    if args.audit_command == "verify":
        return _audit_verify(args, s)
    if args.audit_command == "export":
        return _audit_export(args, s)
    request = broker_pb2.ListAuditEventsRequest(
        connection_id=args.connection, actor=args.actor, action=args.action
    )
    events = _recent_events(args, s, s.admin.ListAuditEvents, request)
    reply = broker_pb2.ListAuditEventsResponse(events=events)
    return _show(args, reply, lambda r: out.render_audit(r.events))


def _recent_events(args: argparse.Namespace, s: Session, call: Any, request: Any) -> list[Any]:
    """Up to --limit events of a paged listing, within --since/--until."""
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    now = dt.datetime.now(dt.UTC)
    request.page_size = min(args.limit, _MAX_PAGE)
    if args.since:
        request.start_time.FromDatetime(parse_time(args.since, now, relative=True))
    if args.until:
        request.end_time.FromDatetime(parse_time(args.until, now, relative=True))
    events: list[Any] = []
    for event in _pages(call, request, "events", s.timeout):
        events.append(event)
        if len(events) >= args.limit:
            break
    return events


def _audit_verify(args: argparse.Namespace, s: Session) -> int:
    """Exit 0 when the chain is intact, 1 when it is broken (the first broken event is printed)."""
    request = broker_pb2.VerifyAuditLogRequest()
    reply = s.admin.VerifyAuditLog(request, timeout=max(s.timeout, _VERIFY_TIMEOUT))
    _show(args, reply, out.render_verify)
    return 0 if reply.ok else 1


def _audit_export(args: argparse.Namespace, s: Session) -> int:
    """Events oldest first as JSON lines on stdout; the count on stderr."""
    now = dt.datetime.now(dt.UTC)
    request = broker_pb2.ExportAuditEventsRequest(connection_id=args.connection)
    request.start_time.FromDatetime(parse_time(args.since, now, relative=True))
    if args.until:
        request.end_time.FromDatetime(parse_time(args.until, now, relative=True))
    count = 0
    # No deadline: a long export must not be cut off halfway; Ctrl-C stops it.
    for event in s.admin.ExportAuditEvents(request, timeout=None):
        sys.stdout.write(out.json_line(event) + "\n")
        count += 1
    sys.stdout.flush()
    print(f"{PROG}: exported {count} events", file=sys.stderr)
    return 0


def _resolve(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.ResolveRequest(purpose=args.purpose, known_secret_version=args.known_version)
    if args.by_name:
        request.name = args.ref
    else:
        request.connection_id = args.ref
    reply = s.resolver.Resolve(request, timeout=s.timeout)
    return _show(args, reply, out.render_resolved)


def _connection_id(s: Session, ref: str) -> str:
    """An id as given, or the id of the live connection with that exact name."""
    if ref.startswith("conn_"):
        return ref
    request = broker_pb2.ListConnectionsRequest(name_prefix=ref, page_size=_MAX_PAGE)
    for connection in _pages(s.admin.ListConnections, request, "connections", s.timeout):
        if connection.name == ref:
            return str(connection.id)
    raise UsageError(f"no connection named {ref!r} (or pass its id)")


def _draft(args: argparse.Namespace, name: str = "draft", type_: str = "") -> broker_pb2.ConnectionDraft:
    """A connection from --provider/--config/--secret (and --type unless `type_` is given), not stored."""
    draft = broker_pb2.ConnectionDraft(name=name, type=type_ or args.type, provider=args.provider)
    draft.config.update(parse_config(args.config, args.config_json))
    draft.secrets.update(parse_secrets(args.secret, PROG))
    return draft


def _target(args: argparse.Namespace, s: Session) -> dict[str, Any]:
    """`id=` for a stored connection, `draft=` for --type; exactly one of the two."""
    if args.draft and not args.type:
        raise UsageError("--draft needs --type (and --config/--secret as for create)")
    if bool(args.ref) == bool(args.type):
        raise UsageError("give a stored connection (ID_OR_NAME) or a draft (--type ...), not both or neither")
    return {"id": _connection_id(s, args.ref)} if args.ref else {"draft": _draft(args)}


def _test(args: argparse.Namespace, s: Session) -> int:
    reply = s.admin.TestConnection(broker_pb2.TestConnectionRequest(**_target(args, s)), timeout=s.timeout)
    _show(args, reply, out.render_test_result)
    return 0 if reply.success else 1


def _mcp(args: argparse.Namespace, s: Session) -> int:
    if args.mcp_command == "tools":
        request = broker_pb2.ListMcpToolsRequest(id=_connection_id(s, args.ref))
        reply = s.admin.ListMcpTools(request, timeout=s.timeout)
        return _show(args, reply, lambda r: out.render_tools(r.tools))
    if args.mcp_command == "refresh":
        refresh = broker_pb2.RefreshMcpToolsRequest(id=_connection_id(s, args.ref))
        changes = s.admin.RefreshMcpTools(refresh, timeout=s.timeout)
        _show(args, changes, out.render_tool_changes)
        return 0 if changes.result.success else 1
    discovered = s.admin.DiscoverMcpTools(
        broker_pb2.DiscoverMcpToolsRequest(**_target(args, s)), timeout=s.timeout
    )
    _show(args, discovered, lambda r: out.render_test_result(r.result) + "\n\n" + out.render_tools(r.tools))
    return 0 if discovered.result.success else 1


def _oauth(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.BeginAuthorizationRequest(scopes=args.scope)
    if args.oauth_command == "connect":
        request.draft.CopyFrom(_draft(args, name=args.name, type_="oauth2"))
        request.labels.update(parse_labels(args.label))
    else:
        request.connection_id = _connection_id(s, args.ref)
    if args.paste:
        request.redirect_uri = f"http://127.0.0.1:{args.port or 8976}/callback"
        redirect = _begin_and_wait(s, request, None, args.wait)
    else:
        with CallbackListener(args.port) as listener:
            request.redirect_uri = listener.redirect_uri
            redirect = _begin_and_wait(s, request, listener, args.wait)
    complete = broker_pb2.CompleteAuthorizationRequest(state=redirect.state, code=redirect.code)
    reply = s.admin.CompleteAuthorization(complete, timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _begin_and_wait(
    s: Session, request: broker_pb2.BeginAuthorizationRequest, listener: CallbackListener | None, wait: float
) -> Redirect:
    begun = s.admin.BeginAuthorization(request, timeout=s.timeout)
    print(
        f"Open this URL in a browser and sign in:\n\n  {begun.authorization_url}\n",
        file=sys.stderr,
        flush=True,
    )
    if listener is not None:
        print(f"Waiting for the redirect to {listener.redirect_uri} ...", file=sys.stderr, flush=True)
        redirect = listener.wait(wait)
    else:
        print("Then paste the URL your browser was sent to:", file=sys.stderr, flush=True)
        redirect = parse_redirect(sys.stdin.readline())
    if redirect.state != begun.state:
        raise UsageError("the redirect's state does not match this authorization; start again")
    return redirect


def _reinstate(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.ReinstateConnectionRequest(id=args.id, reason=args.reason)
    reply = s.admin.ReinstateConnection(request, timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _security(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.ListSecurityEventsRequest(
        rule=args.rule, connection_id=args.connection, principal=args.principal
    )
    events = _recent_events(args, s, s.admin.ListSecurityEvents, request)
    reply = broker_pb2.ListSecurityEventsResponse(events=events)
    return _show(args, reply, lambda r: out.render_security_events(r.events))


_ROTATE_HINTS = {
    grpc.StatusCode.PERMISSION_DENIED: "the admin identity in use (--cert, default DIR/tls/admin.pem) "
    "must be listed in the broker's master_key.operators",
    grpc.StatusCode.FAILED_PRECONDITION: "rotation needs a broker with master_key.dir that it can write "
    "to; `broker keys init --import` moves a single key file into one",
}


def _keys(args: argparse.Namespace, s: Session) -> int:
    """`keys rotate`: the only keys command served by the broker; the rest are `broker keys`."""
    try:
        reply = s.admin.RotateMasterKey(broker_pb2.RotateMasterKeyRequest(), timeout=s.timeout)
    except grpc.RpcError as exc:
        hint = _ROTATE_HINTS.get(exc.code()) if hasattr(exc, "code") else None
        if hint is None:
            raise
        for line in describe_error(exc, s.addr, PROG):
            print(line, file=sys.stderr)
        print(f"{PROG}: hint: {hint}", file=sys.stderr)
        return 1
    _show(args, reply, out.render_rotated)
    print(
        f"{PROG}: {reply.active_kek_id} is now the active master key (was {reply.previous_kek_id}). "
        "Other replicas switch within seconds (they log master_key_activated); "
        "then run `broker keys rewrap`.",
        file=sys.stderr,
    )
    return 0


HANDLERS: dict[str, Handler] = {
    "types": _types,
    "create": _create,
    "get": _get,
    "list": _list,
    "update": _update,
    "delete": _delete,
    "restore": _restore,
    "purge": _purge,
    "revoke": _revoke,
    "grant": _grant,
    "ungrant": _ungrant,
    "grants": _grants,
    "audit": _audit,
    "resolve": _resolve,
    "test": _test,
    "mcp": _mcp,
    "oauth": _oauth,
    "reinstate": _reinstate,
    "security": _security,
    "keys": _keys,
}


def _show(args: argparse.Namespace, reply: Any, render: Callable[[Any], str]) -> int:
    text = out.to_json(reply) if args.json else render(reply)
    if text:
        print(text)
    return 0


def _pages(call: Any, request: Any, field: str, timeout: float) -> Iterator[Any]:
    """Every item of a paged List call, following `next_page_token`."""
    while True:
        reply = call(request, timeout=timeout)
        yield from getattr(reply, field)
        if not reply.next_page_token:
            return
        request.page_token = reply.next_page_token


def _confirm(question: str) -> bool:
    # The prompt goes to stderr so that stdout stays clean for --json consumers.
    if not sys.stdin.isatty():
        raise UsageError("purge cannot be undone; pass --yes to confirm when not at a terminal")
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


if __name__ == "__main__":
    sys.exit(main())
