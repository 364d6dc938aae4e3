"""The SDK's TLS files: a change is handed out once, when usable, and looked for at most once a second."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from broker import pki
from broker.certfiles import CertificateFiles

SPIFFE = "spiffe://broker.local/tenant/default/executor/demo"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.create_ca("certfiles test CA")


def write(folder: Path, ca: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
    cert, key = pki.issue_principal_cert(ca[0], ca[1], SPIFFE)
    folder.mkdir(exist_ok=True)
    (folder / "ca.pem").write_bytes(ca[0])
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    return cert, key


def files(folder: Path, clock: Clock) -> CertificateFiles:
    return CertificateFiles(folder / "ca.pem", folder / "cert.pem", folder / "key.pem", clock=clock)


def test_an_overwrite_is_handed_out_once_after_the_interval(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    clock = Clock()
    first, _ = write(tmp_path, ca)
    watched = files(tmp_path, clock)
    assert watched.material.cert == first
    clock.now = 1.5
    assert watched.renewed() is None  # nothing changed
    renewed, key = write(tmp_path, ca)
    clock.now = 2.0
    assert watched.renewed() is None  # looked 0.5 s ago
    clock.now = 2.6
    material = watched.renewed()
    assert material is not None and (material.cert, material.key) == (renewed, key)
    assert watched.material is material
    clock.now = 4.0
    assert watched.renewed() is None  # handed out once


def test_a_kubernetes_secret_swap_is_seen(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    """A mounted Secret: the files are symlinks through `..data`, which is swapped atomically."""
    mount = tmp_path / "mount"
    mount.mkdir()
    write(mount / "v1", ca)
    (mount / "..data").symlink_to("v1")
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (mount / name).symlink_to(Path("..data") / name)
    clock = Clock()
    watched = files(mount, clock)
    renewed, _ = write(mount / "v2", ca)
    (mount / "..data_tmp").symlink_to("v2")
    (mount / "..data_tmp").replace(mount / "..data")
    clock.now = 1.0
    material = watched.renewed()
    assert material is not None and material.cert == renewed


def test_a_key_that_does_not_match_is_skipped_until_the_files_change_again(
    tmp_path: Path, ca: tuple[bytes, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    first, _ = write(tmp_path, ca)
    watched = files(tmp_path, clock)
    # Half-way through a renewal: the new certificate, the old key.
    renewed, new_key = pki.issue_principal_cert(ca[0], ca[1], SPIFFE)
    (tmp_path / "cert.pem").write_bytes(renewed)
    clock.now = 1.0
    with caplog.at_level(logging.WARNING, logger="broker.client"):
        assert watched.renewed() is None
    assert "the key does not match the certificate" in caplog.text
    assert watched.material.cert == first  # the set in use stays
    clock.now = 2.0
    with caplog.at_level(logging.WARNING, logger="broker.client"):
        assert watched.renewed() is None
    assert caplog.text.count("not usable") == 1  # said once while the files stay so
    (tmp_path / "key.pem").write_bytes(new_key)
    clock.now = 3.0
    material = watched.renewed()
    assert material is not None and (material.cert, material.key) == (renewed, new_key)


def test_a_missing_file_is_skipped(tmp_path: Path, ca: tuple[bytes, bytes]) -> None:
    clock = Clock()
    write(tmp_path, ca)
    watched = files(tmp_path, clock)
    (tmp_path / "key.pem").unlink()
    clock.now = 1.0
    assert watched.renewed() is None
    write(tmp_path, ca)
    clock.now = 2.0
    assert watched.renewed() is not None
