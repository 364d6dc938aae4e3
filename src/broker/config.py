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
    [storage]
    path = "broker.db"              # BROKER_STORAGE_PATH
    [master_key]
    file = "master.key"             # BROKER_MASTER_KEY_FILE (or the key itself in BROKER_MASTER_KEY)
    old_files = []                  # keys kept for unwrapping only, during rotation
    [resolve]
    cache_ttl_seconds = 60          # BROKER_RESOLVE_CACHE_TTL_SECONDS
    [log]
    level = "info"                  # BROKER_LOG_LEVEL
    [server]
    grace_seconds = 20              # BROKER_SERVER_GRACE_SECONDS
    reflection = true               # BROKER_SERVER_REFLECTION

Relative paths in the file are relative to the file's folder.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.crypto import Kek, KeyError_, Keyring
from broker.errors import ConfigError

_LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class Settings:
    tls: TlsFiles
    storage_path: Path
    master_key_file: Path | None = None
    # The base64 key from BROKER_MASTER_KEY; never printed (repr=False).
    master_key_env: str | None = field(default=None, repr=False)
    old_master_key_files: tuple[Path, ...] = ()
    admin_addr: str = "127.0.0.1:50051"
    resolve_addr: str = "127.0.0.1:50052"
    trust_domain: str = "broker.local"
    cache_ttl_seconds: int = 60
    log_level: str = "info"
    grace_seconds: float = 20.0
    reflection: bool = True

    @classmethod
    def load(cls, path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the TOML file (optional) and override with BROKER_* variables."""
        env = dict(os.environ if environ is None else environ)
        doc: dict[str, Any] = {}
        base = Path.cwd()
        if path is not None:
            try:
                doc = tomllib.loads(path.read_text())
            except OSError as exc:
                raise ConfigError(f"config file {path}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path}: {exc}") from None
            base = path.resolve().parent
        return _build(_Source(doc, env, base))

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
        )

    def load_keyring(self) -> Keyring:
        """The master key (active) and any older keys, read from their files or the environment."""
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

    def raw(self, section: str, key: str) -> tuple[Any, str]:
        """The value from the environment, else the file; and the setting's name for errors."""
        name = f"{section}.{key}" if section else key
        env_name = "BROKER_" + name.replace(".", "_").upper()
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
            env_name = f"BROKER_{section}_{key}".upper()
            raise ConfigError(f"{section}.{key} is required (or set {env_name})")
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


def _address(src: _Source, key: str, default: str) -> str:
    addr = src.text("listen", key, default) or default
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen.{key} must be host:port, got {addr!r}")
    return addr


def _build(src: _Source) -> Settings:
    tls = TlsFiles(
        cert=src.required_path("tls", "cert"),
        key=src.required_path("tls", "key"),
        client_ca=src.required_path("tls", "client_ca"),
    )
    old = src.doc.get("master_key", {}).get("old_files", [])
    if not isinstance(old, list) or not all(isinstance(p, str) for p in old):
        raise ConfigError("master_key.old_files must be a list of paths")
    level = (src.text("log", "level", "info") or "info").lower()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"log.level must be one of {', '.join(_LOG_LEVELS)}")
    trust_domain = src.text("", "trust_domain", "broker.local") or "broker.local"
    if "/" in trust_domain or ":" in trust_domain:
        raise ConfigError("trust_domain must be a bare name such as broker.local")
    return Settings(
        tls=tls,
        storage_path=src.required_path("storage", "path"),
        master_key_file=src.path("master_key", "file"),
        master_key_env=src.env.get("BROKER_MASTER_KEY") or None,
        old_master_key_files=tuple(src.base / Path(p).expanduser() for p in old),
        admin_addr=_address(src, "admin", "127.0.0.1:50051"),
        resolve_addr=_address(src, "resolve", "127.0.0.1:50052"),
        trust_domain=trust_domain,
        cache_ttl_seconds=int(src.number("resolve", "cache_ttl_seconds", 60, 0, 86400)),
        log_level=level,
        grace_seconds=src.number("server", "grace_seconds", 20.0, 0, 600),
        reflection=src.flag("server", "reflection", True),
    )
