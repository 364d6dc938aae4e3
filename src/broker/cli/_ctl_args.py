"""The `brokerctl` command line: global options and one subcommand per AdminService call (and resolve)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn

from broker.config import DEFAULT_ADMIN_ADDR, DEFAULT_RESOLVE_ADDR

DEFAULT_DATA_DIR = Path(".broker-dev")

_EPILOG = """\
examples:
  brokerctl types
  brokerctl create orders-db --type database --config driver=postgresql \\
      --config host=db.internal --config database=orders --config username=app --secret password
  brokerctl list --label team=payments
  brokerctl grant orders-db spiffe://broker.local/tenant/default/executor/demo --expires-in 7d
  brokerctl ungrant --all spiffe://broker.local/tenant/default/executor/demo
  brokerctl audit --connection orders-db --since 1h
  brokerctl audit verify
  brokerctl audit export --since 30d > audit.jsonl
  brokerctl leases --connection orders-db --state active
  brokerctl leases revoke --run-id nightly-42

A connection is named by its id or its name (ID_OR_NAME), for every command.

Files default to the layout `broker dev` creates in --data-dir: tls/ca.pem, tls/admin.pem,
tls/admin-key.pem, and tls/executor.pem for `resolve`.

exit status:
  0    success
  1    the call failed (the broker refused it or could not be reached, or an unknown
       connection), or a negative verdict: `test` failed, `audit verify` found a break
  2    usage: bad flags or values, unreadable files, no terminal for a prompt
  130  interrupted (Ctrl-C)
  141  standard output closed early (e.g. `| head`): stopped quietly, as Unix tools do
With --json, errors are one JSON object on standard error: {"code", "message",
"violations" (INVALID_ARGUMENT only), "hint" (when there is one)}; usage errors have code USAGE,
a refused `oauth connect --mcp-server` discovery DISCOVERY_FAILED (with the "url" at fault).
"""

_SEALED_FIELD_HELP = (
    "a secret field: field=@FILE reads a file (one trailing newline dropped; @- is stdin), "
    "a bare field prompts without echo, field=VALUE works but lands in shell history (repeatable)"
)
_CONFIG_HELP = (
    "a config field; VALUE is parsed as JSON when it can be (5432, true, [..]), else text (repeatable)"
)


_TEST_BEFORE_SAVE_HELP = "test first; save only if the test passes (the result is shown either way)"


class ArgumentsError(Exception):
    """argparse refused the command line; `usage` is the usage of the (sub)command at fault."""

    def __init__(self, usage: str, prog: str, message: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.prog = prog
        self.message = message


class _RaisingParser(argparse.ArgumentParser):
    """Raises instead of printing: `main` prints the error as text or, with --json, as JSON."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentsError(self.format_usage(), self.prog, message)


def build_parser(*, raising: bool = False) -> argparse.ArgumentParser:
    """The full parser; each subcommand sets `command` to its name.

    With `raising`, a bad command line raises `ArgumentsError` (subcommands too) rather than
    printing and exiting as argparse does.
    """
    parser_class = _RaisingParser if raising else argparse.ArgumentParser
    parser = parser_class(
        prog="brokerctl",
        description="Manage the broker's connections, grants and audit trail over mTLS.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, suppress=False)
    # The same options on every subcommand (without defaults, so they do not clobber the
    # top-level values) let users write `brokerctl list --json` as well as `brokerctl --json list`.
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    p = command("types", "List the connection types; with TYPE, each field of that type.")
    p.add_argument(
        "type", nargs="?", metavar="TYPE", help="show each field: kind, required, default, allowed values"
    )

    p = command("create", "Create a connection; secrets are sealed and never shown again.")
    p.add_argument("name")
    p.add_argument("--type", required=True, help="connection type (see `brokerctl types`)")
    p.add_argument(
        "--provider", default="", help="provider, for types that take one (e.g. openai for api_key)"
    )
    _add_config_options(p)
    p.add_argument(
        "--secret", action="append", default=[], metavar="FIELD[=VALUE|=@FILE]", help=_SEALED_FIELD_HELP
    )
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeatable)")
    p.add_argument("--test", action="store_true", help=_TEST_BEFORE_SAVE_HELP)

    p = command("get", "Show a connection (secret field names only, never values).")
    _add_ref(p)

    p = command("list", "List connections.")
    p.add_argument("--type", default="")
    p.add_argument("--provider", default="")
    p.add_argument("--status", choices=("active", "revoked", "deleted"), help="default: active and revoked")
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="must match (repeatable)"
    )
    p.add_argument("--name-prefix", default="")
    p.add_argument("--page-size", type=int, default=0, help="1..1000 (server default 100)")
    p.add_argument("--page-token", default="", help="continue from a previous page")
    p.add_argument("--all", action="store_true", help="follow page tokens to the end")

    p = command("update", "Change a connection; only the given parts change.")
    _add_ref(p)
    p.add_argument("--name", help="a new name")
    _add_config_options(p, extra=" KEY=null removes the key.")
    p.add_argument(
        "--secret", action="append", default=[], metavar="FIELD[=VALUE|=@FILE]", help=_SEALED_FIELD_HELP
    )
    p.add_argument(
        "--clear-secret", action="append", default=[], metavar="FIELD", help="remove a secret field"
    )
    p.add_argument(
        "--label", action="append", metavar="KEY=VALUE", help="replaces ALL labels with the ones given"
    )
    p.add_argument("--clear-labels", action="store_true", help="remove every label")
    p.add_argument("--etag", default="", help="apply only if the connection still has this etag")
    p.add_argument("--test", action="store_true", help=_TEST_BEFORE_SAVE_HELP)

    for name, text in (
        ("delete", "Soft-delete a connection (it can be restored until purged)."),
        ("restore", "Restore a soft-deleted connection."),
    ):
        _add_ref(command(name, text))

    p = command("purge", "Delete a connection and its sealed secrets for good.")
    _add_ref(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    p = command("revoke", "Revoke a connection: it stays listed but can no longer be resolved.")
    _add_ref(p)
    p.add_argument("--reason", default="", help="recorded in the audit trail")

    p = command(
        "grant",
        "Let an executor principal use a connection: resolve its secret, or (--mode proxy) have the"
        " broker make calls with it. Granting again replaces the grant's expiry, mode and scope.",
    )
    _add_ref(p)
    p.add_argument("principal", help="spiffe://<trust-domain>/tenant/<tenant>/executor/<name>")
    until = p.add_mutually_exclusive_group()
    until.add_argument("--expires-in", metavar="DURATION", help="e.g. 30m, 1h, 7d")
    until.add_argument("--expires-at", metavar="TIME", help="RFC 3339 (UTC when no offset is given)")
    p.add_argument(
        "--mode",
        choices=("resolve", "proxy"),
        default="resolve",
        help="resolve: the secret is released (default); proxy: the executor never holds it",
    )
    scope = p.add_argument_group("scope of a proxy grant (repeatable; none: any)")
    scope.add_argument("--method", action="append", default=[], help="an HTTP method, e.g. GET")
    scope.add_argument(
        "--path", action="append", default=[], metavar="PREFIX", help="a path prefix, e.g. /v1/"
    )
    scope.add_argument("--tool", action="append", default=[], help="an MCP tool name")

    p = command(
        "ungrant",
        "Take a grant away; with --all, every grant of the principal at once (a leaked certificate"
        " or a compromised executor), its leases ending with them.",
    )
    p.usage = "brokerctl ungrant [options] ID_OR_NAME PRINCIPAL | --all PRINCIPAL"
    # Optional only so that `--all PRINCIPAL` parses; `_ungrant` insists on exactly one of the two.
    p.add_argument("ref", nargs="?", metavar="ID_OR_NAME", help="a connection's id or its name")
    p.add_argument("principal", metavar="PRINCIPAL", help="the executor's SPIFFE id")
    p.add_argument(
        "--all", action="store_true", help="remove the principal's grants on every connection (no ID_OR_NAME)"
    )

    p = command("grants", "List grants; STATE says which have expired.")
    p.add_argument("--connection", default="", metavar="ID_OR_NAME")
    p.add_argument("--principal", default="")
    p.add_argument("--active", action="store_true", help="hide expired grants")

    p = command(
        "audit",
        "Show audit events, newest first; `audit verify` checks the hash chain, "
        "`audit export` streams events as JSON lines.",
    )
    p.add_argument("--connection", default="", metavar="ID_OR_NAME")
    p.add_argument("--actor", default="")
    p.add_argument("--action", default="")
    p.add_argument("--since", metavar="TIME", help="RFC 3339, or a duration such as 1h meaning that long ago")
    p.add_argument("--until", metavar="TIME", help="same forms as --since")
    p.add_argument("--limit", type=int, default=100, help="at most this many events (default 100)")
    # Optional: a bare `brokerctl audit ...` lists events as before.
    audit = p.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND", required=False)
    audit.add_parser(
        "verify",
        help="walk the whole audit hash chain; exit 1 naming the first broken event "
        "(waits up to 10 minutes, or --timeout when longer)",
        parents=[common],
    )
    q = audit.add_parser(
        "export",
        help="stream the tenant's events oldest first, one JSON object per line, to stdout "
        "(no deadline: it runs until the last event)",
        parents=[common],
    )
    q.add_argument("--since", required=True, metavar="TIME", help="RFC 3339, or a duration such as 30d")
    q.add_argument("--until", metavar="TIME", help="same forms as --since (exclusive)")
    q.add_argument("--connection", default="", metavar="ID_OR_NAME", help="only this connection's events")

    p = command(
        "leases",
        "List the leases of dynamic database connections (a database user per Resolve), newest first; "
        "`leases revoke` ends every live lease that matches.",
    )
    _add_lease_filters(p)
    p.add_argument(
        "--state", choices=("active", "revoking", "revoked", "creating"), help="default: every state"
    )
    p.add_argument("--page-size", type=int, default=0, help="1..1000 (server default 100)")
    p.add_argument("--page-token", default="", help="continue from a previous page")
    p.add_argument("--all", action="store_true", help="follow page tokens to the end")
    # Optional: a bare `brokerctl leases ...` lists, as `audit` does.
    leases = p.add_subparsers(dest="leases_command", metavar="LEASES_COMMAND", required=False)
    q = leases.add_parser(
        "revoke",
        help="queue every live lease that matches for revocation now (at least one filter); "
        "prints how many were queued",
        parents=[common],
    )
    _add_lease_filters(q, inherit=True)
    q.add_argument("--prefix", default="", metavar="X", help="database user names starting with X")
    q.add_argument(
        "--abandon",
        action="store_true",
        help="the database is gone for good: mark the leases revoked without dropping their users "
        "(queued ones too), so the connection can be purged; remove any users left by hand",
    )

    p = command("lease", "One lease of a dynamic database connection.")
    lease = p.add_subparsers(dest="lease_command", metavar="LEASE_COMMAND", required=True)
    q = lease.add_parser(
        "revoke",
        help="queue the lease for revocation now: its database user is dropped (exit 1 when no live "
        "lease has this id)",
        parents=[common],
    )
    q.add_argument("lease_id", metavar="LEASE_ID")

    p = command("reinstate", "Reinstate a connection the security monitor suspended (audited).")
    _add_ref(p)
    p.add_argument("--reason", default="", help="recorded in the audit trail")

    p = command("security", "The security monitor: the events its rules raised.")
    security = p.add_subparsers(dest="security_command", metavar="SECURITY_COMMAND", required=True)
    q = security.add_parser("events", help="security events, newest first", parents=[common])
    q.add_argument(
        "--rule",
        default="",
        help="failed_tests, denied_burst, volume_spike, new_principal_peer, oauth_refresh_failures, ...",
    )
    q.add_argument("--connection", default="", metavar="ID_OR_NAME")
    q.add_argument("--principal", default="", help="a SPIFFE id")
    q.add_argument("--since", metavar="TIME", help="RFC 3339, or a duration such as 1h meaning that long ago")
    q.add_argument("--until", metavar="TIME", help="same forms as --since")
    q.add_argument("--limit", type=int, default=100, help="at most this many events (default 100)")

    p = command(
        "test",
        "Test a stored connection (ID or name), or a draft given with --type/--config/--secret "
        "that is not stored. Outbound calls obey the broker's egress policy.",
    )
    p.add_argument("ref", nargs="?", metavar="ID_OR_NAME", help="a stored connection; omit with --type")
    _add_draft_options(p)

    p = command("mcp", "MCP tool servers: the tools a connection offers.")
    mcp = p.add_subparsers(dest="mcp_command", metavar="MCP_COMMAND", required=True)
    q = mcp.add_parser("tools", help="the tools stored at the last refresh", parents=[common])
    _add_ref(q)
    q = mcp.add_parser(
        "refresh",
        help="discover the tools now, store them, show what was added, removed or changed",
        parents=[common],
    )
    _add_ref(q)
    q = mcp.add_parser(
        "discover",
        help="list a server's tools without storing them (a stored connection or a draft)",
        parents=[common],
    )
    q.add_argument("ref", nargs="?", metavar="ID_OR_NAME")
    _add_draft_options(q)
    q = mcp.add_parser(
        "call",
        help="call an approved tool as an executor (like resolve); print its text, exit 1 on a tool error",
        parents=[common],
    )
    _add_ref(q)
    q.add_argument("tool")
    q.add_argument(
        "--arg", action="append", default=[], metavar="KEY=VALUE", help="an argument (JSON or text)"
    )
    q.add_argument("--arg-json", metavar="JSON|@FILE", help="the arguments as one JSON object")
    q.add_argument("--purpose", default="", help="why; recorded in the audit trail")

    p = command("oauth", "OAuth2: authorize a connection in the browser (authorization code with PKCE).")
    oauth = p.add_subparsers(dest="oauth_command", metavar="OAUTH_COMMAND", required=True)
    q = oauth.add_parser(
        "connect", help="create an oauth2 connection by signing in at the provider", parents=[common]
    )
    q.add_argument("name", help="the new connection's name")
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--provider", default="", help="google, microsoft, github, slack, notion, ... or custom"
    )
    where.add_argument(
        "--mcp-server",
        default="",
        metavar="URL",
        help="an MCP server (its https URL): discover its authorization server (RFC 9728, RFC 8414) and "
        "register a client there (RFC 7591) unless --client-id is given; the tokens are for this URL",
    )
    q.add_argument(
        "--client-id",
        default="",
        metavar="ID",
        help="with --mcp-server: a client registered at its authorization server (no dynamic registration)",
    )
    _add_config_options(q)
    q.add_argument(
        "--secret", action="append", default=[], metavar="FIELD[=VALUE|=@FILE]", help=_SEALED_FIELD_HELP
    )
    q.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeatable)")
    _add_flow_options(q)
    q = oauth.add_parser(
        "reauthorize", help="sign in again for an existing oauth2 connection", parents=[common]
    )
    _add_ref(q)
    _add_flow_options(q)

    p = command(
        "keys",
        "Master keys (broker-wide; only for principals in the broker's master_key.operators).",
    )
    keys = p.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    keys.add_parser(
        "rotate",
        help="make a new master key active on the running broker (RotateMasterKey; needs master_key.dir); "
        "nothing is re-wrapped: run `broker keys rewrap` next",
        parents=[common],
    )

    p = command(
        "resolve",
        "Resolve a connection as an executor and PRINT ITS SECRETS. This is the only command "
        "that shows a secret. It uses the executor identity (tls/executor.pem) and --resolve-addr.",
    )
    _add_ref(p)
    # Names work without it now; kept so that old scripts still run (it forces the name reading).
    p.add_argument("--by-name", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--purpose", default="", help="why; recorded in the audit trail")
    p.add_argument(
        "--known-version",
        type=int,
        default=0,
        metavar="N",
        help="the secret version you hold; the answer then says when it was superseded",
    )
    p.add_argument(
        "--run-id",
        default="",
        metavar="RUN",
        help="your run (workflow run, agent session), kept with a lease this call makes, so that "
        "`leases revoke --run-id RUN` ends all of the run's leases",
    )

    p = command(
        "proxy",
        "Have the broker make an HTTP call with a connection's credential, as an executor (like"
        " resolve), and print the answer's body; the secret never reaches you. Exit 1 when the"
        " upstream answers 400 or more.",
    )
    _add_ref(p)
    p.add_argument("method", help="GET, HEAD, POST, PUT, PATCH, DELETE or OPTIONS")
    p.add_argument("path", help="a path under the connection's base URL, e.g. /user")
    p.add_argument("--query", default="", help="the query string, percent-encoded, without '?'")
    p.add_argument(
        "-H", "--header", action="append", default=[], metavar="'NAME: VALUE'", help="a header to send"
    )
    p.add_argument("--data", default="", metavar="TEXT|@FILE|@-", help="the body: text, a file or stdin")
    p.add_argument("-i", "--include", action="store_true", help="print the status line and headers first")
    p.add_argument("--purpose", default="", help="why; recorded in the audit trail")
    return parser


def _add_ref(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", metavar="ID_OR_NAME", help="a connection's id or its name")


def _add_lease_filters(parser: argparse.ArgumentParser, *, inherit: bool = False) -> None:
    # `inherit` (for `leases revoke`): no defaults, so that a filter given before `revoke`
    # is kept rather than reset to "" (which would widen what is revoked).
    default = argparse.SUPPRESS if inherit else ""
    parser.add_argument("--connection", default=default, metavar="ID_OR_NAME")
    parser.add_argument("--principal", default=default, help="the executor's SPIFFE id")
    parser.add_argument("--run-id", default=default, metavar="RUN", help="the run_id given to Resolve")


def _add_flow_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scope", action="append", default=[], help="a scope to ask for (repeatable)")
    parser.add_argument(
        "--port", type=int, default=0, help="loopback port for the redirect (default: any free)"
    )
    parser.add_argument(
        "--paste", action="store_true", help="do not listen: paste the URL the browser was redirected to"
    )
    parser.add_argument(
        "--wait", type=float, default=600, help="seconds to wait for the redirect (default 600)"
    )


def _add_draft_options(parser: argparse.ArgumentParser) -> None:
    draft = parser.add_argument_group("draft (not stored)")
    draft.add_argument(
        "--draft", action="store_true", help="test a draft, not a stored connection (implied by --type)"
    )
    draft.add_argument("--type", default="", help="connection type of the draft")
    draft.add_argument("--provider", default="")
    _add_config_options(draft)  # type: ignore[arg-type]
    draft.add_argument(
        "--secret", action="append", default=[], metavar="FIELD[=VALUE|=@FILE]", help=_SEALED_FIELD_HELP
    )


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # No defaults here: _ctl_settings.resolve fills what no flag gave from BROKER_* variables,
    # a profile, then the `broker dev` layout, so a default must not look like a flag given.
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group(
        "connection options (each also from a BROKER_* variable or a profile; flags win)"
    )
    group.add_argument(
        "--profile",
        metavar="NAME",
        default=default(None),
        help="a profile of ~/.config/broker/brokerctl.toml (env BROKER_PROFILE)",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        default=default(None),
        help="a `broker dev` data directory: TLS files from DIR/tls (env BROKER_DATA_DIR; "
        f"default ./{DEFAULT_DATA_DIR})",
    )
    group.add_argument(
        "--addr",
        metavar="HOST:PORT",
        default=default(None),
        help=f"admin API (env BROKER_ADDR; default {DEFAULT_ADMIN_ADDR})",
    )
    group.add_argument(
        "--resolve-addr",
        metavar="HOST:PORT",
        default=default(None),
        help=f"resolve API, for `resolve` (env BROKER_RESOLVE_ADDR; default {DEFAULT_RESOLVE_ADDR})",
    )
    group.add_argument(
        "--ca", type=Path, metavar="FILE", default=default(None), help="CA certificate, PEM (env BROKER_CA)"
    )
    group.add_argument(
        "--cert",
        type=Path,
        metavar="FILE",
        default=default(None),
        help="client certificate, PEM, for this command's identity (env BROKER_CERT for the admin, "
        "BROKER_EXECUTOR_CERT for `resolve`)",
    )
    group.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        default=default(None),
        help="its private key, PEM (env BROKER_KEY, BROKER_EXECUTOR_KEY)",
    )
    group.add_argument(
        "--server-name",
        metavar="NAME",
        default=default(None),
        help="the name to expect in the server certificate (env BROKER_SERVER_NAME; "
        "default: the host of the address)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=default(None),
        help="seconds per call (env BROKER_TIMEOUT; default 10)",
    )
    group.add_argument("--json", action="store_true", default=default(False), help="print JSON")


def _add_config_options(parser: argparse.ArgumentParser, extra: str = "") -> None:
    parser.add_argument(
        "--config", action="append", default=[], metavar="KEY=VALUE", help=_CONFIG_HELP + extra
    )
    parser.add_argument(
        "--config-json", metavar="JSON", help="config fields as a JSON object, or @FILE; --config wins"
    )
