"""A throwaway PostgreSQL cluster of our own, for tests that need the server to check passwords
(the shared server trusts every login): scram-sha-256 for every login and TLS with a certificate
for the names asked for, on a free loopback port; stopped and deleted at the end.

Starting one takes a few seconds: use it from a session- or module-scoped fixture.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker import pki
from tests.helpers import free_port


@dataclass(frozen=True)
class Cluster:
    port: int
    ca_pem: str
    ca_path: str
    # The `postgres` superuser's password (scram, like every other login).
    superuser_password: str = field(default="", repr=False)
    # The cluster's folder (data/, log): for `stop` and `start`.
    base: str = ""

    def _pg_ctl(self, *args: str) -> None:
        bindir = _pg_bindir()
        assert bindir is not None and self.base, "not a throwaway cluster"
        base = Path(self.base)
        pg_ctl = [str(bindir / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "log"), "-w", "-t", "30"]
        _sh([*pg_ctl, *args], os.geteuid() == 0)

    def stop(self) -> None:
        """An outage: `pg_ctl stop -m fast` (sessions ended, new connections refused) until `start`."""
        self._pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        """Start a stopped cluster again (same port, same data); returns once it accepts connections."""
        self._pg_ctl("start")


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _sh(argv: list[str], as_postgres: bool) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if as_postgres else []
    done = subprocess.run(prefix + argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {done.stdout}\n{done.stderr}")


@contextlib.contextmanager
def throwaway_cluster(tls_names: Sequence[str] = ("localhost",), hba_first: str = "") -> Iterator[Cluster]:
    """Start a cluster (skip the test when the server binaries are missing); `hba_first` is put
    before the default pg_hba.conf lines."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql")
    as_postgres = os.geteuid() == 0  # initdb refuses to run as root
    base = Path(tempfile.mkdtemp(prefix="broker-pgtest-"))
    data, superuser_password = base / "data", "super-" + os.urandom(8).hex()
    ca_pem, ca_key = pki.create_ca("broker database test CA")
    cert_pem, key_pem = pki.issue_server_cert(ca_pem, ca_key, list(tls_names))
    (base / "ca.pem").write_bytes(ca_pem)
    (base / "server.crt").write_bytes(cert_pem)
    (base / "server.key").write_bytes(key_pem)
    (base / "server.key").chmod(0o600)
    (base / "pwfile").write_text(superuser_password + "\n")
    if as_postgres:
        for path in (base, *base.iterdir()):
            shutil.chown(path, "postgres", "postgres")
    port = free_port()
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "30"]
    started = False
    try:
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "scram-sha-256"]
        _sh([*initdb, "--pwfile", str(base / "pwfile"), "--no-sync"], as_postgres)
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{base}'\n"
                f"ssl = on\nssl_cert_file = '{base}/server.crt'\nssl_key_file = '{base}/server.key'\n"
                "fsync = off\n"
            )
        hba = (data / "pg_hba.conf").read_text()
        (data / "pg_hba.conf").write_text(hba_first + hba)
        _sh([*pg_ctl, "start"], as_postgres)
        started = True
        yield Cluster(port, ca_pem.decode(), str(base / "ca.pem"), superuser_password, str(base))
    finally:
        try:
            if started:
                # A test may have left it stopped (Cluster.stop): then this one has nothing to stop.
                with contextlib.suppress(RuntimeError):
                    _sh([*pg_ctl, "-m", "immediate", "stop"], as_postgres)
        finally:
            shutil.rmtree(base, ignore_errors=True)
