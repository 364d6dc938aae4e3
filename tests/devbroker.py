"""`broker dev` in a subprocess, driven by `brokerctl` in subprocesses: what e2e tests use.

The fixture `dev_broker` (tests/e2e/conftest.py) starts one per test in the test's folder, on
free ports, and kills it afterwards. `ctl` runs `brokerctl` against it with `--json` (or not),
an optional environment and optional standard input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

BROKERCTL = [sys.executable, "-m", "broker.cli.brokerctl"]
START_TIMEOUT = 15.0


@dataclass
class DevBroker:
    process: subprocess.Popen[bytes]
    data_dir: Path
    admin_addr: str
    resolve_addr: str
    stdout: Path
    stderr: Path

    def logs(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def ctl_argv(self, json_output: bool = True) -> list[str]:
        argv = [*BROKERCTL, "--data-dir", str(self.data_dir)]
        argv += ["--addr", self.admin_addr, "--resolve-addr", self.resolve_addr, "--timeout", "20"]
        return [*argv, "--json"] if json_output else argv

    def ctl(
        self,
        *args: str,
        json_output: bool = True,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `brokerctl [--json] ARGS` against this broker; `env` is added to this environment."""
        return subprocess.run(
            [*self.ctl_argv(json_output), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            input=stdin,
            env={**os.environ, **(env or {})},
        )

    def ok(self, *args: str) -> tuple[Any, str]:
        """`ctl` that must succeed: (parsed JSON stdout, raw stdout + stderr)."""
        result = self.ctl(*args)
        assert result.returncode == 0, f"brokerctl {' '.join(args)} failed:\n{result.stderr}\n{self.logs()}"
        return json.loads(result.stdout), result.stdout + result.stderr


def start_dev_broker(root: Path) -> Iterator[DevBroker]:
    """A `broker dev` with its data in ROOT/dev, serving until the generator is closed."""
    data_dir = root / "dev"
    admin, resolve = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    stdout, stderr = root / "broker.out", root / "broker.err"
    argv = [sys.executable, "-m", "broker.cli.broker", "dev", "--data-dir", str(data_dir)]
    argv += ["--admin-addr", admin, "--resolve-addr", resolve, "--metrics-addr", f"127.0.0.1:{free_port()}"]
    # Files, not pipes: a chatty server must never block on a full pipe nobody reads.
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err, cwd=root)
    broker = DevBroker(process, data_dir, admin, resolve, stdout, stderr)
    try:
        wait_until_serving(broker)
        yield broker
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def wait_until_serving(broker: DevBroker) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if broker.process.poll() is not None:
            pytest.fail(f"broker dev exited with {broker.process.returncode}:\n{broker.logs()}")
        result = broker.ctl("types")
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"broker dev did not serve within {START_TIMEOUT:g}s:\n{result.stderr}\n{broker.logs()}"
            )
        time.sleep(0.25)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
