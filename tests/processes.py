"""`broker serve` in subprocesses: one broker (`Served`), or N replicas of one deployment (`Replicas`).

The layout in a test's folder (`root`), shared by every process started from it:

    tls/ca.pem, tls/server.pem, tls/server-key.pem      one CA; the server certificate
                                                        (localhost, 127.0.0.1)
    tls/<who>.pem, tls/<who>-key.pem                   client identities (`Pki.issue`, `Pki.identity`)
    master.key                                         one master key
    <name>.toml, <name>-<run>.log                      each process's settings, and a log per start

Settings are TOML sections as dicts (`render_toml`); `broker_settings` gives the sections every
broker here needs (listeners, TLS, master key, health probe identity, metrics), and a test adds
or overrides sections (`merge`). Relative paths in the TOML are relative to `root`, which is also
each process's working directory.

`Served.start()` spawns a process and waits until `broker health` (the container probe) reports
SERVING. `Replicas.start()` spawns all of its processes at once and waits for them together (a
broker takes seconds to start; in series that would add up), with a bounded deadline; a replica
that could not bind a port it was given (another process took it in between) gets new ports and
another try. Every failure message carries the processes' logs. `close()` kills what is left,
with bounded waits.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker import pki
from tests.helpers import free_port

BROKER = [sys.executable, "-m", "broker.cli.broker"]
PROBE = "spiffe://broker.local/tenant/default/executor/probe"
Sections = Mapping[str, Mapping[str, Any]]


# ------------------------------------------------------------------ settings files


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def render_toml(sections: Sections) -> str:
    """TOML for `{section: {key: value}}`; the section "" holds top-level keys."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in sections.get("", {}).items()]
    for section, values in sections.items():
        if section:
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
    return "\n".join(lines) + "\n"


def merge(*layers: Sections) -> dict[str, dict[str, Any]]:
    """Sections merged key by key; later layers win."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return merged


def broker_settings(admin: str, resolve: str, metrics: str = "") -> dict[str, dict[str, Any]]:
    """What every broker started here needs: its listeners, and the files `prepare` writes."""
    return {
        "listen": {"admin": admin, "resolve": resolve},
        "tls": {"cert": "tls/server.pem", "key": "tls/server-key.pem", "client_ca": "tls/ca.pem"},
        "master_key": {"file": "master.key"},
        "health": {"cert": "tls/probe.pem", "key": "tls/probe-key.pem"},
        "metrics": {"listen": metrics},
    }


# ------------------------------------------------------------------ identities


class Pki:
    """A CA in `<root>/tls`, the server's certificate, and client identities issued from it."""

    def __init__(self, tls: Path, common_name: str = "test CA") -> None:
        self.dir = tls
        tls.mkdir(parents=True, exist_ok=True)
        self.ca, self._ca_key = pki.create_ca(common_name)
        (tls / "ca.pem").write_bytes(self.ca)
        self._write("server", pki.issue_server_cert(self.ca, self._ca_key, ["localhost", "127.0.0.1"]))
        self._by_principal: dict[str, str] = {}

    def _write(self, who: str, pair: tuple[bytes, bytes]) -> None:
        cert, key = pair
        (self.dir / f"{who}.pem").write_bytes(cert)
        pki.write_private(self.dir / f"{who}-key.pem", key)

    def issue(self, who: str, principal: str) -> str:
        """Write `tls/<who>.pem` and its key for the SPIFFE id `principal`; return `who`."""
        self._write(who, pki.issue_principal_cert(self.ca, self._ca_key, principal))
        self._by_principal[principal] = who
        return who

    def identity(self, principal: str) -> str:
        """The file stem (`who`) of an identity for `principal`, issued on first use."""
        who = self._by_principal.get(principal)
        return who if who is not None else self.issue(f"id{len(self._by_principal)}", principal)

    def credentials(self, who: str) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.ca,
            (self.dir / f"{who}-key.pem").read_bytes(),
            (self.dir / f"{who}.pem").read_bytes(),
        )


def prepare(root: Path, identities: Mapping[str, str], common_name: str = "test CA") -> Pki:
    """The shared files in `root`: the TLS material (`identities`: who -> SPIFFE id) and a master key."""
    tls = Pki(root / "tls", common_name)
    for who, principal in identities.items():
        tls.issue(who, principal)
    pki.write_private(root / "master.key", base64.b64encode(os.urandom(32)))
    return tls


# ------------------------------------------------------------------ one process


@dataclass
class Served:
    """A `broker serve` set-up: its files, and the process while it runs."""

    root: Path
    config: Path
    admin_addr: str
    resolve_addr: str
    metrics_addr: str = ""
    name: str = "broker"  # the logs are <root>/<name>-<run>.log
    env: Mapping[str, str] | None = None  # the environment of the process (None: this one's)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # on top of `broker_settings`
    serve_args: tuple[str, ...] = ()  # after `broker serve --config FILE` (e.g. --workers 2)
    process: subprocess.Popen[bytes] | None = None
    runs: int = 0

    @classmethod
    def create(
        cls,
        root: Path,
        name: str,
        settings: Sections | None = None,
        *,
        metrics: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Served:
        """Free ports for the listeners (and metrics), and `<root>/<name>.toml` with `settings` on top."""
        admin, resolve = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        metrics_addr = f"127.0.0.1:{free_port()}" if metrics else ""
        served = cls(
            root, root / f"{name}.toml", admin, resolve, metrics_addr, name, env, merge(settings or {})
        )
        served.write_config()
        return served

    def write_config(self) -> None:
        base = broker_settings(self.admin_addr, self.resolve_addr, self.metrics_addr)
        self.config.write_text(render_toml(merge(base, self.settings)))

    def new_ports(self) -> None:
        """Other free ports (the ones given were taken meanwhile); rewrites the settings file."""
        self.admin_addr, self.resolve_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        if self.metrics_addr:
            self.metrics_addr = f"127.0.0.1:{free_port()}"
        self.write_config()

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    @property
    def metrics_url(self) -> str:
        assert self.metrics_addr, f"{self.name} has no metrics listener"
        return f"http://{self.metrics_addr}/metrics"

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process; do not wait for it."""
        self.runs += 1
        out = (self.root / f"{self.name}-{self.runs}.log").open("wb")
        argv = [*BROKER, "serve", "--config", str(self.config), *self.serve_args]
        env = None if self.env is None else dict(self.env)
        self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.root, env=env)
        out.close()
        return self.process

    def start(self, timeout: float = 20) -> subprocess.Popen[bytes]:
        """Spawn, and return once `broker health` reports SERVING."""
        process = self.spawn()
        deadline = time.monotonic() + timeout
        while True:
            # The probe container's way of asking: exit 0 only once SERVING.
            probe = subprocess.run(
                [*BROKER, "health", "--config", str(self.config)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env=None if self.env is None else dict(self.env),
            )
            if probe.returncode == 0:
                assert probe.stdout.startswith("SERVING")
                return process
            assert process.poll() is None, f"broker exited early:\n{self.logs()}"
            assert time.monotonic() < deadline, (
                f"not SERVING in time: {probe.stdout}{probe.stderr}\n{self.logs()}"
            )
            time.sleep(0.2)

    def serving(self, timeout: float = 1.0) -> bool:
        """One health check of the resolve listener, in this process (cheaper than `broker health`)."""
        tls = self.root / "tls"
        credentials = grpc.ssl_channel_credentials(
            (tls / "ca.pem").read_bytes(),
            (tls / "probe-key.pem").read_bytes(),
            (tls / "probe.pem").read_bytes(),
        )
        with grpc.secure_channel(self.resolve_addr, credentials) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout
                )
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logs(self, tail: int | None = None) -> str:
        """Every run's log (the last `tail` lines of each)."""
        parts = []
        for path in sorted(self.root.glob(f"{self.name}-*.log")):
            text = path.read_text(errors="replace")
            if tail is not None:
                text = "\n".join(text.splitlines()[-tail:])
            parts.append(text if tail is None else f"--- {path.name} (last {tail} lines)\n{text}\n")
        return "".join(parts)

    def channel(self, who: str, addr: str) -> grpc.aio.Channel:
        tls = self.root / "tls"
        creds = grpc.ssl_channel_credentials(
            (tls / "ca.pem").read_bytes(),
            (tls / f"{who}-key.pem").read_bytes(),
            (tls / f"{who}.pem").read_bytes(),
        )
        return grpc.aio.secure_channel(addr, creds)

    def kill(self, timeout: float = 10) -> None:
        """SIGKILL the process if it still runs, and reap it (bounded)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)


# ------------------------------------------------------------------ replicas


def without_broker_variables() -> dict[str, str]:
    """This environment minus BROKER_* (a developer's BROKER_STORAGE_URL must not leak in)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}


_BIND_FAILED = re.compile(r"cannot listen on|is in use \(another broker\?\)")


class Replicas:
    """`count` brokers sharing one CA, server certificate and master key, each with its own
    settings file (own admin, resolve and metrics ports) built from the same `settings`."""

    def __init__(
        self,
        root: Path,
        count: int,
        settings: Sections,
        identities: Mapping[str, str] | None = None,
        *,
        metrics: bool = True,
    ) -> None:
        self.root = root
        self.pki = prepare(root, {"probe": PROBE, **(identities or {})}, "replicas test CA")
        env = without_broker_variables()
        self.members = [
            Served.create(root, f"replica-{chr(ord('a') + i)}", settings, metrics=metrics, env=env)
            for i in range(count)
        ]

    def __getitem__(self, index: int) -> Served:
        return self.members[index]

    def __iter__(self) -> Iterator[Served]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def start(self, timeout: float = 45, bind_retries: int = 2) -> None:
        """Spawn every replica at once; return when all are SERVING, or fail with their logs."""
        for member in self.members:
            member.spawn()
        deadline = time.monotonic() + timeout
        waiting = list(self.members)
        retries = dict.fromkeys(range(len(self.members)), bind_retries)
        while waiting:
            for member in list(waiting):
                if member.running():
                    if member.serving(timeout=0.5):
                        waiting.remove(member)
                    continue
                index = self.members.index(member)
                if _BIND_FAILED.search(member.logs(tail=20)) and retries[index] > 0:
                    retries[index] -= 1
                    member.new_ports()
                    member.spawn()
                    continue
                raise AssertionError(f"{member.name} exited early:\n{self.logs(tail=60)}")
            if waiting and time.monotonic() > deadline:
                names = ", ".join(m.name for m in waiting)
                raise AssertionError(f"not SERVING within {timeout:.0f}s: {names}\n{self.logs(tail=60)}")
            time.sleep(0.2)

    def assert_running(self) -> None:
        dead = [m.name for m in self.members if not m.running()]
        assert not dead, f"replicas exited: {dead}\n{self.logs(tail=60)}"

    def logs(self, tail: int | None = None) -> str:
        return "\n".join(f"===== {m.name}\n{m.logs(tail)}" for m in self.members)

    def close(self, timeout: float = 10) -> None:
        for member in self.members:
            if member.running():
                member.process.kill()  # type: ignore[union-attr]
        for member in self.members:
            member.kill(timeout)
