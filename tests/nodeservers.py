"""Reference servers written in JavaScript, run with Node.js on loopback for compatibility tests.

Our own fixtures (tests/mcpserver.py, tests/oauthserver.py) are Python, and the MCP one is built
with the same SDK as the broker's client: agreeing with ourselves proves little. The packages
here are what other clients are tested against. Each is installed from the npm registry once per
machine, pinned, into ~/.cache/broker-tests; without Node.js, or when npm cannot install it, the
test that needs it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

CACHE = Path.home() / ".cache" / "broker-tests"
# These servers listen on every interface, and some have tools that print their environment:
# loaded before them, this makes a listen() that names no host bind 127.0.0.1.
_LOOPBACK_ONLY = """
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" || /^[0-9]+$/.test(String(args[0]))) {
    if (typeof args[1] !== "string") args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};
"""


def installed(package: str, version: str) -> Path:
    """The folder where `package@version` is installed (its node_modules inside); skips without npm."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.skip(f"Node.js (node and npm) is not installed: {package} cannot run")
    home = CACHE / f"{package.replace('/', '+')}@{version}"
    if not (home / "node_modules" / package / "package.json").exists():
        home.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [
                npm,
                "install",
                "--silent",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(home),
                f"{package}@{version}",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"npm could not install {package}@{version}: {done.stderr.strip()[-500:]}")
    (home / "loopback-only.cjs").write_text(_LOOPBACK_ONLY)
    return home


@contextmanager
def serving(
    home: Path, argv: Sequence[str], port: int, env: Mapping[str, str] | None = None
) -> Iterator[None]:
    """`node <argv>` run in `home`, bound to loopback, until it listens on `port`; stopped after."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            ["node", "--require", str(home / "loopback-only.cjs"), *argv],
            cwd=home,
            # Nothing of ours: a reference server may print its environment to any client.
            env={"PATH": os.environ.get("PATH", ""), "PORT": str(port), **(env or {})},
            stdout=log,
            stderr=log,
        )
        try:
            _wait_for(process, port, log)
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _wait_for(process: subprocess.Popen[bytes], port: int, log: IO[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            said = log.read().decode(errors="replace")[-2000:]
            raise AssertionError(f"the node server exited ({process.returncode}): {said}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"the node server did not listen on 127.0.0.1:{port} within 20 s")
