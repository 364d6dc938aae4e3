"""Server TLS material that follows its files: certificate, key and client CA, re-read on change.

Kubernetes updates a mounted Secret in place (the files are symlinks into a `..data`
directory that is swapped atomically); other tools simply overwrite the files. gRPC
asks for the certificate configuration before every new TLS handshake
(`grpc.dynamic_ssl_server_credentials`, which works with `grpc.aio` servers: the
fetcher runs on a gRPC core thread, not on the event loop). The fetcher here is cheap:

- it reads the three (small) files at most every `check_interval` seconds and
  compares their SHA-256 with what is served (content, not mtimes: a rewrite within
  one timestamp tick, or a `..data` symlink swap, is seen either way),
- parses them only when the content changed, and hands gRPC a new configuration
  only when it is valid: a certificate chain, a private key that matches its first
  certificate, and a CA.

Missing, half-written or mismatched files are logged (once per state of the files)
and the previous configuration keeps serving; the fetcher never raises. Connections
already established keep the keys they were set up with; only new handshakes see
the new material.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.config import TlsFiles
from broker.errors import ConfigError

log = structlog.get_logger("broker.tls")

DEFAULT_CHECK_INTERVAL = 5.0


class TlsFilesInvalid(ValueError):
    """The files are unreadable, do not parse, or the key does not match the certificate."""


@dataclass(frozen=True)
class TlsMaterial:
    """One consistent set of server TLS files, already checked."""

    cert: bytes = b""
    key: bytes = b""
    client_ca: bytes = b""
    serial: int = 0

    def digest(self) -> bytes:
        """The same digest `_digest` computes from the files this material was read from."""
        digest = hashlib.sha256()
        for content in (self.cert, self.key, self.client_ca):
            digest.update(hashlib.sha256(content).digest())
        return digest.digest()


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsFilesInvalid(f"{setting}: cannot read {path}: {exc.strerror}") from None


def load_material(files: TlsFiles) -> TlsMaterial:
    """Read and check the three files; `TlsFilesInvalid` names the setting at fault."""
    cert = _read(files.cert, "tls.cert")
    key = _read(files.key, "tls.key")
    client_ca = _read(files.client_ca, "tls.client_ca")
    try:
        chain = x509.load_pem_x509_certificates(cert)
    except ValueError:
        raise TlsFilesInvalid(f"tls.cert: {files.cert} holds no PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key, None)
    except (ValueError, TypeError):
        raise TlsFilesInvalid(f"tls.key: {files.key} holds no unencrypted PEM private key") from None
    try:
        x509.load_pem_x509_certificates(client_ca)
    except ValueError:
        raise TlsFilesInvalid(f"tls.client_ca: {files.client_ca} holds no PEM certificate") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    leaf = chain[0]
    if leaf.public_key().public_bytes(*raw) != private_key.public_key().public_bytes(*raw):
        raise TlsFilesInvalid(f"tls.key: {files.key} does not match the certificate in {files.cert}")
    # Every client would refuse it: serving it would cut off every new connection.
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if not start <= datetime.now(UTC) <= end:
        raise TlsFilesInvalid(
            f"tls.cert: the certificate in {files.cert} is valid from {start:%Y-%m-%dT%H:%M:%SZ}"
            f" to {end:%Y-%m-%dT%H:%M:%SZ}, not now"
        )
    return TlsMaterial(cert, key, client_ca, leaf.serial_number)


def _digest(files: TlsFiles) -> bytes:
    """SHA-256 over the three files (following the `..data` symlinks Kubernetes uses)."""
    digest = hashlib.sha256()
    for path in (files.cert, files.key, files.client_ca):
        try:
            content = path.read_bytes()
        except OSError as exc:
            content = f"unreadable:{exc.errno}".encode()
        digest.update(hashlib.sha256(content).digest())
    return digest.digest()


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.client_ca
    )


class TlsReloader:
    """Watches the server's TLS files and feeds changes to every listener's credentials."""

    def __init__(
        self,
        files: TlsFiles,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._files = files
        self._interval = check_interval
        self._clock = clock
        self._lock = threading.Lock()
        try:
            material = load_material(files)
        except TlsFilesInvalid as exc:
            raise ConfigError(str(exc)) from None
        self._material, self._served = material, material.digest()
        self._config = _configuration(material)
        self._generation = 0
        self._rejected: bytes | None = None
        self._checked_at = clock()

    @property
    def serial(self) -> int:
        """The serial number of the certificate new handshakes present."""
        return self._material.serial

    @property
    def generation(self) -> int:
        """How many times new material was taken up since start."""
        return self._generation

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for one listener; each listener needs its own (gRPC tracks its config per object)."""
        delivered = self._generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal delivered
            try:
                self.maybe_check()
                with self._lock:
                    generation, config = self._generation, self._config
                if generation == delivered:
                    return None
                delivered = generation
                return config
            except Exception as exc:  # a raise here would fail the handshake
                log.warning("tls_reload_failed", error_type=type(exc).__name__)
                return None

        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._material), fetch, require_client_authentication=True
        )

    def maybe_check(self) -> bool:
        """`check()` when the interval has passed since the last one; True when new material was taken."""
        if self._clock() - self._checked_at < self._interval:
            return False
        return self.check()

    def check(self) -> bool:
        """Compare the files with what is served; take them up when changed and valid."""
        with self._lock:
            self._checked_at = self._clock()
            digest = _digest(self._files)
            if digest in (self._served, self._rejected):
                return False
            try:
                material = load_material(self._files)
            except TlsFilesInvalid as exc:
                # Likely half-way through a rotation (certificate written, key not yet):
                # keep serving the old material and look again once the files change.
                self._rejected = digest
                log.warning("tls_reload_rejected", problem=str(exc), serving_serial=f"{self.serial:x}")
                return False
            self._rejected = None
            if material.digest() == self._served:
                return False  # changed back while we read
            previous = self._material.serial
            self._material, self._served = material, material.digest()
            self._config = _configuration(material)
            self._generation += 1
            log.info("tls_reloaded", serial=f"{material.serial:x}", previous_serial=f"{previous:x}")
            return True
