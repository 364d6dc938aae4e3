"""The dev PKI: CA and leaf certificates, private file modes, and the idempotent dev layout."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from broker import pki
from broker.crypto import Kek

ADMIN = "spiffe://broker.local/tenant/default/admin/cli"
EXECUTOR = "spiffe://broker.local/tenant/acme/executor/worker-1.prod"


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return pki.create_ca("test CA")


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that hides nothing, so only the code under test can make a file private."""
    old = os.umask(0)
    yield
    os.umask(old)


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_is_a_self_signed_p256_ca(ca: tuple[bytes, bytes]) -> None:
    cert = load(ca[0])
    cert.verify_directly_issued_by(cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test CA"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"


def test_server_cert_verifies_for_each_host(ca: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem = pki.issue_server_cert(*ca, ["localhost", "127.0.0.1", "::1"])
    cert = load(cert_pem)
    cert.verify_directly_issued_by(load(ca[0]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    verifier = PolicyBuilder().store(Store([load(ca[0])]))
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier.build_server_verifier(name).verify(cert, [])
    assert b"PRIVATE KEY" in key_pem


def test_server_cert_needs_a_host(ca: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError, match="at least one host"):
        pki.issue_server_cert(*ca, [])
    with pytest.raises(ValueError, match="invalid host"):
        pki.issue_server_cert(*ca, ["bad host"])


def test_principal_cert_carries_exactly_the_spiffe_id(ca: tuple[bytes, bytes]) -> None:
    cert_pem, _ = pki.issue_principal_cert(*ca, EXECUTOR, days=30)
    cert = load(cert_pem)
    verified = PolicyBuilder().store(Store([load(ca[0])])).build_client_verifier().verify(cert, [])
    assert [str(s.value) for s in verified.subjects or []] == [EXECUTOR]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier(EXECUTOR)]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "worker-1.prod"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 <= lifetime.days <= 31


def test_principal_cert_from_another_ca_does_not_verify(ca: tuple[bytes, bytes]) -> None:
    other = pki.create_ca("other CA")
    cert = load(pki.issue_principal_cert(*other, ADMIN)[0])
    with pytest.raises(x509.verification.VerificationError):
        PolicyBuilder().store(Store([load(ca[0])])).build_client_verifier().verify(cert, [])


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "spiffe://broker.local/tenant/default/root/cli",
        "spiffe://broker.local/tenant/default/admin",
        "spiffe://broker.local/tenant/default/admin/",
        "spiffe://broker.local/tenant/default/admin/a/b",
        "spiffe://broker.local/tenant/de fault/admin/cli",
        "spiffe://broker.local/tenants/default/admin/cli",
        "https://broker.local/tenant/default/admin/cli",
        "spiffe:///tenant/default/admin/cli",
    ],
)
def test_invalid_spiffe_id_is_rejected_with_the_expected_shape(ca: tuple[bytes, bytes], bad: str) -> None:
    with pytest.raises(ValueError, match=r"spiffe://<trust-domain>/tenant/<tenant>/<admin\|executor>/<name>"):
        pki.issue_principal_cert(*ca, bad)


def test_write_private_is_0600_from_creation_and_never_overwrites(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "key.pem"
    pki.write_private(path, b"one")
    assert mode(path) == 0o600
    with pytest.raises(FileExistsError):
        pki.write_private(path, b"two")
    assert path.read_bytes() == b"one"


def test_new_master_key_is_accepted_by_kek() -> None:
    text = pki.new_master_key()
    assert text.endswith("\n")
    Kek.from_base64(text)
    assert text != pki.new_master_key()


DEV_FILES = [
    "master.key",
    "tls/ca.pem",
    "tls/ca-key.pem",
    "tls/server.pem",
    "tls/server-key.pem",
    "tls/admin.pem",
    "tls/admin-key.pem",
    "tls/executor.pem",
    "tls/executor-key.pem",
]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dev_layout_is_complete_private_and_verifies(tmp_path: Path, open_umask: None) -> None:
    data = tmp_path / "dev"
    assert pki.ensure_dev_layout(data) is True
    assert sorted(snapshot(data)) == sorted(DEV_FILES)
    for name in DEV_FILES:
        if name.endswith("-key.pem") or name == "master.key":
            assert mode(data / name) == 0o600, name
    assert mode(data) == 0o700 and mode(data / "tls") == 0o700
    Kek.from_base64((data / "master.key").read_text())

    ca_cert = load((data / "tls/ca.pem").read_bytes())
    verifier = PolicyBuilder().store(Store([ca_cert])).build_client_verifier()
    for stem, spiffe_id in (("admin", pki.DEV_ADMIN), ("executor", pki.DEV_EXECUTOR)):
        verified = verifier.verify(load((data / f"tls/{stem}.pem").read_bytes()), [])
        assert [str(s.value) for s in verified.subjects or []] == [spiffe_id]
    server = load((data / "tls/server.pem").read_bytes())
    PolicyBuilder().store(Store([ca_cert])).build_server_verifier(x509.DNSName("localhost")).verify(
        server, []
    )
    assert pki.DEV_ADMIN == "spiffe://broker.local/tenant/default/admin/cli"
    assert pki.DEV_EXECUTOR == "spiffe://broker.local/tenant/default/executor/demo"


def test_dev_layout_second_run_changes_nothing(tmp_path: Path) -> None:
    pki.ensure_dev_layout(tmp_path)
    before = snapshot(tmp_path)
    assert pki.ensure_dev_layout(tmp_path) is False
    assert snapshot(tmp_path) == before


def test_dev_layout_fills_in_a_missing_pair_and_keeps_the_rest(tmp_path: Path) -> None:
    pki.ensure_dev_layout(tmp_path)
    before = snapshot(tmp_path)
    (tmp_path / "tls/executor.pem").unlink()
    (tmp_path / "tls/executor-key.pem").unlink()
    assert pki.ensure_dev_layout(tmp_path) is True
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if "executor" not in k} == {
        k: v for k, v in before.items() if "executor" not in k
    }
    assert after["tls/executor.pem"] != before["tls/executor.pem"]
    load(after["tls/executor.pem"]).verify_directly_issued_by(load(after["tls/ca.pem"]))


def test_dev_layout_refuses_half_a_pair(tmp_path: Path) -> None:
    pki.ensure_dev_layout(tmp_path)
    (tmp_path / "tls/admin-key.pem").unlink()
    with pytest.raises(ValueError, match=r"admin\.pem exists but .*admin-key\.pem does not"):
        pki.ensure_dev_layout(tmp_path)


def test_dev_layout_refuses_leaves_without_their_ca(tmp_path: Path) -> None:
    pki.ensure_dev_layout(tmp_path)
    (tmp_path / "tls/ca.pem").unlink()
    (tmp_path / "tls/ca-key.pem").unlink()
    with pytest.raises(ValueError, match="but no CA"):
        pki.ensure_dev_layout(tmp_path)


def test_dev_layout_keeps_an_existing_master_key(tmp_path: Path) -> None:
    key = pki.new_master_key()
    (tmp_path / "master.key").write_text(key)
    pki.ensure_dev_layout(tmp_path)
    assert (tmp_path / "master.key").read_text() == key
