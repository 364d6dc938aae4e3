"""`broker`: lay out a production broker (`init`), run the server (`dev`, `serve`), make its
keys and certificates (`keygen`, `certs`), check a value against an audit fingerprint
(`audit fingerprint`) and probe a running broker's health (`health`: exit 0 SERVING, 1 otherwise).

Exit status: what the server returns when it stops, 0 for the other commands,
and 2 for a bad setting, a bad master key or a file that would be overwritten.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from broker import pki
from broker.cli import _health, _init, _keys, settings_source
from broker.config import DEFAULT_ADMIN_ADDR, DEFAULT_METRICS_ADDR, DEFAULT_RESOLVE_ADDR, Settings
from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.server import Broker

PROG = "broker"
_DEV_DIR = Path(".broker-dev")
# How `broker dev` is told another address for each listener setting: its flag and `make run`'s variable.
_DEV_ADDRESS_FLAGS = {
    "listen.admin": ("--admin-addr", "ADMIN_ADDR"),
    "listen.resolve": ("--resolve-addr", "RESOLVE_ADDR"),
    "metrics.listen": ("--metrics-addr", "METRICS_ADDR"),
}


def main(argv: list[str] | None = None) -> int:
    """Run one broker command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            return _init.run(args)
        if args.command == "keygen":
            return _keygen(args.out)
        if args.command == "certs":
            return _certs(args)
        if args.command == "audit":
            if args.audit_command == "sign-checkpoint":
                return asyncio.run(_audit_sign_checkpoint(settings_source.settings(args), args.last_id))
            return _audit_fingerprint(args)
        if args.command == "keys":
            return _keys.run(args)
        if args.command == "health":
            return _health.run(args, settings_source.settings(args))
        dev = args.command == "dev"
        workers = 1
        if dev:
            settings, on_serving = _prepare_dev(
                args.data_dir, args.admin_addr, args.resolve_addr, args.metrics_addr
            )
        else:
            settings, on_serving = Settings.load(args.config), None
            if args.worker is not None:
                return _serve_as_worker(settings, args.worker)  # the supervisor printed the warnings
            for warning in settings.warnings():
                print(f"{PROG}: warning: {warning}", file=sys.stderr)
            workers = settings.workers if args.workers is None else args.workers
            if workers != 1:
                from broker.workers import check

                check(settings, workers)  # before anything starts: SQLite, port 0, a port in use
    except (ConfigError, ValueError, OSError) as exc:
        return _fail(exc)
    # Only ConfigError is expected from the server; anything else is a bug and keeps its traceback.
    try:
        if workers > 1:
            from broker.workers import run as supervise

            return supervise(settings, workers, args.config)
        return _run(settings, on_serving, dev)
    except ConfigError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The `broker` command line."""
    parser = argparse.ArgumentParser(prog=PROG, description="A secrets broker for workflows and AI agents.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "dev",
        help="run a local broker with generated keys and certificates",
        description="Create a master key, a CA and certificates in --data-dir (once), then serve. "
        "For development only: the master key sits next to the database.",
    )
    p.add_argument("--data-dir", type=Path, default=_DEV_DIR, help="default ./.broker-dev")
    p.add_argument("--admin-addr", default=DEFAULT_ADMIN_ADDR, help=f"default {DEFAULT_ADMIN_ADDR}")
    p.add_argument("--resolve-addr", default=DEFAULT_RESOLVE_ADDR, help=f"default {DEFAULT_RESOLVE_ADDR}")
    p.add_argument(
        "--metrics-addr",
        default=DEFAULT_METRICS_ADDR,
        help=f"Prometheus /metrics (default {DEFAULT_METRICS_ADDR}; '' for none)",
    )

    _init.add_parser(sub)

    p = sub.add_parser("serve", help="run the broker from a config file and BROKER_* variables")
    p.add_argument("--config", type=Path, required=True, metavar="FILE", help="TOML settings file")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="serve from N processes sharing the listeners' ports (PostgreSQL only; default: "
        "server.workers, 1)",
    )
    # Internal: how the supervisor of --workers starts each worker (see broker/workers.py).
    p.add_argument("--worker", type=_worker_spec, help=argparse.SUPPRESS)

    p = sub.add_parser("keygen", help="make a new master key (base64 of 32 random bytes)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write it to FILE (mode 0600) instead of stdout")

    certs = sub.add_parser("certs", help="make a CA and certificates for mTLS")
    csub = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    p = csub.add_parser("init", help="create a CA: DIR/ca.pem and DIR/ca-key.pem")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--common-name", default="broker CA", help="the CA's name (default 'broker CA')")
    p.add_argument("--days", type=int, default=3650, help="validity (default 3650)")

    p = csub.add_parser("issue", help="issue a client certificate for a principal (SPIFFE id)")
    p.add_argument("--ca-dir", type=Path, required=True, help="folder with ca.pem and ca-key.pem")
    p.add_argument(
        "--principal",
        required=True,
        metavar="SPIFFE_ID",
        help="spiffe://<trust-domain>/tenant/<tenant>/<admin|executor>/<name>",
    )
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.pem and PREFIX-key.pem")
    p.add_argument("--days", type=int, default=365, help="validity (default 365)")

    p = csub.add_parser("server", help="issue a TLS server certificate")
    p.add_argument("--ca-dir", type=Path, required=True, help="folder with ca.pem and ca-key.pem")
    p.add_argument("--host", action="append", required=True, help="a DNS name or IP address (repeatable)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.pem and PREFIX-key.pem")
    p.add_argument("--days", type=int, default=365, help="validity (default 365)")

    audit = sub.add_parser("audit", help="audit log tools that need the master key")
    asub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    p = asub.add_parser(
        "fingerprint",
        help="the keyed fingerprint of a value read from stdin, as audit events record it",
        description="Audit events never hold a secret; where one must be identified (each secret "
        "field a Resolve released: details fp.<field>; the refresh token an OAuth refresh used) they "
        "hold fp1:<key id>:<HMAC-SHA256>, keyed by the master key. Pipe a candidate value in (one "
        "trailing newline is dropped) to print its fingerprint; add --check to compare it with one "
        "from the audit log (exit 0 match, 1 no match), or --search to list every event of an "
        "export (`brokerctl audit export`) that names it (exit 0 found, 1 none).",
    )
    settings_source.add_arguments(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--check", metavar="FINGERPRINT", help="compare with this fingerprint instead of printing"
    )
    what.add_argument(
        "--search",
        type=Path,
        metavar="EXPORT",
        help="print the events of this JSON-lines export that hold the value's fingerprint, under any "
        "configured master key: who received a leaked value",
    )

    p = asub.add_parser(
        "sign-checkpoint",
        help="vouch for an audit checkpoint written before checkpoints were signed",
        description="Pruning keeps a checkpoint of what it deleted; since checkpoints are signed, "
        "an unsigned one fails verification and stops pruning, because it is what someone without "
        "the master key would write to hide the oldest events. One written by a broker before this "
        "release is unsigned too. Without --last-id this prints the newest checkpoint if it is "
        "unsigned (exit 1); check it against your exports and logs, then sign it under the active "
        "master key with --last-id set to the event it ends at.",
    )
    settings_source.add_arguments(p)
    p.add_argument(
        "--last-id", type=int, metavar="ID", help="sign the unsigned checkpoint ending at this event"
    )

    _keys.add_parser(sub)
    _health.add_parser(sub)
    return parser


def _worker_spec(text: str) -> tuple[int, int, int]:
    """`--worker INDEX,READY_FD,LIFELINE_FD`."""
    index, ready_fd, lifeline_fd = (int(part) for part in text.split(","))
    return index, ready_fd, lifeline_fd


def _serve_as_worker(settings: Settings, spec: tuple[int, int, int]) -> int:
    """One worker of `broker serve --workers`: listeners shared with its siblings, no metrics listener
    of its own (the supervisor serves them all), SERVING told through the ready pipe."""
    import os
    import signal

    import structlog

    from broker.server import run

    index, ready_fd, lifeline_fd = spec
    structlog.contextvars.bind_contextvars(worker=index)  # on every log line of this process

    def on_serving(broker: Broker) -> None:
        loop = asyncio.get_running_loop()

        def supervisor_gone() -> None:
            # The lifeline's write end closed: the supervisor died. Drain and stop as on SIGTERM.
            loop.remove_reader(lifeline_fd)
            structlog.get_logger("broker.workers").error("supervisor_gone", worker=index)
            os.kill(os.getpid(), signal.SIGTERM)

        loop.add_reader(lifeline_fd, supervisor_gone)
        try:
            os.write(ready_fd, b"serving\n")
        except OSError:
            pass  # the supervisor is gone (a broken pipe): the lifeline says so too, and this worker stops
        finally:
            os.close(ready_fd)

    try:
        return run(dataclasses.replace(settings, metrics_listen=""), on_serving, reuse_port=True)
    except ConfigError as exc:
        return _fail(exc)


def _prepare_dev(
    data_dir: Path, admin_addr: str, resolve_addr: str, metrics_addr: str
) -> tuple[Settings, Callable[[Broker], None]]:
    """The dev settings, and what to print once the broker serves (not before: a port may be taken)."""
    created = pki.ensure_dev_layout(data_dir)
    settings = dataclasses.replace(
        Settings.for_dev(data_dir, admin_addr, resolve_addr), metrics_listen=metrics_addr
    )

    def on_serving(broker: Broker) -> None:
        # The bound ports, which differ from the settings' when those say port 0.
        admin = f"{admin_addr.rpartition(':')[0]}:{broker.admin_port}"
        resolve = f"{resolve_addr.rpartition(':')[0]}:{broker.resolve_port}"
        print(_banner(data_dir, admin, resolve, created), file=sys.stderr, flush=True)

    return settings, on_serving


def _run(settings: Settings, on_serving: Callable[[Broker], None] | None = None, dev: bool = False) -> int:
    # Imported here so that keygen and certs work without loading the server's dependencies.
    from broker.server import ListenError, run

    try:
        return run(settings, on_serving)
    except ListenError as exc:
        if not dev:
            raise
        flag, make_variable = _DEV_ADDRESS_FLAGS[exc.setting]
        raise ConfigError(
            f"{exc.problem}; choose another with {flag} or make run {make_variable}=..."
        ) from None


def _banner(data_dir: Path, admin_addr: str, resolve_addr: str, created: bool) -> str:
    hint = ["brokerctl"]
    if data_dir != _DEV_DIR:
        hint += ["--data-dir", str(data_dir)]
    if admin_addr != DEFAULT_ADMIN_ADDR:
        hint += ["--addr", admin_addr]
    if resolve_addr != DEFAULT_RESOLVE_ADDR:
        hint += ["--resolve-addr", resolve_addr]
    what = "created a master key, a CA and certificates" if created else "using the existing keys"
    return "\n".join(
        [
            f"broker dev: serving; data in {data_dir.resolve()} ({what})",
            f"  admin API    {admin_addr}  (TLS; client certificate tls/admin.pem)",
            f"  resolve API  {resolve_addr}  (mTLS; client certificate tls/executor.pem)",
            f"  next, try:   {shlex.join([*hint, 'types'])}",
            "  development only: the master key is a plain file next to the database.",
        ]
    )


def _audit_fingerprint(args: argparse.Namespace) -> int:
    from broker.service.fingerprint import all_fingerprints, fingerprint, matches

    keyring = settings_source.settings(args).load_keyring()
    if sys.stdin.isatty():
        value = getpass.getpass("value (not echoed): ")
    else:
        value = sys.stdin.read()
        value = value[:-1] if value.endswith("\n") else value
        value = value[:-1] if value.endswith("\r") else value
    if args.search is not None:
        return _search_export(args.search, all_fingerprints(keyring, value))
    if args.check is None:
        print(fingerprint(keyring.active, value))
        return 0
    if matches(keyring, value, args.check):
        print("match: this value has that fingerprint")
        return 0
    print("no match: this value does not have that fingerprint")
    return 1


async def _audit_sign_checkpoint(settings: Settings, last_id: int | None) -> int:
    from broker.service.audit import sign_checkpoint, unsigned_checkpoint

    keyring = settings.load_keyring()
    async with _keys.opened_store(settings) as store:
        found = await unsigned_checkpoint(store)
        if found is None:
            print(
                f"{PROG}: the newest checkpoint is signed (or there is none): nothing to sign",
                file=sys.stderr,
            )
            return 0
        described = (
            f"the checkpoint of {found.pruned_count} events pruned up to event {found.last_id}"
            f" (hash {found.last_hash}) on {found.created_at.isoformat()}"
        )
        if last_id is None:
            print(
                f"{PROG}: unsigned: {described}; check it against your exports and logs, then run "
                f"again with --last-id {found.last_id} to sign it",
                file=sys.stderr,
            )
            return 1
        if last_id != found.last_id:
            print(
                f"{PROG}: refused: the unsigned checkpoint ends at event {found.last_id}, not {last_id}",
                file=sys.stderr,
            )
            return 1
        signed = await sign_checkpoint(store, keyring, found)
    if signed is None:
        print(f"{PROG}: refused: the checkpoint changed meanwhile; run the command again", file=sys.stderr)
        return 1
    print(f"{PROG}: signed {described} under {signed.kek_id}", file=sys.stderr)
    return 0


def _search_export(path: Path, fingerprints: set[str]) -> int:
    """Print each exported event with one of `fingerprints` among its details; the count on stderr."""
    found = 0
    try:
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                details = event.get("details", {}) if isinstance(event, dict) else None
                if not isinstance(details, dict):
                    print(f"{PROG}: {path}:{number}: not an exported audit event", file=sys.stderr)
                    return 2
                if any(isinstance(v, str) and v in fingerprints for v in details.values()):
                    sys.stdout.write(line if line.endswith("\n") else line + "\n")
                    found += 1
    except OSError as exc:
        print(f"{PROG}: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"{PROG}: {found} events hold this value's fingerprint", file=sys.stderr)
    return 0 if found else 1


def _keygen(out: Path | None) -> int:
    key = pki.new_master_key()
    if out is None:
        sys.stdout.write(key)
    else:
        pki.write_private(out, key.encode("ascii"))
        print(f"{PROG}: wrote a new master key to {out} (mode 0600)", file=sys.stderr)
    return 0


def _certs(args: argparse.Namespace) -> int:
    if args.certs_command == "init":
        args.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_pem, key_pem = pki.create_ca(args.common_name, days=args.days)
        _write_pair(args.dir / "ca", cert_pem, key_pem)
        return 0
    ca_cert = (args.ca_dir / "ca.pem").read_bytes()
    ca_key = (args.ca_dir / "ca-key.pem").read_bytes()
    if args.certs_command == "issue":
        cert_pem, key_pem = pki.issue_principal_cert(ca_cert, ca_key, args.principal, days=args.days)
    else:
        cert_pem, key_pem = pki.issue_server_cert(ca_cert, ca_key, args.host, days=args.days)
    _write_pair(Path(args.out), cert_pem, key_pem)
    return 0


def _write_pair(prefix: Path, cert_pem: bytes, key_pem: bytes) -> None:
    cert_path = prefix.with_name(prefix.name + ".pem")
    key_path = prefix.with_name(prefix.name + "-key.pem")
    # Check both first so that a refusal leaves no half-written pair behind.
    for path in (cert_path, key_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite it")
    pki.write_private(key_path, key_pem)
    pki.write_public(cert_path, cert_pem)
    print(f"{PROG}: wrote {cert_path} and {key_path}", file=sys.stderr)


def _fail(exc: Exception) -> int:
    if isinstance(exc, FileExistsError) and exc.filename:
        message = f"{exc.filename} exists; refusing to overwrite it"
    elif isinstance(exc, OSError) and exc.filename and exc.strerror:
        message = f"{exc.filename}: {exc.strerror}"
    else:
        message = str(exc)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
