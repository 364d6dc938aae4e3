"""`brokerctl`: the admin client. One subcommand per AdminService call, plus `resolve`.

Exit status: 0 on success; 1 when the call failed (the broker refused it or could not be
reached, or no connection has the id or name given) or the verdict is negative (`test`
failed, `audit verify` found a break); 2 for a usage problem (bad flags or values, unreadable
files, a prompt with no terminal); 130 when interrupted (Ctrl-C); 141 when standard output
was closed early, as by `| head`: like a Unix tool killed by SIGPIPE, it stops quietly.
No traceback reaches the user in any of these. With --json, errors are a JSON object on
standard error.
"""

from __future__ import annotations

import os

# grpc's core reads this once, on import: keep its info lines (a failed TLS handshake is
# logged twice otherwise) out of a terminal tool's output. GRPC_VERBOSITY=INFO brings them back.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import contextlib
import datetime as dt
import json
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any

import grpc

from broker._proto import broker_pb2
from broker.cli import _ctl_settings
from broker.cli import _mcp_oauth as mcp_oauth
from broker.cli import _output as out
from broker.cli._ctl_args import ArgumentsError, build_parser
from broker.cli._input import (
    UsageError,
    parse_config,
    parse_duration,
    parse_labels,
    parse_secrets,
    parse_time,
    read_data,
    standard_input,
)
from broker.cli._json import json_line, to_json
from broker.cli._oauth_callback import CallbackListener, Redirect, parse_redirect
from broker.cli._refs import (
    NameTaken,
    UnknownConnection,
    check_name_free,
    connection_id,
    is_unknown_connection,
    looks_like_id,
)
from broker.cli._rpc import Session, describe_error, error_doc, pages

PROG = "brokerctl"
_MAX_PAGE = 1000
_VERIFY_TIMEOUT = 600.0
_SIGPIPE_STATUS = 128 + 13
_STATUS = {
    "active": broker_pb2.CONNECTION_STATUS_ACTIVE,
    "revoked": broker_pb2.CONNECTION_STATUS_REVOKED,
    "deleted": broker_pb2.CONNECTION_STATUS_DELETED,
}
_LEASE_STATE = {
    "active": broker_pb2.LEASE_STATE_ACTIVE,
    "revoking": broker_pb2.LEASE_STATE_REVOKING,
    "revoked": broker_pb2.LEASE_STATE_REVOKED,
    "creating": broker_pb2.LEASE_STATE_CREATING,
}

Handler = Callable[[argparse.Namespace, Session], int]

# The label `oauth connect --mcp-server` puts on a connection whose client it registered: the one
# redirect URI that client has, which `oauth reauthorize` uses again (a listener's URI only).
REDIRECT_LABEL = "brokerctl/redirect_uri"
_REGISTERED_REDIRECT = re.compile(r"http://127\.0\.0\.1:([0-9]{1,5})/callback")


def main(argv: list[str] | None = None) -> int:
    """Run one brokerctl command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        try:
            args = build_parser(raising=True).parse_args(argv)
        except ArgumentsError as exc:
            # argparse stops before --json is known: the word on the line decides.
            _print_usage_error(exc, as_json="--json" in argv)
            return 2
        return _run(args)
    except KeyboardInterrupt:
        # The newline ends a half-typed prompt line; the shell shows the status.
        print(file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    session: Session | None = None
    try:
        session = open_session(args)
        status = HANDLERS[args.command](args, session)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at exit
        return status
    except UsageError as exc:
        _print_error(args.json, {"code": "USAGE", "message": str(exc)}, f"{PROG}: error: {exc}")
        return 2
    except UnknownConnection as exc:
        return _unknown(args, exc)
    except NameTaken as exc:
        _print_error(args.json, {"code": "ALREADY_EXISTS", "message": exc.message}, f"{PROG}: {exc.message}")
        return 1
    except mcp_oauth.DiscoveryError as exc:
        doc = {"code": "DISCOVERY_FAILED", "message": exc.message, "url": exc.url}
        _print_error(args.json, doc, f"{PROG}: error: {exc.message}")
        return 1
    except grpc.RpcError as exc:
        if _ref_given(args) and is_unknown_connection(exc):
            # The broker's words for an unknown id, in the words used for an unknown name.
            return _unknown(args, UnknownConnection(_ref_given(args)))
        assert session is not None  # no call is made without one
        addr, timeout, name = session.addr, session.timeout, session.server_name
        lines = describe_error(exc, addr, PROG, timeout=timeout, server_name=name)
        _print_error(args.json, error_doc(exc, addr, timeout=timeout, server_name=name), *lines)
        return 1
    except BrokenPipeError:
        # The reader is gone (`| head`). Point stdout at /dev/null so that the flush at exit
        # cannot fail again, and stop quietly with the status a SIGPIPE death would give.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return _SIGPIPE_STATUS
    finally:
        if session is not None:
            session.close()


def _print_error(as_json: bool, doc: dict[str, Any], *lines: str) -> None:
    """An error on stderr: `doc` as one JSON object with --json, else the text `lines`."""
    if as_json:
        print(json.dumps(doc, sort_keys=True), file=sys.stderr)
    else:
        for line in lines:
            print(line, file=sys.stderr)


def _unknown(args: argparse.Namespace, exc: UnknownConnection) -> int:
    _print_error(args.json, {"code": "NOT_FOUND", "message": exc.message}, f"{PROG}: {exc.message}")
    return 1


def _print_usage_error(exc: ArgumentsError, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps({"code": "USAGE", "message": exc.message, "usage": exc.usage.strip()}), file=sys.stderr
        )
    else:
        sys.stderr.write(exc.usage)
        print(f"{exc.prog}: error: {exc.message}", file=sys.stderr)


def _ref_given(args: argparse.Namespace) -> str:
    """The connection id or name on the command line, if the command takes one."""
    return str(getattr(args, "ref", None) or getattr(args, "connection", None) or "")


def _ref(args: argparse.Namespace, s: Session, *, deleted: bool = False) -> str:
    """The id of the connection the command names (id or name); see `_refs`."""
    return connection_id(s.admin, args.ref, s.timeout, deleted=deleted)


def _filter_ref(args: argparse.Namespace, s: Session) -> str:
    """--connection as an id, for a listing: a name is looked up; an id is kept, even a purged one's."""
    return connection_id(s.admin, args.connection, s.timeout) if args.connection else ""


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
    width = shutil.get_terminal_size().columns
    if not args.type:
        return _show(args, reply, lambda r: out.render_types(r, width))
    for type_ in reply.types:
        if type_.name == args.type:
            return _show(args, type_, lambda t: out.render_type(t, width))
    known = ", ".join(t.name for t in reply.types)
    raise UsageError(f"no connection type {out.shown(args.type)}; the types are: {known}")


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
    # A deleted connection can still be shown; a live one of the same name comes first.
    reply = s.admin.GetConnection(broker_pb2.GetConnectionRequest(id=_ref(args, s)), timeout=s.timeout)
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
        connections = list(pages(s.admin.ListConnections, request, "connections", s.timeout))
        reply = broker_pb2.ListConnectionsResponse(connections=connections)
    else:
        reply = s.admin.ListConnections(request, timeout=s.timeout)
    _show(args, reply, lambda r: out.render_connections(r.connections))
    if reply.next_page_token and not args.json:
        print(f"{PROG}: more: add --page-token {reply.next_page_token}, or use --all", file=sys.stderr)
    return 0


def _update(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.UpdateConnectionRequest(
        id=_ref(args, s), etag=args.etag, clear_secrets=args.clear_secret, test_before_save=args.test
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
    reply = s.admin.DeleteConnection(broker_pb2.DeleteConnectionRequest(id=_ref(args, s)), timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _restore(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.RestoreConnectionRequest(id=_ref(args, s, deleted=True))
    reply = s.admin.RestoreConnection(request, timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _purge(args: argparse.Namespace, s: Session) -> int:
    connection = _ref(args, s, deleted=True)
    if not args.yes and not _confirm(f"Purge {connection} and its secrets for good? This cannot be undone."):
        print(f"{PROG}: not purged", file=sys.stderr)
        return 1
    reply = s.admin.PurgeConnection(broker_pb2.PurgeConnectionRequest(id=connection), timeout=s.timeout)
    return _show(args, reply, lambda r: f"purged {r.id}")


def _revoke(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.RevokeConnectionRequest(id=_ref(args, s), reason=args.reason)
    reply = s.admin.RevokeConnection(request, timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _grant(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.GrantAccessRequest(
        connection_id=_ref(args, s),
        principal=args.principal,
        mode=broker_pb2.GRANT_MODE_PROXY if args.mode == "proxy" else broker_pb2.GRANT_MODE_RESOLVE,
        scope=broker_pb2.GrantScope(methods=args.method, path_prefixes=args.path, tools=args.tool),
    )
    now = dt.datetime.now(dt.UTC)
    if args.expires_in:
        request.expires_at.FromDatetime(now + parse_duration(args.expires_in))
    elif args.expires_at:
        request.expires_at.FromDatetime(parse_time(args.expires_at, now))
    reply = s.admin.GrantAccess(request, timeout=s.timeout)
    return _show(args, reply, lambda g: out.render_grants([g], now))


def _ungrant(args: argparse.Namespace, s: Session) -> int:
    if args.all:
        return _ungrant_all(args, s)
    if args.ref is None:
        raise UsageError("ungrant needs ID_OR_NAME and PRINCIPAL, or --all PRINCIPAL")
    request = broker_pb2.RevokeAccessRequest(connection_id=_ref(args, s), principal=args.principal)
    reply = s.admin.RevokeAccess(request, timeout=s.timeout)
    return _show(args, reply, lambda _: f"{args.principal} can no longer use {args.ref}")


def _ungrant_all(args: argparse.Namespace, s: Session) -> int:
    if args.ref is not None:
        raise UsageError("ungrant --all takes the principal only, not a connection")
    request = broker_pb2.RevokeAccessRequest(principal=args.principal, every_connection=True)
    removed = s.admin.RevokeAccess(request, timeout=s.timeout).grants_removed
    if args.json:  # written out: the proto3 JSON mapping would drop a count of 0
        print(json.dumps({"grants_removed": removed}))
    elif removed:
        print(
            f"{out.shown(args.principal)} can no longer use any connection: removed {removed}"
            f" grant{'s' if removed != 1 else ''}; its leases end with them"
        )
    else:
        print(f"{out.shown(args.principal)} held no grants; nothing removed")
    return 0


def _grants(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.ListGrantsRequest(connection_id=_filter_ref(args, s), principal=args.principal)
    # The broker's clock is not in the reply; this machine's is close enough to mark and hide.
    now = dt.datetime.now(dt.UTC)
    grants = [
        g
        for g in pages(s.admin.ListGrants, request, "grants", s.timeout)
        if not (args.active and out.grant_expired(g, now))
    ]
    reply = broker_pb2.ListGrantsResponse(grants=grants)
    return _show(args, reply, lambda r: out.render_grants(r.grants, now))


def _audit(args: argparse.Namespace, s: Session) -> int:
    if args.audit_command == "verify":
        return _audit_verify(args, s)
    if args.audit_command == "export":
        return _audit_export(args, s)
    request = broker_pb2.ListAuditEventsRequest(
        connection_id=_filter_ref(args, s), actor=args.actor, action=args.action
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
    for event in pages(call, request, "events", s.timeout):
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
    request = broker_pb2.ExportAuditEventsRequest(connection_id=_filter_ref(args, s))
    request.start_time.FromDatetime(parse_time(args.since, now, relative=True))
    if args.until:
        request.end_time.FromDatetime(parse_time(args.until, now, relative=True))
    count = 0
    # No deadline: a long export must not be cut off halfway; Ctrl-C stops it.
    for event in s.admin.ExportAuditEvents(request, timeout=None):
        sys.stdout.write(json_line(event) + "\n")
        count += 1
    sys.stdout.flush()
    print(f"{PROG}: exported {count} events", file=sys.stderr)
    return 0


def _executor_ref(request: Any, ref: str, *, by_name: bool = False) -> None:
    """Set the request's `connection_id` or `name` from an id or a name, as an executor sends it.

    An executor cannot list connections, so a name goes as a name. Unknown names and ids are
    refused like any other denial (PERMISSION_DENIED), so none can be probed.
    """
    if by_name or not looks_like_id(ref):
        request.name = ref
    else:
        request.connection_id = ref


def _leases(args: argparse.Namespace, s: Session) -> int:
    if args.leases_command == "revoke":
        return _revoke_leases(args, s)
    if not 0 <= args.page_size <= _MAX_PAGE:
        raise UsageError(f"--page-size must be between 1 and {_MAX_PAGE}")
    request = broker_pb2.ListLeasesRequest(
        connection_id=_filter_ref(args, s),
        principal=args.principal,
        state=_LEASE_STATE[args.state] if args.state else broker_pb2.LEASE_STATE_UNSPECIFIED,
        run_id=args.run_id,
        page_size=args.page_size,
        page_token=args.page_token,
    )
    if args.all:
        leases = list(pages(s.admin.ListLeases, request, "leases", s.timeout))
        reply = broker_pb2.ListLeasesResponse(leases=leases)
    else:
        reply = s.admin.ListLeases(request, timeout=s.timeout)
    _show(args, reply, lambda r: out.render_leases(r.leases))
    if reply.next_page_token and not args.json:
        print(f"{PROG}: more: add --page-token {reply.next_page_token}, or use --all", file=sys.stderr)
    return 0


def _revoke_leases(args: argparse.Namespace, s: Session) -> int:
    if not (args.connection or args.principal or args.prefix or args.run_id):
        raise UsageError("leases revoke needs --connection, --principal, --prefix or --run-id")
    request = broker_pb2.RevokeLeasesRequest(
        connection_id=_filter_ref(args, s),
        principal=args.principal,
        username_prefix=args.prefix,
        run_id=args.run_id,
        abandon=args.abandon,
    )
    reply = s.admin.RevokeLeases(request, timeout=s.timeout)
    if args.abandon:
        done = f"marked {reply.revoked} leases revoked without dropping their users"
        return _show_revoked(args, reply.revoked, done)
    return _show_revoked(args, reply.revoked, f"queued {reply.revoked} leases for revocation")


def _lease(args: argparse.Namespace, s: Session) -> int:
    """`lease revoke LEASE_ID`: exit 1 when no live lease has the id (unknown, or already ended)."""
    reply = s.admin.RevokeLeases(broker_pb2.RevokeLeasesRequest(lease_id=args.lease_id), timeout=s.timeout)
    if not reply.revoked:
        message = f"no live lease {out.shown(args.lease_id)} (unknown, or already ended)"
        _print_error(args.json, {"code": "NOT_FOUND", "message": message}, f"{PROG}: {message}")
        return 1
    return _show_revoked(args, reply.revoked, f"queued lease {out.shown(args.lease_id)} for revocation")


def _show_revoked(args: argparse.Namespace, count: int, text: str) -> int:
    # Written out: the proto3 JSON mapping would drop a count of 0, and scripts read this number.
    print(json.dumps({"revoked": count}) if args.json else text)
    return 0


def _resolve(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.ResolveRequest(
        purpose=args.purpose, known_secret_version=args.known_version, run_id=args.run_id
    )
    _executor_ref(request, args.ref, by_name=args.by_name)
    reply = s.resolver.Resolve(request, timeout=s.timeout)
    return _show(args, reply, out.render_resolved)


def _proxy(args: argparse.Namespace, s: Session) -> int:
    headers = []
    for spec in args.header:
        name, colon, value = spec.partition(":")
        if not colon or not name.strip():
            raise UsageError(f"-H {spec!r}: expected 'NAME: VALUE'")
        headers.append(broker_pb2.HttpHeader(name=name.strip(), value=value.strip()))
    request = broker_pb2.ProxyHttpRequest(
        method=args.method.upper(),
        path=args.path,
        query=args.query,
        headers=headers,
        body=read_data(args.data),
        purpose=args.purpose,
    )
    _executor_ref(request, args.ref)
    reply = s.proxy.ProxyHttp(request, timeout=s.timeout)
    if args.json:
        print(to_json(reply))
    else:
        if args.include:
            lines = [f"HTTP {reply.status}", *(f"{h.name}: {h.value}" for h in reply.headers), ""]
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
        sys.stdout.buffer.write(reply.body)
        sys.stdout.buffer.flush()
    return 0 if reply.status < 400 else 1


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
    return {"id": _ref(args, s)} if args.ref else {"draft": _draft(args)}


def _test(args: argparse.Namespace, s: Session) -> int:
    reply = s.admin.TestConnection(broker_pb2.TestConnectionRequest(**_target(args, s)), timeout=s.timeout)
    _show(args, reply, out.render_test_result)
    return 0 if reply.success else 1


def _mcp(args: argparse.Namespace, s: Session) -> int:
    if args.mcp_command == "call":
        call = broker_pb2.CallMcpToolRequest(tool=args.tool, purpose=args.purpose)
        call.arguments.update(parse_config(args.arg, args.arg_json, flag="--arg"))
        _executor_ref(call, args.ref)
        result = s.proxy.CallMcpTool(call, timeout=s.timeout)
        _show(args, result, out.render_tool_call)
        return 1 if result.is_error else 0
    if args.mcp_command == "tools":
        request = broker_pb2.ListMcpToolsRequest(id=_ref(args, s))
        reply = s.admin.ListMcpTools(request, timeout=s.timeout)
        return _show(args, reply, lambda r: out.render_tools(r.tools))
    if args.mcp_command == "refresh":
        refresh = broker_pb2.RefreshMcpToolsRequest(id=_ref(args, s))
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
    mcp_server = getattr(args, "mcp_server", "")
    if args.oauth_command == "connect":
        if args.client_id and not mcp_server:
            raise UsageError("--client-id goes with --mcp-server; otherwise use --config client_id=ID")
        if not mcp_server:
            request.draft.CopyFrom(_draft(args, name=args.name, type_="oauth2"))
        request.labels.update(parse_labels(args.label))
        if mcp_server:
            # Before discovery: a client registered for a name the broker then refuses would stay
            # registered at the authorization server for nothing. (Begin checks again.)
            check_name_free(s.admin, args.name, s.timeout)
    else:
        request.connection_id = _ref(args, s)
    port = args.port or (0 if args.oauth_command == "connect" else _registered_port(s, request.connection_id))
    with contextlib.ExitStack() as stack:
        listener = None if args.paste else stack.enter_context(CallbackListener(port))
        pasted = f"http://127.0.0.1:{port or 8976}/callback"
        request.redirect_uri = listener.redirect_uri if listener else pasted
        if mcp_server:
            # Discovered now: a registered client's redirect URI must be the one this run uses.
            request.draft.CopyFrom(_mcp_draft(args, request.redirect_uri))
            if not args.client_id:
                # Kept for `oauth reauthorize`: many authorization servers take only the redirect
                # URI a client registered, port included (RFC 8252 7.3 asks them not to insist).
                request.labels[REDIRECT_LABEL] = request.redirect_uri
        redirect = _begin_and_wait(s, request, listener, args.wait)
    complete = broker_pb2.CompleteAuthorizationRequest(
        state=redirect.state, code=redirect.code, iss=redirect.iss
    )
    reply = s.admin.CompleteAuthorization(complete, timeout=s.timeout)
    _show(args, reply, out.render_connection)
    if mcp_server:
        command = mcp_oauth.mcp_connection_command(args.name, mcp_server)
        print(f"{PROG}: now create the MCP connection that uses it:\n\n  {command}\n", file=sys.stderr)
    return 0


def _registered_port(s: Session, connection_id: str) -> int:
    """The loopback port of the redirect URI `oauth connect --mcp-server` registered the
    connection's client with (its REDIRECT_LABEL); 0 (any free port) when it did not."""
    reply = s.admin.GetConnection(broker_pb2.GetConnectionRequest(id=connection_id), timeout=s.timeout)
    found = _REGISTERED_REDIRECT.fullmatch(reply.labels.get(REDIRECT_LABEL, ""))
    return int(found[1]) if found and 0 < int(found[1]) < 65536 else 0


def _mcp_draft(args: argparse.Namespace, redirect_uri: str) -> broker_pb2.ConnectionDraft:
    """The oauth2 draft for `--mcp-server`: endpoints and client found by `_mcp_oauth`."""
    config = parse_config(args.config, args.config_json)
    secrets = parse_secrets(args.secret, PROG)
    with mcp_oauth.open_client() as client:
        found = mcp_oauth.settings(
            client,
            args.mcp_server,
            name=args.name,
            redirect_uri=redirect_uri,
            client_id=args.client_id,
            secrets=secrets,
            scopes=args.scope,
            config=config,
            say=lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True),
        )
    draft = broker_pb2.ConnectionDraft(name=args.name, type="oauth2", provider="custom")
    draft.config.update(found.config)
    draft.secrets.update(found.secrets)
    return draft


def _begin_and_wait(
    s: Session, request: broker_pb2.BeginAuthorizationRequest, listener: CallbackListener | None, wait: float
) -> Redirect:
    begun = s.admin.BeginAuthorization(request, timeout=s.timeout)
    if listener is not None:
        listener.expect(begun.state)
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
        redirect = parse_redirect(standard_input("--paste").readline())
    if redirect.state != begun.state:
        raise UsageError("the redirect's state does not match this authorization; start again")
    return redirect


def _reinstate(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.ReinstateConnectionRequest(id=_ref(args, s), reason=args.reason)
    reply = s.admin.ReinstateConnection(request, timeout=s.timeout)
    return _show(args, reply, out.render_connection)


def _security(args: argparse.Namespace, s: Session) -> int:
    request = broker_pb2.ListSecurityEventsRequest(
        rule=args.rule, connection_id=_filter_ref(args, s), principal=args.principal
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
        doc = error_doc(exc, s.addr, timeout=s.timeout) | {"hint": hint}
        _print_error(args.json, doc, *describe_error(exc, s.addr, PROG), f"{PROG}: hint: {hint}")
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
    "proxy": _proxy,
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
    "leases": _leases,
    "lease": _lease,
}


def _show(args: argparse.Namespace, reply: Any, render: Callable[[Any], str]) -> int:
    text = to_json(reply) if args.json else render(reply)
    if text:
        print(text)
    return 0


def _confirm(question: str) -> bool:
    # The prompt goes to stderr so that stdout stays clean for --json consumers.
    if sys.stdin is None or not sys.stdin.isatty():
        raise UsageError("purge cannot be undone; pass --yes to confirm when not at a terminal")
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


if __name__ == "__main__":
    sys.exit(main())
