"""A small certificate authority for the broker's mTLS: CA, server and principal certificates.

Keys are EC P-256. Principal certificates carry exactly one URI SAN, the SPIFFE id
the broker turns into a `Principal`. `ensure_dev_layout` builds everything
`broker dev` needs in one data directory and never replaces a file that exists.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.identity import parse_spiffe_id

DEV_TRUST_DOMAIN = "broker.local"
DEV_ADMIN = f"spiffe://{DEV_TRUST_DOMAIN}/tenant/default/admin/cli"
DEV_EXECUTOR = f"spiffe://{DEV_TRUST_DOMAIN}/tenant/default/executor/demo"
DEV_SERVER_HOSTS = ("localhost", "127.0.0.1", "::1")

_CA_DAYS = 3650
# Certificates start a little in the past so a peer whose clock lags still accepts them.
_BACKDATE = dt.timedelta(minutes=5)


def create_ca(common_name: str, days: int = _CA_DAYS) -> tuple[bytes, bytes]:
    """A new self-signed CA: (certificate PEM, private key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def issue_server_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, hosts: Sequence[str], days: int = 365
) -> tuple[bytes, bytes]:
    """A TLS server certificate for `hosts` (DNS names and IP addresses): (cert PEM, key PEM)."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    sans = [_host_san(h) for h in hosts]
    return _issue(ca_cert_pem, ca_key_pem, hosts[0], sans, ExtendedKeyUsageOID.SERVER_AUTH, days)


def issue_principal_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, spiffe_id: str, days: int = 365
) -> tuple[bytes, bytes]:
    """A client certificate whose only URI SAN is `spiffe_id`: (cert PEM, key PEM).

    Raises ValueError when `spiffe_id` is not
    `spiffe://<trust-domain>/tenant/<tenant>/<admin|executor>/<name>`.
    """
    try:
        parse_spiffe_id(spiffe_id)
    except ValueError as exc:
        raise ValueError(f"invalid principal {spiffe_id!r}: {exc}") from None
    return issue_client_cert(ca_cert_pem, ca_key_pem, spiffe_id, days)


def issue_client_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, uri: str, days: int = 365
) -> tuple[bytes, bytes]:
    """A client certificate whose only URI SAN is `uri`, which need not name a principal: a SPIFFE id
    such as spiffe://<trust-domain>/probe/<name> can only ask the health service. (cert PEM, key PEM)."""
    if not uri.startswith("spiffe://"):
        raise ValueError(f"invalid SPIFFE id {uri!r}: expected spiffe://...")
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    name = uri.rstrip("/").rpartition("/")[2]
    return _issue(ca_cert_pem, ca_key_pem, name, sans, ExtendedKeyUsageOID.CLIENT_AUTH, days)


def write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 and write `data`; refuse to replace an existing file.

    The mode is set by `open(2)` itself, so the file is never readable by others,
    not even between creation and a later chmod.
    """
    _write_new(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    """Create `path` (mode 0644) and write `data`; refuse to replace an existing file."""
    _write_new(path, data, 0o644)


def new_master_key() -> str:
    """A fresh master key as written to a key file: base64 of 32 random bytes and a newline."""
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii") + "\n"


def ensure_dev_layout(data_dir: Path) -> bool:
    """Create the master key and TLS files `broker dev` uses; True when anything was created.

    Existing files are kept as they are. A half-present pair (a certificate
    without its key) is an error, not something to paper over.
    """
    created = False
    if not data_dir.exists():
        data_dir.mkdir(mode=0o700, parents=True)
        created = True
    master = data_dir / "master.key"
    if not master.exists():
        write_private(master, new_master_key().encode("ascii"))
        created = True
    tls = data_dir / "tls"
    if not tls.exists():
        tls.mkdir(mode=0o700)
        created = True

    ca_cert, ca_key = tls / "ca.pem", tls / "ca-key.pem"
    leaves: dict[str, Callable[[bytes, bytes], tuple[bytes, bytes]]] = {
        "server": lambda c, k: issue_server_cert(c, k, DEV_SERVER_HOSTS),
        "admin": lambda c, k: issue_principal_cert(c, k, DEV_ADMIN),
        "executor": lambda c, k: issue_principal_cert(c, k, DEV_EXECUTOR),
    }
    if not _pair_present(ca_cert, ca_key):
        # A new CA would not have signed the existing leaves; stop rather than mix them.
        stale = [p.name for n in leaves for p in _pair(tls, n) if p.exists()]
        if stale:
            raise ValueError(f"{tls} has {', '.join(stale)} but no CA; remove them to start afresh")
        cert_pem, key_pem = create_ca("broker dev CA")
        write_private(ca_key, key_pem)
        write_public(ca_cert, cert_pem)
        created = True
    ca_cert_pem, ca_key_pem = ca_cert.read_bytes(), ca_key.read_bytes()
    for name, issue in leaves.items():
        cert_path, key_path = _pair(tls, name)
        if _pair_present(cert_path, key_path):
            continue
        cert_pem, key_pem = issue(ca_cert_pem, ca_key_pem)
        write_private(key_path, key_pem)
        write_public(cert_path, cert_pem)
        created = True
    return created


def _pair(folder: Path, stem: str) -> tuple[Path, Path]:
    return folder / f"{stem}.pem", folder / f"{stem}-key.pem"


def _pair_present(cert: Path, key: Path) -> bool:
    """True when both exist, False when neither does; a lone half is an error."""
    if cert.exists() != key.exists():
        present, missing = (cert, key) if cert.exists() else (key, cert)
        raise ValueError(f"{present} exists but {missing} does not; remove {present} to recreate the pair")
    return cert.exists()


def _issue(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
) -> tuple[bytes, bytes]:
    if days < 1:
        raise ValueError("a certificate must be valid for at least one day")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an EC private key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        # Non-critical is right here: the subject is not empty (RFC 5280, 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def _host_san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() or c in "/:@" for c in host):
        raise ValueError(f"invalid host name {host!r}")
    return x509.DNSName(host)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never replace a key (or a master key) that something may already depend on.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
