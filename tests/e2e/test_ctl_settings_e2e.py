"""Pointing the real `brokerctl` at a broker with BROKER_* variables and profiles, and the hints
`brokerctl` and `broker health` give when the broker cannot be reached."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.devbroker import BROKERCTL, DevBroker
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

BROKER = [sys.executable, "-m", "broker.cli.broker"]


def run(argv: list[str], cwd: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """ARGV from CWD in this environment without any BROKER_* or XDG_CONFIG_HOME, plus ENV."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_") and k != "XDG_CONFIG_HOME"}
    return subprocess.run(
        argv, cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty working directory (no .broker-dev) that is also $HOME."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def brokerctl(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`brokerctl ARGS` with no connection flag but those in ARGS, from and with HOME."""
    return run([*BROKERCTL, *args], home, {"HOME": str(home), **env})


def test_variables_or_a_profile_alone_reach_the_broker_and_flags_beat_variables_beat_profiles(
    dev_broker: DevBroker, home: Path, tmp_path: Path
) -> None:
    tls = dev_broker.data_dir / "tls"
    refused = f"127.0.0.1:{free_port()}"
    variables = {
        "BROKER_ADDR": dev_broker.admin_addr,
        "BROKER_RESOLVE_ADDR": dev_broker.resolve_addr,
        "BROKER_CA": str(tls / "ca.pem"),
        "BROKER_CERT": str(tls / "admin.pem"),
        "BROKER_KEY": str(tls / "admin-key.pem"),
        "BROKER_EXECUTOR_CERT": str(tls / "executor.pem"),
        "BROKER_EXECUTOR_KEY": str(tls / "executor-key.pem"),
    }
    result = brokerctl(home, "--json", "types", **variables)
    assert result.returncode == 0, result.stderr
    # The grant check's answer, not "requires the executor role": Resolve was reached as the executor.
    result = brokerctl(home, "resolve", "nothing-here", "--by-name", **variables)
    assert (result.returncode, result.stderr) == (
        1,
        "brokerctl: PERMISSION_DENIED: not permitted to resolve this connection\n",
    )

    # A profile in $XDG_CONFIG_HOME; paths relative to the file's folder.
    config = tmp_path / "xdg" / "broker"
    config.mkdir(parents=True)
    data_dir = os.path.relpath(dev_broker.data_dir, config)
    (config / "brokerctl.toml").write_text(
        f'[profiles.dev]\naddr = "{dev_broker.admin_addr}"\ndata_dir = "{data_dir}"\n'
        f'[profiles.elsewhere]\naddr = "{refused}"\ndata_dir = "{data_dir}"\n'
    )
    xdg = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    # profile > defaults: nothing else says where the broker is.
    assert brokerctl(home, "--profile", "dev", "types", **xdg).returncode == 0
    result = brokerctl(home, "--profile", "elsewhere", "types", **xdg)
    assert result.returncode == 1 and f"nothing is listening on {refused}" in result.stderr
    # variables > profile
    result = brokerctl(home, "--profile", "elsewhere", "types", **xdg, BROKER_ADDR=dev_broker.admin_addr)
    assert result.returncode == 0, result.stderr
    # flags > variables
    result = brokerctl(
        home, "--profile", "dev", "--addr", dev_broker.admin_addr, "types", **xdg, BROKER_ADDR=refused
    )
    assert result.returncode == 0, result.stderr


def test_a_bad_profile_is_a_usage_error_that_names_file_profile_and_key(home: Path) -> None:
    path = home / ".config" / "broker" / "brokerctl.toml"
    path.parent.mkdir(parents=True)
    path.write_text('[profiles.prod]\naddr = "broker.internal:50051"\n')
    result = brokerctl(home, "--profile", "prd", "types")
    assert (result.returncode, result.stderr) == (
        2,
        f"brokerctl: error: {path} has no profile 'prd' (--profile prd); did you mean 'prod'?; "
        "its profiles: prod\n",
    )
    path.write_text('[profiles.prod]\nserver_nme = "broker.internal"\n')
    result = brokerctl(home, "types")
    assert (result.returncode, result.stderr) == (
        2,
        f"brokerctl: error: {path}: unknown key 'server_nme' in [profiles.prod]; "
        "did you mean 'server_name'?\n",
    )
    path.write_text("[profiles.prod\n")
    result = brokerctl(home, "types")
    assert result.returncode == 2
    assert result.stderr.startswith(f"brokerctl: error: the profile file {path} is not valid TOML: ")
    assert "Traceback" not in result.stderr


@contextmanager
def silent_server() -> Iterator[str]:
    """A TCP listener that accepts connections and never says a word: HOST:PORT."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in [*held, listener]:
            conn.close()


def dev_default_is_free() -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", 50051)) != 0


def test_failures_to_reach_the_broker_get_the_hint_that_matches(dev_broker: DevBroker, home: Path) -> None:
    # The dev certificate names localhost and 127.0.0.1, not wrong.example.
    result = dev_broker.ctl("--server-name", "wrong.example", "types", json_output=False)
    addr = dev_broker.admin_addr
    assert result.returncode == 1 and "Hostname Verification Check failed" in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"brokerctl: hint: the server certificate at {addr} does not hold wrong.example (the server name "
        "given): pass --server-name (BROKER_SERVER_NAME, or server_name in the profile) with a name it "
        "holds, or issue a server certificate for wrong.example "
        "(`broker init --host wrong.example` or `broker certs server --host wrong.example`)"
    )
    probe = [*BROKER, "health", "--data-dir", str(dev_broker.data_dir), "--target", dev_broker.resolve_addr]
    result = run([*probe, "--server-name", "wrong.example"], home, {})
    assert result.returncode == 1 and result.stdout.startswith(f"UNREACHABLE: {dev_broker.resolve_addr}")
    assert result.stderr.startswith(
        f"broker: hint: the server certificate at {dev_broker.resolve_addr} does not hold wrong.example"
    )
    assert "pass --server-name with a name it holds" in result.stderr

    files = ("--data-dir", str(dev_broker.data_dir))
    refused = f"127.0.0.1:{free_port()}"
    result = brokerctl(home, *files, "--addr", refused, "types")
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"brokerctl: hint: nothing is listening on {refused} (connection refused): check the address "
        "(--addr, BROKER_ADDR or the profile's addr; --resolve-addr for `resolve`)"
    )
    if dev_default_is_free():
        result = brokerctl(home, *files, "types")
        assert result.returncode == 1
        assert result.stderr.splitlines()[-1].startswith(
            "brokerctl: hint: nothing is listening on 127.0.0.1:50051, the `broker dev` default: "
            "start a local broker with `make run` (or `broker dev`)"
        )

    with silent_server() as silent:
        result = brokerctl(home, *files, "--addr", silent, "--timeout", "1", "types")
    assert result.returncode == 1 and "DEADLINE_EXCEEDED" in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"brokerctl: hint: no answer from {silent} within 1 s (timeout): check the address (--addr, "
        "BROKER_ADDR or the profile's addr; --resolve-addr for `resolve`), or allow longer with "
        "--timeout (BROKER_TIMEOUT)"
    )
