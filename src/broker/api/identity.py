"""The caller's principal, from the URI SAN of its verified client certificate.

The TLS layer has already checked the chain against the configured CA; here the
certificate's single SPIFFE URI SAN becomes a `Principal`. Parsed identities are
cached per certificate: a client presents the same certificate on every call of
a connection.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from cryptography import x509

from broker.errors import Unauthenticated
from broker.identity import InvalidSpiffeId, parse_spiffe_id
from broker.model import Principal


@lru_cache(maxsize=4096)
def principal_from_pem(pem: bytes, trust_domain: str) -> Principal:
    """Parse the certificate's one spiffe:// URI SAN; UNAUTHENTICATED for anything else."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [
            u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")
        ]
    except (ValueError, x509.ExtensionNotFound):
        raise Unauthenticated("the client certificate carries no SPIFFE id") from None
    if len(uris) != 1:
        raise Unauthenticated("the client certificate must carry exactly one SPIFFE id")
    try:
        return parse_spiffe_id(uris[0], trust_domain)
    except InvalidSpiffeId as exc:
        raise Unauthenticated(f"the client certificate's SPIFFE id is not accepted: {exc}") from None


def principal_from_context(context: Any, trust_domain: str) -> Principal:
    """The verified principal of a grpc.aio call; UNAUTHENTICATED without a client certificate."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        raise Unauthenticated("a client certificate is required")
    return principal_from_pem(bytes(pems[0]), trust_domain)
