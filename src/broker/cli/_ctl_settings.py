"""Where `brokerctl` connects and as whom, settled once from four layers.

Each setting comes from the first layer that has it: command-line flags, then `BROKER_*`
variables, then a profile from `brokerctl.toml`, then the layout `broker dev` makes.

    default = "prod"                    # the profile used without --profile / BROKER_PROFILE
    [profiles.prod]
    addr = "broker.internal:50051"      # BROKER_ADDR           --addr
    resolve_addr = "broker.internal:50052"  # BROKER_RESOLVE_ADDR   --resolve-addr
    ca = "prod/ca.pem"                  # BROKER_CA             --ca
    cert = "prod/admin.pem"             # BROKER_CERT           --cert (both identities)
    key = "prod/admin-key.pem"          # BROKER_KEY            --key  (both identities)
    executor_cert = "prod/executor.pem"     # BROKER_EXECUTOR_CERT  (for `resolve`)
    executor_key = "prod/executor-key.pem"  # BROKER_EXECUTOR_KEY
    server_name = "broker.internal"     # BROKER_SERVER_NAME    --server-name
    timeout = 10                        # BROKER_TIMEOUT        --timeout
    data_dir = "dev"                    # BROKER_DATA_DIR       --data-dir

A data directory stands for the files `broker dev` keeps in DIR/tls, at its own layer: an
explicit file in the same layer wins over it, and it wins over every lower layer. Paths in
the profile file are relative to its folder; `~` is expanded in the file and in variables.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.cli._ctl_args import DEFAULT_DATA_DIR
from broker.cli._input import UsageError
from broker.cli._rpc import ClientTls
from broker.config import CLIENT_PROFILE_VARIABLE as PROFILE_VARIABLE
from broker.config import CLIENT_SETTINGS, DEFAULT_ADMIN_ADDR, DEFAULT_RESOLVE_ADDR, nearest

DEFAULT_TIMEOUT = 10.0
# Setting -> the variable that sets it (the table lives in config.py, which the server reads too).
VARIABLES = CLIENT_SETTINGS

_PATHS = {"ca", "cert", "key", "executor_cert", "executor_key", "data_dir"}
_PAIRS = (("cert", "key"), ("executor_cert", "executor_key"))
_FLAGS = {"addr", "resolve_addr", "ca", "cert", "key", "server_name", "timeout", "data_dir"}
_FILE_KEYS = ("default", "profiles")

Layer = dict[str, Any]


@dataclass(frozen=True)
class CtlSettings:
    """Everything brokerctl needs to open its two channels."""

    addr: str
    resolve_addr: str
    admin: ClientTls
    executor: ClientTls
    server_name: str | None
    timeout: float


def profile_file(environ: Mapping[str, str]) -> Path:
    """`$XDG_CONFIG_HOME/broker/brokerctl.toml`, else `~/.config/broker/brokerctl.toml`."""
    xdg = environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "broker" / "brokerctl.toml"
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    return home / ".config" / "broker" / "brokerctl.toml"


def resolve(args: argparse.Namespace, environ: Mapping[str, str], profile_path: Path) -> CtlSettings:
    """The settings of this run: flags, then variables, then the profile, then the dev defaults.

    Every problem (a bad value, an unknown profile or key, an unreadable profile file) is a
    `UsageError` naming where it came from.
    """
    flags = _flag_layer(args)
    env = _env_layer(environ)
    wanted, asked_by = _wanted_profile(args, environ)
    profile = _profile_layer(profile_path, wanted, asked_by)
    defaults: Layer = {
        "addr": DEFAULT_ADMIN_ADDR,
        "resolve_addr": DEFAULT_RESOLVE_ADDR,
        "timeout": DEFAULT_TIMEOUT,
        "data_dir": DEFAULT_DATA_DIR,
    }
    layers = (flags, env, profile, defaults)

    def first(setting: str) -> Any:
        return next((layer[setting] for layer in layers if setting in layer), None)

    return CtlSettings(
        addr=first("addr"),
        resolve_addr=first("resolve_addr"),
        admin=_identity(layers, "", "admin"),
        executor=_identity(layers, "executor_", "executor"),
        server_name=first("server_name"),
        timeout=first("timeout"),
    )


def _identity(layers: tuple[Layer, ...], prefix: str, stem: str) -> ClientTls:
    """One identity's files: each from the first layer naming it or naming a data directory."""

    def file(setting: str, dev_name: str) -> Path:
        for layer in layers:
            if setting in layer:
                return Path(layer[setting])
            if "data_dir" in layer:
                return Path(layer["data_dir"]) / "tls" / dev_name
        raise AssertionError("the defaults layer has a data directory")

    return ClientTls(
        ca=file("ca", "ca.pem"),
        cert=file(f"{prefix}cert", f"{stem}.pem"),
        key=file(f"{prefix}key", f"{stem}-key.pem"),
    )


def _flag_layer(args: argparse.Namespace) -> Layer:
    layer = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    _check_pairs(layer, lambda setting: "--" + setting.replace("_", "-"))
    if "timeout" in layer:
        layer["timeout"] = _timeout(layer["timeout"], "--timeout")
    # A certificate given on the command line is the identity for this command, whichever it is.
    for setting in ("cert", "key"):
        if setting in layer:
            layer[f"executor_{setting}"] = layer[setting]
    return layer


def _env_layer(environ: Mapping[str, str]) -> Layer:
    # An empty variable counts as unset, as `BROKER_ADDR= brokerctl ...` means to a shell user.
    layer: Layer = {name: environ[var] for name, var in VARIABLES.items() if environ.get(var)}
    _check_pairs(layer, VARIABLES.__getitem__)
    for name in _PATHS & layer.keys():
        layer[name] = Path(layer[name]).expanduser()
    if "timeout" in layer:
        layer["timeout"] = _timeout(layer["timeout"], VARIABLES["timeout"])
    return layer


def _wanted_profile(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str | None, str]:
    flag = getattr(args, "profile", None)
    if flag is not None:
        return flag, f"--profile {flag}"
    variable = environ.get(PROFILE_VARIABLE)
    if variable:
        return variable, f"{PROFILE_VARIABLE}={variable}"
    return None, ""


def _profile_layer(path: Path, wanted: str | None, asked_by: str) -> Layer:
    """The chosen profile's settings: the one asked for, else the file's `default`, else none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if wanted is None:
            return {}
        raise UsageError(
            f"{asked_by}: there is no profile file {path}; write one with a [profiles.{wanted}] "
            "table (see README, 'Pointing brokerctl at a broker')"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read the profile file {path}: {reason}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"the profile file {path} is not valid TOML: {exc}") from None
    profiles = _check_file(path, doc)
    if wanted is None:
        wanted, asked_by = doc.get("default"), f"default = {doc.get('default')!r}"
        if wanted is None:
            return {}
    if wanted not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise UsageError(
            f"{path} has no profile {wanted!r} ({asked_by}){_did_you_mean(wanted, profiles)}; "
            f"its profiles: {known}"
        )
    return _profile_values(path, profiles[wanted])


def _check_file(path: Path, doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The file's profiles, every one checked, so a typo anywhere is found before it matters."""
    for key in doc:
        if key not in _FILE_KEYS:
            raise UsageError(f"{path}: unknown key {key!r}{_did_you_mean(key, _FILE_KEYS)}")
    if not isinstance(doc.get("default", ""), str):
        raise UsageError(f"{path}: default must be a profile name (a string)")
    profiles = doc.get("profiles", {})
    if not isinstance(profiles, dict):
        raise UsageError(f"{path}: profiles must be a table of [profiles.NAME] tables")
    for name, table in profiles.items():
        if not isinstance(table, dict):
            raise UsageError(f"{path}: profiles.{name} must be a table ([profiles.{name}])")
        for key, value in table.items():
            where = f"{path}: profiles.{name}.{key}"
            if key not in VARIABLES:
                raise UsageError(
                    f"{path}: unknown key {key!r} in [profiles.{name}]{_did_you_mean(key, VARIABLES)}"
                )
            if key == "timeout":
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise UsageError(f"{where} must be a number of seconds")
                _timeout(value, where)
            elif not isinstance(value, str) or not value:
                raise UsageError(f"{where} must be a non-empty string")
        _check_pairs(table, _prefixed(f"profiles.{name}."), where=f"{path}: ")
    return profiles


def _profile_values(path: Path, table: dict[str, Any]) -> Layer:
    layer = dict(table)
    for setting in _PATHS & layer.keys():
        # Relative to the file, so a profile means the same thing from any working directory.
        layer[setting] = path.parent / Path(layer[setting]).expanduser()
    if "timeout" in layer:
        layer["timeout"] = float(layer["timeout"])
    return layer


def _prefixed(prefix: str) -> Callable[[str], str]:
    return lambda setting: prefix + setting


def _check_pairs(layer: Layer, named: Callable[[str], str], where: str = "") -> None:
    for cert, key in _PAIRS:
        if (cert in layer) != (key in layer):
            given, missing = (cert, key) if cert in layer else (key, cert)
            raise UsageError(
                f"{where}{named(given)} is set but {named(missing)} is not: "
                "a certificate and its key go together"
            )


def _timeout(value: Any, source: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"{source} must be a positive number of seconds, not {value!r}")
    return seconds


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = nearest(word, choices)
    return f"; did you mean {close!r}?" if close else ""
