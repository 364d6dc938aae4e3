"""TlsReloader: when it looks at the files, what it takes up and what it refuses."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from broker import pki
from broker.config import TlsFiles
from broker.errors import ConfigError
from broker.tlsreload import TlsFilesInvalid, TlsReloader, load_material

CA = pki.create_ca("unit CA")


def server_pair() -> tuple[bytes, bytes]:
    return pki.issue_server_cert(*CA, ["localhost"])


def write(tmp_path: Path, cert: bytes, key: bytes, ca: bytes = CA[0]) -> TlsFiles:
    files = TlsFiles(tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "ca.pem")
    files.cert.write_bytes(cert)
    files.key.write_bytes(key)
    files.client_ca.write_bytes(ca)
    return files


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_start_refuses_unusable_files_naming_the_setting(tmp_path: Path) -> None:
    cert, key = server_pair()
    _, other_key = server_pair()
    with pytest.raises(ConfigError, match=r"tls\.key: .* does not match"):
        TlsReloader(write(tmp_path, cert, other_key))
    with pytest.raises(ConfigError, match=r"tls\.cert: .* no PEM certificate"):
        TlsReloader(write(tmp_path, b"junk", key))
    with pytest.raises(ConfigError, match=r"tls\.client_ca: cannot read"):
        files = write(tmp_path, cert, key)
        files.client_ca.unlink()
        TlsReloader(files)


def test_files_are_looked_at_only_once_the_interval_has_passed(tmp_path: Path) -> None:
    clock = Clock()
    files = write(tmp_path, *server_pair())
    reloader = TlsReloader(files, check_interval=5, clock=clock)
    cert, key = server_pair()
    write(tmp_path, cert, key)
    clock.now += 4.9
    assert reloader.maybe_check() is False and reloader.generation == 0
    clock.now += 0.2
    assert reloader.maybe_check() is True
    assert reloader.generation == 1 and reloader.serial == load_material(files).serial
    # Checked just now: the next handshake within the interval does not even stat the files.
    write(tmp_path, *server_pair())
    assert reloader.maybe_check() is False


def test_same_content_rewritten_is_not_a_new_configuration(tmp_path: Path) -> None:
    cert, key = server_pair()
    files = write(tmp_path, cert, key)
    reloader = TlsReloader(files, check_interval=0)
    write(tmp_path, cert, key)
    os.utime(files.cert, ns=(1, 1))
    assert reloader.check() is False and reloader.generation == 0


def test_half_rotated_files_are_refused_until_the_key_arrives(tmp_path: Path) -> None:
    files = write(tmp_path, *server_pair())
    reloader = TlsReloader(files, check_interval=0)
    before = reloader.serial
    cert, key = server_pair()
    files.cert.write_bytes(cert)
    assert reloader.check() is False and reloader.serial == before
    assert reloader.check() is False  # same files: not re-read, not logged again
    files.key.write_bytes(key)
    assert reloader.check() is True and reloader.serial != before


def test_a_certificate_not_valid_now_is_refused_at_start_and_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every client refuses an expired or not yet valid certificate: taken up, it would cut off
    # every new connection (before: reloaded, logged tls_reloaded).
    now = dt.datetime.now(dt.UTC)
    monkeypatch.setattr(pki, "_now", lambda: now - dt.timedelta(days=400))
    expired = server_pair()  # valid for 365 days, from 400 days ago
    monkeypatch.setattr(pki, "_now", lambda: now + dt.timedelta(days=2))
    future = server_pair()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"tls\.cert: the certificate in .* is valid from .*, not now"):
        TlsReloader(write(tmp_path, *expired))
    files = write(tmp_path, *server_pair())
    reloader = TlsReloader(files, check_interval=0)
    for cert, key in (expired, future):
        files.cert.write_bytes(cert)
        files.key.write_bytes(key)
        assert reloader.check() is False
    assert reloader.generation == 0


def test_missing_or_garbage_files_keep_the_old_material(tmp_path: Path) -> None:
    files = write(tmp_path, *server_pair())
    reloader = TlsReloader(files, check_interval=0)
    files.client_ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert reloader.check() is False
    files.key.unlink()
    assert reloader.check() is False
    with pytest.raises(TlsFilesInvalid, match=r"tls\.key"):
        load_material(files)
    assert reloader.generation == 0


def test_credentials_are_made_per_listener(tmp_path: Path) -> None:
    reloader = TlsReloader(write(tmp_path, *server_pair()))
    assert reloader.credentials() is not reloader.credentials()
