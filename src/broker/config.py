"""Settings: built once from a TOML file and `BROKER_*` environment variables.

The only module that reads the environment. Every problem is a `ConfigError`
naming the setting, raised at start-up.

    trust_domain = "broker.local"
    [listen]
    admin = "127.0.0.1:50051"       # BROKER_LISTEN_ADMIN
    resolve = "127.0.0.1:50052"     # BROKER_LISTEN_RESOLVE
    [tls]
    cert = "tls/server.pem"         # BROKER_TLS_CERT
    key = "tls/server-key.pem"      # BROKER_TLS_KEY
    client_ca = "tls/ca.pem"        # BROKER_TLS_CLIENT_CA
    reload_interval_seconds = 5     # BROKER_TLS_RELOAD_INTERVAL_SECONDS: how often new handshakes
                                    #   look for changed files (0: every handshake)
    [storage]
    path = "broker.db"              # BROKER_STORAGE_PATH: the SQLite file (the default backend)
    url = ""                        # BROKER_STORAGE_URL: "postgresql://user@host:5432/db?sslmode=verify-full"
                                    #   selects PostgreSQL (several replicas on one database); when set,
                                    #   path is ignored. A password in the URL: set it from a secret;
                                    #   or asyncpg reads PGPASSWORD / PGPASSFILE (~/.pgpass) like libpq
    pool_min = 1                    # BROKER_STORAGE_POOL_MIN: PostgreSQL connections kept open
    pool_max = 10                   # BROKER_STORAGE_POOL_MAX: at most this many per replica
    [master_key]
    file = "master.key"             # BROKER_MASTER_KEY_FILE (or the key itself in BROKER_MASTER_KEY)
    old_files = []                  # keys kept for unwrapping only, during rotation
    dir = ""                        # BROKER_MASTER_KEY_DIR: key directory mode instead of file/old_files
                                    #   (<kek-id>.key files + an `active` marker; `broker keys ...`)
    operators = []                  # BROKER_MASTER_KEY_OPERATORS: SPIFFE ids of admins allowed to call
                                    #   RotateMasterKey (broker-wide); empty: nobody may
    [resolve]
    cache_ttl_seconds = 60          # BROKER_RESOLVE_CACHE_TTL_SECONDS
    superseded_grace_seconds = 3600 # BROKER_RESOLVE_SUPERSEDED_GRACE_SECONDS: how long Resolve can
                                    #   still say when a replaced secret version was superseded
    cache_entries = 100000          # BROKER_RESOLVE_CACHE_ENTRIES: connections kept in memory for
                                    #   Resolve (about 1 KB each), least recently used forgotten first
    [log]
    level = "info"                  # BROKER_LOG_LEVEL
    [server]
    grace_seconds = 20              # BROKER_SERVER_GRACE_SECONDS
    workers = 1                     # BROKER_SERVER_WORKERS: serving processes on the same ports
                                    #   (PostgreSQL only; `broker serve --workers N` wins)
    reflection = true               # BROKER_SERVER_REFLECTION
    drain_delay_seconds = 1         # BROKER_SERVER_DRAIN_DELAY_SECONDS: after SIGTERM, keep serving (as
                                    #   NOT_SERVING) until calls stop arriving for 0.1 s, at most this long
    handshake_timeout_seconds = 10  # BROKER_SERVER_HANDSHAKE_TIMEOUT_SECONDS: a connection that has not
                                    #   finished TLS and HTTP/2's opening by then is closed (gRPC's own
                                    #   default, 120 s, lets unauthenticated sockets pile up)
    max_connection_age_seconds = 3600 # BROKER_SERVER_MAX_CONNECTION_AGE_SECONDS: a client connection is
                                    #   asked to reconnect after this (calls under way finish), so a
                                    #   client CA dropped by a TLS reload stops working on open ones too
    max_connection_age_grace_seconds = 300 # BROKER_SERVER_MAX_CONNECTION_AGE_GRACE_SECONDS: how long
                                    #   those calls may take to finish before the connection is closed
    max_connection_idle_seconds = 300 # BROKER_SERVER_MAX_CONNECTION_IDLE_SECONDS: a connection with no
                                    #   call under way for this long is closed (the client reconnects)
    [health]
    store_probe_seconds = 5         # BROKER_HEALTH_STORE_PROBE_SECONDS: store ping; NOT_SERVING on failure
    cert = "tls/probe.pem"          # BROKER_HEALTH_CERT (no default): the client certificate and key
    key = "tls/probe-key.pem"       # BROKER_HEALTH_KEY (no default):  `broker health` presents
    server_name = "broker.internal" # BROKER_HEALTH_SERVER_NAME (no default): the name `broker health`
                                    #   expects in the server certificate (it dials a wildcard
                                    #   listener on loopback); default: the host it dials
    [metrics]
    listen = "127.0.0.1:9464"       # Prometheus /metrics; "" turns it off (BROKER_METRICS_LISTEN)
    [audit]
    retention_days = 365            # BROKER_AUDIT_RETENTION_DAYS (at least 90); older events are
                                    #   pruned daily behind a checkpoint that keeps the chain verifiable
    seal_interval_seconds = 60      # how often the chain's tail is sealed (a MAC under the master key)
    [oauth]
    refresh_margin_seconds = 300    # a token expiring sooner is refreshed before Resolve returns it
    default_token_lifetime_seconds = 3600   # when the provider gives no expires_in and no JWT exp
    refresh_interval_seconds = 30   # how often the background refresher looks for expiring tokens
    [limits]                        # token buckets per principal and class of call
    resolve_per_second = 200        # sustained Resolves per executor (burst: resolve_burst)
    resolve_burst = 400
    proxy_per_second = 50           # sustained proxied calls per executor (burst: proxy_burst)
    proxy_burst = 100
    proxy_in_flight = 16            # proxied calls one executor may have under way at once, per process
    admin_writes_per_minute = 600   # creates, updates, grants... per admin (burst: a minute's worth)
    tests_per_minute = 30           # connection tests and tool discovery per admin
    denied_audits_per_minute = 10   # calls refused for the caller's role or over a rate limit, audited
                                    #   one by one per principal, kind and minute; the rest in one
                                    #   summary record a minute
    [testing]
    stale_after_days = 7            # a success older than this marks the connection stale
    [egress]                        # outbound calls made for connection tests and discovery
    allow_loopback = false          # BROKER_EGRESS_ALLOW_LOOPBACK (`broker dev` allows it)
    allow_private = true            # BROKER_EGRESS_ALLOW_PRIVATE (10/8, 172.16/12, 192.168/16,
                                    #   100.64/10, fc00::/7)
    allow_cidrs = []                # BROKER_EGRESS_ALLOW_CIDRS="10.1.0.0/16,fd00::/8"; never lifts the
                                    #   always-blocked link-local/metadata/multicast/reserved ranges
    deny_cidrs = []                 # BROKER_EGRESS_DENY_CIDRS; wins over everything else
    allow_hosts = []                # BROKER_EGRESS_ALLOW_HOSTS; when set, only these ("*.example.com" ok)
    connect_timeout = 5.0           # BROKER_EGRESS_CONNECT_TIMEOUT (seconds)
    total_timeout = 15.0            # BROKER_EGRESS_TOTAL_TIMEOUT (seconds, a whole test)
    max_response_bytes = 1048576    # BROKER_EGRESS_MAX_RESPONSE_BYTES
    max_redirects = 3               # BROKER_EGRESS_MAX_REDIRECTS
    proxy_connections = 200         # BROKER_EGRESS_PROXY_CONNECTIONS: the proxy's connections to
                                    #   upstreams, shared by every executor (see limits.proxy_in_flight)
    [leases]                        # dynamic database credentials (a database user per Resolve)
    poll_seconds = 1                # how often the revocation worker looks for expired leases
    batch_size = 50                 # leases dropped per batch (a restart with many due goes batch by batch)
    min_retry_seconds = 1           # a failed drop is retried after this, doubling up to
    max_retry_seconds = 300         #   this; it is never given up
    creation_grace_seconds = 60     # a lease still being created after this lost its creator: undone
    reconcile_seconds = 300         # how often each database's users named with the prefix are
                                    #   compared with the live leases (and at start); orphans dropped
    timeout_seconds = 10            # connecting and running one operation's statements
    [monitor]                       # security monitor; a threshold of 0 turns its rule off
    failed_tests = 5                # failed tests of one connection within the window suspend it
    failed_tests_window_seconds = 600
    denied_resolves = 20            # probing denials of one principal within the window flag it
    denied_window_seconds = 60
    block_seconds = 0               # > 0: a flagged principal's Resolves are denied this long
    spike_min_count = 100           # Resolves of one principal x connection in a window above
    spike_factor = 10               #   max(spike_min_count, spike_factor x its average) alert
    spike_window_seconds = 60
    suspend_on_spike = false        # and suspend the connection
    new_principal_peer = true       # alert on a principal's first Resolve of a connection from a new host
    oauth_refresh_failures = 3      # failed refreshes of one connection within the window alert
    oauth_refresh_window_seconds = 3600
    wrong_role = 20                 # calls of one principal refused for its role (the other listener)
    wrong_role_window_seconds = 60  #   within the window alert, once per window
    alert_webhook = "ops/conn_..."  # unset by default; "tenant/connection_id" of a webhook connection
                                    #   that receives every tenant's security events (signed)

Environment lists are comma-separated. Relative paths in the file are relative to the file's folder.
A key or section the file does not know is an error naming the nearest valid one; an unknown
BROKER_* variable is only warned about (`Settings.unknown_variables`), since the environment
is shared with other programs.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import keydir
from broker.crypto import Kek, KeyError_, Keyring
from broker.egress.policy import EgressSettings, parse_allowed_host, parse_cidr
from broker.errors import ConfigError

_LOG_LEVELS = ("debug", "info", "warning", "error")
# Where a broker listens unless told otherwise: `broker dev`, `broker init` and brokerctl start here.
ADMIN_PORT, RESOLVE_PORT = 50051, 50052
DEFAULT_ADMIN_ADDR = f"127.0.0.1:{ADMIN_PORT}"
DEFAULT_RESOLVE_ADDR = f"127.0.0.1:{RESOLVE_PORT}"
DEFAULT_METRICS_ADDR = "127.0.0.1:9464"
MASTER_KEY_VARIABLE = "BROKER_MASTER_KEY"
# brokerctl's connection settings and the variables that set them (cli/_ctl_settings.py reads
# them; the server does not, and never warns about them). None has a section, so none can be
# mistaken for a server setting (BROKER_<SECTION>_<KEY>).
CLIENT_SETTINGS = {
    "addr": "BROKER_ADDR",
    "resolve_addr": "BROKER_RESOLVE_ADDR",
    "ca": "BROKER_CA",
    "cert": "BROKER_CERT",
    "key": "BROKER_KEY",
    "executor_cert": "BROKER_EXECUTOR_CERT",
    "executor_key": "BROKER_EXECUTOR_KEY",
    "server_name": "BROKER_SERVER_NAME",
    "timeout": "BROKER_TIMEOUT",
    "data_dir": "BROKER_DATA_DIR",
}
CLIENT_PROFILE_VARIABLE = "BROKER_PROFILE"
CLIENT_VARIABLES = frozenset({*CLIENT_SETTINGS.values(), CLIENT_PROFILE_VARIABLE})
# Settings of the test suite and the benchmark, read by them alone.
_TOOL_PREFIXES = ("BROKER_TEST_", "BROKER_BENCH_", "BROKER_FUZZ_")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class Settings:
    tls: TlsFiles
    # None only when storage_url selects PostgreSQL.
    storage_path: Path | None
    # The PostgreSQL DSN (storage.url); may hold a password, so never printed (repr=False).
    storage_url: str | None = field(default=None, repr=False)
    storage_pool_min: int = 1
    storage_pool_max: int = 10
    master_key_file: Path | None = None
    # The base64 key from BROKER_MASTER_KEY; never printed (repr=False).
    master_key_env: str | None = field(default=None, repr=False)
    old_master_key_files: tuple[Path, ...] = ()
    master_key_dir: Path | None = None
    master_key_operators: tuple[str, ...] = ()
    superseded_grace_seconds: float = 3600.0
    admin_addr: str = DEFAULT_ADMIN_ADDR
    resolve_addr: str = DEFAULT_RESOLVE_ADDR
    trust_domain: str = "broker.local"
    cache_ttl_seconds: int = 60
    resolve_cache_entries: int = 100_000
    log_level: str = "info"
    grace_seconds: float = 20.0
    workers: int = 1
    reflection: bool = True
    drain_delay_seconds: float = 1.0
    handshake_timeout_seconds: float = 10.0
    max_connection_age_seconds: float = 3600.0
    max_connection_age_grace_seconds: float = 300.0
    max_connection_idle_seconds: float = 300.0
    tls_reload_seconds: float = 5.0
    health_probe_seconds: float = 5.0
    health_cert: Path | None = None
    health_key: Path | None = None
    health_server_name: str | None = None
    tests_per_minute: int = 30
    resolve_per_second: float = 200.0
    resolve_burst: int = 400
    proxy_per_second: float = 50.0
    proxy_burst: int = 100
    proxy_in_flight: int = 16
    admin_writes_per_minute: int = 600
    denied_audits_per_minute: int = 10
    metrics_listen: str = DEFAULT_METRICS_ADDR
    oauth_refresh_margin_seconds: float = 300.0
    oauth_default_token_lifetime_seconds: float = 3600.0
    oauth_refresh_interval_seconds: float = 30.0
    stale_after_days: float = 7.0
    audit_retention_days: int = 365
    audit_seal_interval_seconds: float = 60.0
    egress: EgressSettings = field(default_factory=EgressSettings)
    monitor: MonitorSettings = field(default_factory=lambda: MonitorSettings())
    leases: LeaseSettings = field(default_factory=lambda: LeaseSettings())
    # BROKER_* variables no setting reads, with the nearest valid name ("" when none is near).
    unknown_variables: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    @classmethod
    def load(cls, path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the TOML file (optional) and override with BROKER_* variables.

        An unknown key in the file is a ConfigError; unknown variables are listed in
        `unknown_variables` for the caller to warn about.
        """
        if path is None:
            return cls.from_toml("", Path.cwd(), environ)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        return cls.from_toml(text, path.resolve().parent, environ, f"config file {path}")

    @classmethod
    def from_toml(
        cls,
        text: str,
        base: Path,
        environ: Mapping[str, str] | None = None,
        source: str = "config file",
    ) -> Settings:
        """`load` for TOML text whose relative paths are relative to `base`; `source` names it in errors."""
        env = dict(os.environ if environ is None else environ)
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        problem = _unknown_key(doc)
        if problem:
            raise ConfigError(f"{source}: {problem}")
        settings = _build(_Source(doc, env, base))
        return dataclasses.replace(settings, unknown_variables=_unknown_variables(env))

    def warnings(self) -> list[str]:
        """One line per unknown BROKER_* variable, and per key file others may read, for the operator."""
        unknown = [
            f"{name} is not a broker setting and is ignored" + (f"; did you mean {near}?" if near else "")
            for name, near in self.unknown_variables
        ]
        keys = [("tls.key", self.tls.key)]
        if self.master_key_file is not None and not self.master_key_env:
            keys.append(("master_key.file", self.master_key_file))
        if self.master_key_dir is not None:
            keys += [("master_key.dir", path) for path in sorted(self.master_key_dir.glob("*.key"))]
        return unknown + [line for setting, path in keys if (line := _loose_key_file(setting, path))]

    @classmethod
    def for_dev(cls, data_dir: Path, admin_addr: str, resolve_addr: str) -> Settings:
        """The layout `broker dev` creates in its data directory."""
        tls = data_dir / "tls"
        return cls(
            tls=TlsFiles(tls / "server.pem", tls / "server-key.pem", tls / "ca.pem"),
            storage_path=data_dir / "broker.db",
            master_key_file=data_dir / "master.key",
            admin_addr=admin_addr,
            resolve_addr=resolve_addr,
            # Local development tests services on this machine.
            egress=EgressSettings(allow_loopback=True),
        )

    def load_keyring(self) -> Keyring:
        """The master key (active) and any older keys, read from their files or the environment."""
        if self.master_key_dir is not None:
            return keydir.load(self.master_key_dir)
        if self.master_key_env:
            active = _parse_key(self.master_key_env, "BROKER_MASTER_KEY")
        elif self.master_key_file is not None:
            active = _read_key(self.master_key_file, "master_key.file")
        else:
            raise ConfigError(
                "no master key: set master_key.file (BROKER_MASTER_KEY_FILE) or BROKER_MASTER_KEY; "
                "create one with `broker keygen`"
            )
        older = [_read_key(p, "master_key.old_files") for p in self.old_master_key_files]
        return Keyring(active, older)


def _parse_key(text: str, setting: str) -> Kek:
    try:
        return Kek.from_base64(text)
    except KeyError_ as exc:
        raise ConfigError(f"{setting}: {exc}") from None


def _loose_key_file(setting: str, path: Path) -> str:
    """A warning when users other than the file's owner and group may read or write it, or its
    group may write it (a group read is how Kubernetes hands a secret to a pod's fsGroup); else ""."""
    try:
        mode = path.stat().st_mode  # through the symlinks a mounted secret is made of
    except OSError:
        return ""  # a missing file is an error of its own, when it is read
    if mode & 0o027 == 0:
        return ""
    return f"{setting}: {path} is open to other users (mode {mode & 0o777:04o}); make it 0600 or 0640"


def _read_key(path: Path, setting: str) -> Kek:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    return _parse_key(text, f"{setting} ({path})")


@dataclass
class _Source:
    doc: dict[str, Any]
    env: dict[str, str]
    base: Path
    # Every (section, key) the builder asks for: the one list of valid settings (`_known`).
    asked: set[tuple[str, str]] = field(default_factory=set)
    # Listing the settings only: a missing required one is not an error.
    listing: bool = False

    def raw(self, section: str, key: str) -> tuple[Any, str]:
        """The value from the environment, else the file; and the setting's name for errors."""
        self.asked.add((section, key))
        name = f"{section}.{key}" if section else key
        env_name = variable(section, key)
        if env_name in self.env:
            return self.env[env_name], env_name
        table = self.doc.get(section, {}) if section else self.doc
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        return table.get(key), name

    def text(self, section: str, key: str, default: str | None = None) -> str | None:
        value, name = self.raw(section, key)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name} must be a non-empty string")
        return value.strip()

    def path(self, section: str, key: str) -> Path | None:
        value = self.text(section, key)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p

    def required_path(self, section: str, key: str) -> Path:
        p = self.path(section, key)
        if p is None:
            if self.listing:
                return self.base
            raise ConfigError(f"{section}.{key} is required (or set {variable(section, key)})")
        return p

    def number(self, section: str, key: str, default: float, low: float, high: float) -> float:
        value, name = self.raw(section, key)
        if value is None:
            return default
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number") from None
        if not low <= number <= high:
            raise ConfigError(f"{name} must be between {low:g} and {high:g}")
        return number

    def flag(self, section: str, key: str, default: bool) -> bool:
        value, name = self.raw(section, key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false")


def variable(section: str, key: str) -> str:
    """The environment variable of a setting: BROKER_<SECTION>_<KEY> ("" section: top level)."""
    return "BROKER_" + (f"{section}_{key}" if section else key).upper()


@functools.cache
def _known() -> frozenset[tuple[str, str]]:
    """Every (section, key) a settings file may hold ("" is the top level): what the builder reads."""
    src = _Source({}, {}, Path("/"), listing=True)
    _build(src)
    return frozenset(src.asked)


def nearest(name: str, candidates: Iterable[str]) -> str:
    """The candidate closest to a misspelt `name` (difflib), or "" when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else ""


def _unknown_key(doc: dict[str, Any]) -> str:
    """What is wrong with the first key of the file no setting reads; "" when there is none."""
    known = _known()
    sections = {section for section, _ in known if section}
    top_keys = {key for section, key in known if not section}
    for name, value in doc.items():
        if name in sections:
            if not isinstance(value, dict):
                continue  # the builder says "[section] must be a table"
            keys = sorted(key for section, key in known if section == name)
            for key in value:
                if key in keys:
                    continue
                owners = sorted(section for section, k in known if k == key)
                near = nearest(key, keys)
                if owners == [""]:
                    # TOML puts a key written below a [section] header into that section.
                    hint = f"{key} belongs at the top of the file, before the first [section]"
                elif owners:
                    hint = f"it belongs in [{owners[0]}]"
                else:
                    hint = f"did you mean {near}?" if near else f"valid keys: {', '.join(keys)}"
                return f"unknown key {key} in [{name}]; {hint}"
        elif name not in top_keys:
            what = "section" if isinstance(value, dict) else "key"
            near = nearest(name, sorted(sections | top_keys))
            hint = f"did you mean {near}?" if near else f"valid: {', '.join(sorted(sections | top_keys))}"
            return f"unknown {what} {name}; {hint}"
    return ""


def _unknown_variables(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """BROKER_* variables that neither a setting, the master key nor a client reads."""
    valid = {variable(section, key) for section, key in _known()} | {MASTER_KEY_VARIABLE}
    valid |= CLIENT_VARIABLES
    unknown = sorted(
        name
        for name in env
        if name.startswith("BROKER_") and name not in valid and not name.startswith(_TOOL_PREFIXES)
    )
    # Compared without the prefix all of them share, which would make any two names look alike.
    suffixes = sorted(name.removeprefix("BROKER_") for name in valid)
    near = {name: nearest(name.removeprefix("BROKER_"), suffixes) for name in unknown}
    return tuple((name, "BROKER_" + close if close else "") for name, close in near.items())


def _address(src: _Source, key: str, default: str) -> str:
    addr = src.text("listen", key, default) or default
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen.{key} must be host:port, got {addr!r}")
    return addr


def _list(
    src: _Source, section: str, key: str, parse: Callable[[str], object], what: str = "strings"
) -> tuple[str, ...]:
    """`<section>.<key>`: a TOML list of strings or a comma-separated variable; `parse` checks each item
    (a ValueError names the problem)."""
    value, name = src.raw(section, key)
    if value is None:
        return ()
    if isinstance(value, str) and name.startswith("BROKER_"):
        items = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = [item.strip() for item in value]
    else:
        raise ConfigError(f"{name} must be a list of {what}")
    for item in items:
        try:
            parse(item)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return tuple(items)


def _count(src: _Source, key: str, default: int, low: int, high: int) -> int:
    value = src.number("egress", key, default, low, high)
    if not float(value).is_integer():
        raise ConfigError(f"{src.raw('egress', key)[1]} must be a whole number")
    return int(value)


def _whole(src: _Source, section: str, key: str, default: int, low: int, high: int) -> int:
    value = src.number(section, key, default, low, high)
    if not float(value).is_integer():
        raise ConfigError(f"{src.raw(section, key)[1]} must be a whole number")
    return int(value)


def _egress(src: _Source) -> EgressSettings:
    connect = src.number("egress", "connect_timeout", 5.0, 0.01, 300)
    total = src.number("egress", "total_timeout", 15.0, 0.01, 3600)
    if connect > total:
        raise ConfigError("egress.connect_timeout must not exceed egress.total_timeout")
    return EgressSettings(
        allow_loopback=src.flag("egress", "allow_loopback", False),
        allow_private=src.flag("egress", "allow_private", True),
        allow_cidrs=_list(src, "egress", "allow_cidrs", parse_cidr),
        deny_cidrs=_list(src, "egress", "deny_cidrs", parse_cidr),
        allow_hosts=_list(src, "egress", "allow_hosts", parse_allowed_host),
        connect_timeout=connect,
        total_timeout=total,
        max_response_bytes=_count(src, "max_response_bytes", 1024 * 1024, 1, 1 << 30),
        max_redirects=_count(src, "max_redirects", 3, 0, 20),
        proxy_connections=_count(src, "proxy_connections", 200, 1, 100_000),
    )


def _metrics_address(src: _Source) -> str:
    value, name = src.raw("metrics", "listen")
    if value is None:
        return DEFAULT_METRICS_ADDR
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be host:port, or empty to turn metrics off")
    if not value.strip():
        return ""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{name} must be host:port, or empty to turn metrics off")
    return value.strip()


@dataclass(frozen=True)
class LeaseSettings:
    """`[leases]`: the revocation worker and the reconciler of dynamic database credentials."""

    poll_seconds: float = 1.0
    batch_size: int = 50
    min_retry_seconds: float = 1.0
    max_retry_seconds: float = 300.0
    creation_grace_seconds: float = 60.0
    reconcile_seconds: float = 300.0
    timeout_seconds: float = 10.0
    # Administrative sessions per dynamic connection: open at once at most, and kept this long unused.
    admin_sessions: int = 4
    admin_idle_seconds: float = 60.0
    # Revoked leases are deleted this long after their revocation (the audit log keeps their story).
    keep_revoked_days: int = 30


def _leases(src: _Source) -> LeaseSettings:
    settings = LeaseSettings(
        poll_seconds=src.number("leases", "poll_seconds", 1.0, 0.05, 3600),
        batch_size=_whole(src, "leases", "batch_size", 50, 1, 10_000),
        min_retry_seconds=src.number("leases", "min_retry_seconds", 1.0, 0.01, 3600),
        max_retry_seconds=src.number("leases", "max_retry_seconds", 300.0, 0.01, 86400),
        creation_grace_seconds=src.number("leases", "creation_grace_seconds", 60.0, 1, 3600),
        reconcile_seconds=src.number("leases", "reconcile_seconds", 300.0, 1, 86400),
        timeout_seconds=src.number("leases", "timeout_seconds", 10.0, 0.1, 600),
        admin_sessions=_whole(src, "leases", "admin_sessions", 4, 1, 100),
        admin_idle_seconds=src.number("leases", "admin_idle_seconds", 60.0, 0, 3600),
        keep_revoked_days=_whole(src, "leases", "keep_revoked_days", 30, 1, 36500),
    )
    if settings.creation_grace_seconds <= settings.timeout_seconds:
        # Or a lease still being created would be undone under its creator.
        raise ConfigError("leases.creation_grace_seconds must be longer than leases.timeout_seconds")
    return settings


@dataclass(frozen=True)
class MonitorSettings:
    """`[monitor]`: the security monitor's rules (`service/monitor.py`); a threshold of 0 turns one off."""

    failed_tests: int = 5
    failed_tests_window_seconds: float = 600.0
    denied_resolves: int = 20
    denied_window_seconds: float = 60.0
    block_seconds: float = 0.0
    spike_factor: float = 10.0
    spike_min_count: int = 100
    spike_window_seconds: float = 60.0
    # Weight of the newest finished window in the average.
    spike_smoothing: float = 0.3
    suspend_on_spike: bool = False
    new_principal_peer: bool = True
    oauth_refresh_failures: int = 3
    oauth_refresh_window_seconds: float = 3600.0
    wrong_role: int = 20
    wrong_role_window_seconds: float = 60.0
    # "tenant/connection_id" of a webhook connection that receives every tenant's events.
    alert_webhook: str = ""
    # Keys per in-memory table, and objects remembered per subject by new_principal_peer.
    max_tracked: int = 100_000
    seen_per_subject: int = 256
    seen_flush_seconds: float = 5.0


def _monitor(src: _Source) -> MonitorSettings:
    def count(key: str, default: int) -> int:
        value = src.number("monitor", key, default, 0, 1_000_000)
        if not float(value).is_integer():
            raise ConfigError(f"{src.raw('monitor', key)[1]} must be a whole number")
        return int(value)

    def seconds(key: str, default: float) -> float:
        return src.number("monitor", key, default, 1, 86400 * 7)

    webhook = src.text("monitor", "alert_webhook", "") or ""
    if webhook:
        tenant, sep, connection_id = webhook.partition("/")
        if not sep or not tenant or not connection_id or "/" in connection_id:
            raise ConfigError(f"{src.raw('monitor', 'alert_webhook')[1]} must be tenant/connection_id")
    return MonitorSettings(
        failed_tests=count("failed_tests", 5),
        failed_tests_window_seconds=seconds("failed_tests_window_seconds", 600),
        denied_resolves=count("denied_resolves", 20),
        denied_window_seconds=seconds("denied_window_seconds", 60),
        block_seconds=src.number("monitor", "block_seconds", 0, 0, 86400 * 7),
        spike_factor=src.number("monitor", "spike_factor", 10, 1, 1_000_000),
        spike_min_count=count("spike_min_count", 100),
        spike_window_seconds=seconds("spike_window_seconds", 60),
        suspend_on_spike=src.flag("monitor", "suspend_on_spike", False),
        new_principal_peer=src.flag("monitor", "new_principal_peer", True),
        oauth_refresh_failures=count("oauth_refresh_failures", 3),
        oauth_refresh_window_seconds=seconds("oauth_refresh_window_seconds", 3600),
        wrong_role=count("wrong_role", 20),
        wrong_role_window_seconds=seconds("wrong_role_window_seconds", 60),
        alert_webhook=webhook,
    )


def _master_key_dir(src: _Source) -> Path | None:
    value, _name = src.raw("master_key", "dir")
    if value == "":
        return None
    return src.path("master_key", "dir")


def _admin_spiffe_id(item: str) -> None:
    if not item.startswith("spiffe://") or "/admin/" not in item:
        raise ValueError(f"{item[:100]!r} is not an admin SPIFFE id (spiffe://.../admin/...)")


def _operators(src: _Source) -> tuple[str, ...]:
    """`master_key.operators`: SPIFFE ids, a TOML list or a comma-separated variable."""
    return _list(src, "master_key", "operators", _admin_spiffe_id, what="SPIFFE ids")


def _storage(src: _Source) -> tuple[str | None, int, int]:
    """`storage.url` (None: SQLite at storage.path) and the PostgreSQL pool bounds."""
    value, name = src.raw("storage", "url")
    url: str | None = None
    if value is not None and value != "":
        if not isinstance(value, str) or not value.strip().startswith(("postgresql://", "postgres://")):
            # The value is not echoed: it may carry a password.
            raise ConfigError(f"{name} must be a postgresql:// URL")
        url = value.strip()
    pool_min = _whole(src, "storage", "pool_min", 1, 0, 1000)
    pool_max = _whole(src, "storage", "pool_max", 10, 1, 1000)
    if pool_min > pool_max:
        raise ConfigError("storage.pool_min must not exceed storage.pool_max")
    return url, pool_min, pool_max


def _build(src: _Source) -> Settings:
    tls = TlsFiles(
        cert=src.required_path("tls", "cert"),
        key=src.required_path("tls", "key"),
        client_ca=src.required_path("tls", "client_ca"),
    )
    old = _list(src, "master_key", "old_files", str, what="paths")
    key_dir, operators = _master_key_dir(src), _operators(src)
    if key_dir is not None and (old or src.path("master_key", "file") or src.env.get(MASTER_KEY_VARIABLE)):
        raise ConfigError(
            "master_key.dir replaces master_key.file, master_key.old_files and BROKER_MASTER_KEY: "
            "set only one"
        )
    level = (src.text("log", "level", "info") or "info").lower()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"log.level must be one of {', '.join(_LOG_LEVELS)}")
    storage_url, pool_min, pool_max = _storage(src)
    trust_domain = src.text("", "trust_domain", "broker.local") or "broker.local"
    if "/" in trust_domain or ":" in trust_domain:
        raise ConfigError("trust_domain must be a bare name such as broker.local")
    return Settings(
        tls=tls,
        storage_path=src.path("storage", "path") if storage_url else src.required_path("storage", "path"),
        storage_url=storage_url,
        storage_pool_min=pool_min,
        storage_pool_max=pool_max,
        master_key_file=src.path("master_key", "file"),
        master_key_env=src.env.get(MASTER_KEY_VARIABLE) or None,
        old_master_key_files=tuple(src.base / Path(p).expanduser() for p in old),
        master_key_dir=key_dir,
        master_key_operators=operators,
        superseded_grace_seconds=src.number("resolve", "superseded_grace_seconds", 3600, 0, 86400 * 30),
        admin_addr=_address(src, "admin", DEFAULT_ADMIN_ADDR),
        resolve_addr=_address(src, "resolve", DEFAULT_RESOLVE_ADDR),
        trust_domain=trust_domain,
        cache_ttl_seconds=int(src.number("resolve", "cache_ttl_seconds", 60, 0, 86400)),
        resolve_cache_entries=_whole(src, "resolve", "cache_entries", 100_000, 1, 100_000_000),
        log_level=level,
        grace_seconds=src.number("server", "grace_seconds", 20.0, 0, 600),
        workers=int(src.number("server", "workers", 1, 1, 64)),
        reflection=src.flag("server", "reflection", True),
        drain_delay_seconds=src.number("server", "drain_delay_seconds", 1.0, 0, 600),
        handshake_timeout_seconds=src.number("server", "handshake_timeout_seconds", 10.0, 0.1, 600),
        max_connection_age_seconds=src.number("server", "max_connection_age_seconds", 3600.0, 1, 86400 * 7),
        max_connection_age_grace_seconds=src.number(
            "server", "max_connection_age_grace_seconds", 300.0, 1, 86400
        ),
        max_connection_idle_seconds=src.number("server", "max_connection_idle_seconds", 300.0, 1, 86400 * 7),
        tls_reload_seconds=src.number("tls", "reload_interval_seconds", 5.0, 0, 3600),
        health_probe_seconds=src.number("health", "store_probe_seconds", 5.0, 0.1, 3600),
        health_cert=src.path("health", "cert"),
        health_key=src.path("health", "key"),
        health_server_name=src.text("health", "server_name"),
        tests_per_minute=int(src.number("limits", "tests_per_minute", 30, 1, 100_000)),
        resolve_per_second=src.number("limits", "resolve_per_second", 200, 0.01, 1_000_000),
        resolve_burst=int(src.number("limits", "resolve_burst", 400, 1, 1_000_000)),
        proxy_per_second=src.number("limits", "proxy_per_second", 50, 0.01, 1_000_000),
        proxy_burst=int(src.number("limits", "proxy_burst", 100, 1, 1_000_000)),
        proxy_in_flight=int(src.number("limits", "proxy_in_flight", 16, 1, 100_000)),
        admin_writes_per_minute=int(src.number("limits", "admin_writes_per_minute", 600, 1, 1_000_000)),
        denied_audits_per_minute=int(src.number("limits", "denied_audits_per_minute", 10, 0, 1_000_000)),
        metrics_listen=_metrics_address(src),
        oauth_refresh_margin_seconds=src.number("oauth", "refresh_margin_seconds", 300, 0, 86400),
        oauth_default_token_lifetime_seconds=src.number(
            "oauth", "default_token_lifetime_seconds", 3600, 60, 86400 * 30
        ),
        oauth_refresh_interval_seconds=src.number("oauth", "refresh_interval_seconds", 30, 1, 3600),
        stale_after_days=src.number("testing", "stale_after_days", 7.0, 0, 3650),
        audit_retention_days=_whole(src, "audit", "retention_days", 365, 90, 36500),
        audit_seal_interval_seconds=src.number("audit", "seal_interval_seconds", 60, 1, 3600),
        egress=_egress(src),
        monitor=_monitor(src),
        leases=_leases(src),
    )
