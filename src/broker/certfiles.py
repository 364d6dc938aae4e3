"""The executor SDK's TLS files, read again when they change on disk.

Short-lived client certificates (cert-manager, a SPIFFE helper writing its SVID to files) are
renewed in place, and the broker refuses a certificate past its end: at the handshake of a new
connection and on every call of an open one. So a long-running client must move to the renewed
files by itself. `CertificateFiles.renewed` reads the files at most once per `interval` (a few
KB), sees both a plain overwrite and a Kubernetes Secret's `..data` symlink swap, and hands out
a changed set once. A set that is not usable yet (a key that does not match its
certificate, a file half written) is skipped until the files change again; the client keeps the
set it has, and says so in its log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("broker.client")

CHECK_INTERVAL = 1.0  # seconds between looks at the files


@dataclass(frozen=True, repr=False)
class TlsMaterial:
    """The CA bundle that verifies the broker, and the client's certificate chain and key (PEM)."""

    ca: bytes
    cert: bytes
    key: bytes


class CertificateFiles:
    """The three files of a client's TLS identity, and what they held when last read."""

    def __init__(
        self,
        ca: Path,
        cert: Path,
        key: Path,
        *,
        interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._paths = (ca, cert, key)
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()  # the sync client's renewal thread looks too
        self.material = self._read()
        self._refused: object = None  # the unusable state last reported, not reported again
        self._next_look = clock() + interval

    def renewed(self) -> TlsMaterial | None:
        """The files' new content if they changed to a usable set since the last look; else None.
        Each change is handed out once, to one caller."""
        if self._clock() < self._next_look:
            return None
        with self._lock:
            now = self._clock()
            if now < self._next_look:
                return None
            self._next_look = now + self._interval
            try:
                material = self._read()  # a few KB: compared whole, not by time stamps (a tick apart)
            except OSError as exc:
                self._refuse((exc.filename, exc.strerror), f"{exc.filename}: {exc.strerror}")
                return None
            if material == self.material:
                return None
            problem = _problem(material)
            if problem is not None:
                self._refuse(material, problem)
                return None
            self.material = material
            return material

    def _refuse(self, what: object, problem: str) -> None:
        """Keep the set in use; say why once per unusable state of the files."""
        if what != self._refused:
            self._refused = what
            log.warning(
                "the client's TLS files changed but are not usable (%s); keeping the old ones", problem
            )

    def _read(self) -> TlsMaterial:
        return TlsMaterial(*(path.read_bytes() for path in self._paths))


def _problem(material: TlsMaterial) -> str | None:
    """Why the set cannot be used (a file that does not parse, a key not the certificate's), or None."""
    try:
        x509.load_pem_x509_certificates(material.ca)
        cert = x509.load_pem_x509_certificate(material.cert)
        key = serialization.load_pem_private_key(material.key, password=None)
    except (ValueError, TypeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return "the key does not match the certificate"
    return None
