"""A throwaway MariaDB server of our own, for what the shared one must not be given: options that
take effect only at start-up (a binary log), or a password validation plugin (it would refuse the
weak passwords other tests give their users). On a free loopback port, `root` without a password;
stopped and deleted at the end.

Starting one takes a second or two: use it from a module-scoped fixture.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from tests.helpers import free_port

_SBIN = "/usr/sbin:/usr/local/sbin:/usr/bin:/usr/local/bin"
# Seconds to install or start: a second or two on an idle machine, far more on one kept busy.
_PATIENCE = 180


@contextlib.contextmanager
def throwaway_mariadb(*options: str) -> Iterator[int]:
    """Start a server with `options` added to its command line (skip the test when the binaries are
    missing); yields its port."""
    server, install = shutil.which("mariadbd", path=_SBIN), shutil.which("mariadb-install-db", path=_SBIN)
    if server is None or install is None:
        pytest.skip("MariaDB server binaries not found: apt-get install mariadb-server")
    base = Path(tempfile.mkdtemp(prefix="broker-mariadbtest-"))
    # --user=root: the server may then run as whoever runs the tests, root included. A small redo
    # log: the default's 96 MB would be written out at every start, for nothing.
    common = ["--no-defaults", f"--datadir={base / 'data'}", "--user=root", "--innodb-log-file-size=8M"]
    process: subprocess.Popen[bytes] | None = None
    try:
        done = subprocess.run(
            [install, *common, "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True,
            text=True,
            timeout=_PATIENCE,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {done.stdout}\n{done.stderr}")
        port = free_port()
        process = subprocess.Popen(
            [
                server,
                *common,
                f"--port={port}",
                "--bind-address=127.0.0.1",
                f"--socket={base / 'socket'}",
                f"--pid-file={base / 'pid'}",
                f"--log-error={base / 'error.log'}",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=16M",
                *options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_until_up(port, process, base / "error.log")
        yield port
    finally:
        try:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _wait_until_up(port: int, process: subprocess.Popen[bytes], error_log: Path) -> None:
    deadline = time.monotonic() + _PATIENCE
    while True:
        try:
            pymysql.connect(host="127.0.0.1", port=port, user="root", password="", connect_timeout=2).close()
            return
        except pymysql.err.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = error_log.read_text(errors="replace") if error_log.exists() else ""
                raise RuntimeError(f"mariadbd did not start:\n{log[-2000:]}") from None
            time.sleep(0.1)
