"""`broker init`: a ready-to-run broker in one folder, made in one command.

    DIR/                 mode 0700 when created here
      broker.toml        the settings; every path in it is relative to it
      brokerctl.env      `export BROKER_ADDR=...` for brokerctl as the admin (`. DIR/brokerctl.env`)
      master-keys/       master_key.dir (0700): <kek-id>.key (0600) and `active`
      broker.db          SQLite, created by the first `broker serve`
      tls/               (0700) ca, server, admin, executor and probe: NAME.pem and NAME-key.pem (0600)

Listeners: 0.0.0.0:50051 (admin) and 0.0.0.0:50052 (resolve), since the names given with
--host must reach them; with --local, 127.0.0.1 only, and the server certificate also names
localhost and 127.0.0.1. A BROKER_LISTEN_ADMIN, BROKER_LISTEN_RESOLVE or BROKER_METRICS_LISTEN
set in the environment is the default of its flag, so the file agrees with what `serve` will
use. Metrics: 127.0.0.1:9464. The admin is a master-key operator (it may rotate the key).
Nothing is written when any file of the layout exists already.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from broker import keydir, pki
from broker.config import ADMIN_PORT, RESOLVE_PORT, Settings, variable
from broker.config import DEFAULT_METRICS_ADDR as METRICS_ADDR
from broker.errors import ConfigError
from broker.identity import parse_spiffe_id

PROG = "broker init"
LOCAL_HOSTS = ("localhost", "127.0.0.1")
# The names of the three identities init issues, in the trust domain and tenant given.
ADMIN_NAME, EXECUTOR_NAME, PROBE_NAME = "admin", "executor", "broker"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `init` subcommand's arguments."""
    p = sub.add_parser(
        "init",
        help="write a ready-to-run broker (settings, master key directory, CA, certificates) to DIR",
        description="Write DIR/broker.toml, a master key directory, a CA, a server certificate for "
        "the --host names, an admin, an executor and a health-probe certificate; then print how to "
        "start the broker and use brokerctl. Refuses when any of these files exists.",
    )
    p.add_argument("--dir", type=Path, required=True, metavar="DIR", help="where to write the layout")
    p.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME",
        help="a DNS name or IP address clients use to reach the broker (repeatable; the first is "
        "the one printed for brokerctl)",
    )
    p.add_argument(
        "--trust-domain", default="broker.local", help="SPIFFE trust domain (default broker.local)"
    )
    p.add_argument("--tenant", default="default", help="tenant of the admin and executor (default default)")
    p.add_argument(
        "--local",
        action="store_true",
        help="listen on 127.0.0.1 only, and add localhost and 127.0.0.1 to the server certificate",
    )
    for flag, setting, port in (
        ("--admin-addr", ("listen", "admin"), ADMIN_PORT),
        ("--resolve-addr", ("listen", "resolve"), RESOLVE_PORT),
    ):
        p.add_argument(
            flag,
            metavar="HOST:PORT",
            help=f"default ${variable(*setting)}, else 0.0.0.0:{port} (127.0.0.1:{port} with --local)",
        )
    p.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help=f"Prometheus /metrics, '' for none (default $BROKER_METRICS_LISTEN, else {METRICS_ADDR})",
    )


@dataclass(frozen=True)
class _Plan:
    """Everything init will write, made in memory first: nothing touches the disk before it is whole."""

    root: Path
    files: dict[Path, tuple[bytes, bool]]  # path -> (content, private)
    key_dir: Path
    master_key: str
    admin_id: str
    executor_id: str
    probe_id: str
    cert_hosts: list[str]
    admin_addr: str
    resolve_addr: str
    metrics_addr: str
    client_host: str

    def existing(self) -> list[Path]:
        """The paths of the layout that exist already, the settings file first."""
        targets = sorted(self.files, key=lambda p: p.parent != self.root)
        targets += [self.key_dir, self.root / "broker.db"]
        return [p for p in targets if p.exists() or p.is_symlink()]


def run(args: argparse.Namespace) -> int:
    """Make the layout and print how to use it; ConfigError and ValueError name what is wrong."""
    plan = _plan(args)
    existing = plan.existing()
    if existing:
        more = f" (and {len(existing) - 1} more of its files)" if len(existing) > 1 else ""
        raise ConfigError(
            f"{existing[0]} exists{more}: refusing to overwrite a broker layout; "
            "choose another --dir, or remove the old one first"
        )
    _write(plan)
    print(_summary(plan))
    return 0


def _plan(args: argparse.Namespace) -> _Plan:
    root = Path(os.path.abspath(args.dir.expanduser()))
    tls = root / "tls"
    local = bool(args.local)
    hosts = list(dict.fromkeys([*args.host, *(LOCAL_HOSTS if local else ())]))
    domain, tenant = args.trust_domain, args.tenant
    _check_names(domain, tenant)
    admin_id = f"spiffe://{domain}/tenant/{tenant}/admin/{ADMIN_NAME}"
    executor_id = f"spiffe://{domain}/tenant/{tenant}/executor/{EXECUTOR_NAME}"
    probe_id = f"spiffe://{domain}/probe/{PROBE_NAME}"
    listen_host = "127.0.0.1" if local else "0.0.0.0"  # noqa: S104 -- the --host names must reach it
    admin_addr = _addr(args.admin_addr, ("listen", "admin"), f"{listen_host}:{ADMIN_PORT}")
    resolve_addr = _addr(args.resolve_addr, ("listen", "resolve"), f"{listen_host}:{RESOLVE_PORT}")
    metrics_addr = _addr(args.metrics_addr, ("metrics", "listen"), METRICS_ADDR)

    ca_cert, ca_key = pki.create_ca(f"broker CA ({domain})")
    server = pki.issue_server_cert(ca_cert, ca_key, hosts)
    admin = pki.issue_principal_cert(ca_cert, ca_key, admin_id)
    executor = pki.issue_principal_cert(ca_cert, ca_key, executor_id)
    probe = pki.issue_client_cert(ca_cert, ca_key, probe_id)
    files: dict[Path, tuple[bytes, bool]] = {}
    for name, (cert, key) in {
        "ca": (ca_cert, ca_key),
        "server": server,
        "admin": admin,
        "executor": executor,
        "probe": probe,
    }.items():
        files[tls / f"{name}.pem"] = (cert, False)
        files[tls / f"{name}-key.pem"] = (key, True)
    plan = _Plan(
        root=root,
        files=files,
        key_dir=root / "master-keys",
        master_key=pki.new_master_key(),
        admin_id=admin_id,
        executor_id=executor_id,
        probe_id=probe_id,
        cert_hosts=hosts,
        admin_addr=admin_addr,
        resolve_addr=resolve_addr,
        metrics_addr=metrics_addr,
        client_host="127.0.0.1" if local else hosts[0],
    )
    config = _config(plan)
    # The broker's own loader checks the file now (trust domain, addresses), before anything is written.
    Settings.from_toml(config, root, environ={}, source="the settings broker init would write")
    files[root / "broker.toml"] = (config.encode(), False)
    files[root / "brokerctl.env"] = (_env_file(plan).encode(), False)
    return plan


def _check_names(domain: str, tenant: str) -> None:
    """Name the flag at fault, rather than the SPIFFE id it would have made."""
    try:
        parse_spiffe_id(f"spiffe://{domain}/tenant/default/admin/{ADMIN_NAME}")
    except ValueError:
        raise ConfigError(
            f"--trust-domain {domain!r}: use letters, digits, '.' and '-', such as broker.local"
        ) from None
    try:
        parse_spiffe_id(f"spiffe://broker.local/tenant/{tenant}/admin/{ADMIN_NAME}")
    except ValueError:
        raise ConfigError(f"--tenant {tenant!r}: use 1 to 128 letters, digits, '.', '-' and '_'") from None


def _addr(flag: str | None, setting: tuple[str, str], default: str) -> str:
    if flag is not None:
        return flag
    return os.environ.get(variable(*setting)) or default


def _port(addr: str) -> str:
    return addr.rpartition(":")[2]


def _toml(text: str) -> str:
    return json.dumps(text)  # a JSON string of printable text is a TOML basic string


def _config(plan: _Plan) -> str:
    def line(key: str, value: str, comment: str = "") -> str:
        text = f"{key} = {value}"
        return f"{text:<36}# {comment}" if comment else text

    domain = plan.admin_id.split("/")[2]
    lines = [
        "# Written by `broker init`. Paths are relative to this file's folder, so the folder can move.",
        "# Every setting can be overridden by BROKER_<SECTION>_<KEY> (BROKER_LISTEN_ADMIN, ...); an",
        "# unknown key here stops the broker at start. All settings: deploy/broker.example.toml.",
        "",
        line("trust_domain", _toml(domain), "the SPIFFE ids of the certificates below"),
        "",
        "[listen]",
        line("admin", _toml(plan.admin_addr), "AdminService: admin certificates"),
        line("resolve", _toml(plan.resolve_addr), "ResolveService: executor certificates"),
        "",
        "[tls]",
        line("cert", '"tls/server.pem"', f"for {', '.join(plan.cert_hosts)}"),
        line("key", '"tls/server-key.pem"'),
        line("client_ca", '"tls/ca.pem"', "every client certificate comes from this CA"),
        "",
        "[storage]",
        line("path", '"broker.db"', "SQLite: one broker process"),
        "# PostgreSQL for several replicas on one database (path is then ignored); keep a password",
        "# out of this file: BROKER_STORAGE_URL, PGPASSWORD or a PGPASSFILE.",
        '# url = "postgresql://broker@db.internal:5432/broker?sslmode=verify-full"',
        "",
        "[master_key]",
        line("dir", '"master-keys"', "broker keys rotate|rewrap|status|retire --config <this file>"),
        "# May call RotateMasterKey (`brokerctl keys rotate`): the master key is broker-wide.",
        line("operators", f"[{_toml(plan.admin_id)}]"),
        "",
        "[health]",
        "# The identity `broker health --config <this file>` presents: it may ask the health service only.",
        line("cert", '"tls/probe.pem"'),
        line("key", '"tls/probe-key.pem"'),
        line("server_name", _toml(plan.cert_hosts[0]), "in the server certificate; health dials loopback"),
        "",
        "[metrics]",
        line("listen", _toml(plan.metrics_addr), 'Prometheus /metrics; "" turns it off'),
    ]
    return "\n".join(lines) + "\n"


def _exports(plan: _Plan) -> str:
    tls = plan.root / "tls"
    values = {
        "BROKER_ADDR": f"{plan.client_host}:{_port(plan.admin_addr)}",
        "BROKER_RESOLVE_ADDR": f"{plan.client_host}:{_port(plan.resolve_addr)}",
        "BROKER_CA": str(tls / "ca.pem"),
        "BROKER_CERT": str(tls / "admin.pem"),
        "BROKER_KEY": str(tls / "admin-key.pem"),
        # `brokerctl resolve` acts as the executor.
        "BROKER_EXECUTOR_CERT": str(tls / "executor.pem"),
        "BROKER_EXECUTOR_KEY": str(tls / "executor-key.pem"),
    }
    return "export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in values.items())


def _env_file(plan: _Plan) -> str:
    return (
        f"# brokerctl as {plan.admin_id}, for the broker of {plan.root / 'broker.toml'}.\n"
        f"# Written by `broker init`; load it with: . {shlex.quote(str(plan.root / 'brokerctl.env'))}\n"
        f"{_exports(plan)}\n"
    )


def _write(plan: _Plan) -> None:
    """Write every file (keys 0600, folders 0700); on a failure remove what was written."""
    created: list[Path] = []
    try:
        for folder in (plan.root, plan.root / "tls"):
            if not folder.exists():
                folder.mkdir(mode=0o700, parents=True)
                created.append(folder)
        for path, (content, private) in plan.files.items():
            (pki.write_private if private else pki.write_public)(path, content)
            created.append(path)
        created.append(plan.key_dir)
        keydir.init(plan.key_dir, [plan.master_key])
    except BaseException:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                if path == plan.key_dir:
                    for child in path.iterdir():
                        child.unlink()
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()
        raise


def _summary(plan: _Plan) -> str:
    config = plan.root / "broker.toml"
    quoted = shlex.quote(str(config))
    metrics = f", metrics {plan.metrics_addr}" if plan.metrics_addr else ""
    return "\n".join(
        [
            f"{PROG}: wrote a broker to {plan.root}",
            "  broker.toml       the settings (paths relative to it)",
            "  master-keys/      the master key directory: broker keys rotate|rewrap|status|retire",
            "  broker.db         the SQLite store, made at first start (storage.url for PostgreSQL)",
            "  tls/ca.pem        the CA; with tls/ca-key.pem,"
            f" `broker certs issue --ca-dir {shlex.quote(str(plan.root / 'tls'))}` issues more",
            f"  tls/server.pem    the server, for {', '.join(plan.cert_hosts)}",
            f"  tls/admin.pem     {plan.admin_id} (a master-key operator)",
            f"  tls/executor.pem  {plan.executor_id}",
            f"  tls/probe.pem     {plan.probe_id}, for `broker health` only",
            "",
            f"Start it (admin {plan.admin_addr}, resolve {plan.resolve_addr}{metrics}):",
            f"  broker serve --config {quoted}",
            "",
            f"Then use brokerctl as the admin (these lines are in {plan.root / 'brokerctl.env'}):",
            f"  {_exports(plan)}",
            "  brokerctl types",
            f"  broker health --config {quoted}",
        ]
    )
