"""The caller's principal, from the URI SAN of its verified client certificate.

The TLS layer has already checked the chain against the configured CA, once, when the
connection was opened; here the certificate's single SPIFFE URI SAN becomes a `Principal`, on
every call. Parsed identities are cached per certificate: a client presents the same
certificate on every call of a connection. The certificate's validity is checked on every
call too, since a connection outlives the handshake: a short-lived certificate that expired
while its connection stayed open identifies nobody.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from cryptography import x509

from broker.errors import Unauthenticated
from broker.identity import InvalidSpiffeId, parse_spiffe_id
from broker.model import Principal

_E = TypeVar("_E", bound=x509.ExtensionType)


@dataclass(frozen=True, slots=True)
class _Certified:
    principal: Principal
    not_before: float  # seconds since the epoch
    not_after: float


@lru_cache(maxsize=4096)
def _certified(pem: bytes, trust_domain: str) -> _Certified:
    """The certificate's one spiffe:// URI SAN as a principal, and when the certificate is valid;
    UNAUTHENTICATED for anything else."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = _extension(cert, x509.SubjectAlternativeName)
        constraints = _extension(cert, x509.BasicConstraints)
    except ValueError:  # a malformed certificate or extension
        raise Unauthenticated("the client certificate cannot be read") from None
    uris = [] if san is None else san.get_values_for_type(x509.UniformResourceIdentifier)
    if not any(u.startswith("spiffe://") for u in uris):
        raise Unauthenticated("the client certificate carries no SPIFFE id")
    # An X.509 SVID has exactly one URI SAN, and is not a CA (SPIFFE X509-SVID, sections 2 and 4.1):
    # which of several names would be the caller is not for the broker to guess.
    if len(uris) != 1:
        raise Unauthenticated("the client certificate must carry exactly one URI, its SPIFFE id")
    if constraints is not None and constraints.ca:
        raise Unauthenticated("the client certificate is a CA certificate, not an identity")
    try:
        principal = parse_spiffe_id(uris[0], trust_domain)
    except InvalidSpiffeId as exc:
        raise Unauthenticated(f"the client certificate's SPIFFE id is not accepted: {exc}") from None
    return _Certified(principal, cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def principal_from_context(context: Any, trust_domain: str) -> Principal:
    """The verified principal of a grpc.aio call; UNAUTHENTICATED without a client certificate or
    with one that is not valid at this moment."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        raise Unauthenticated("a client certificate is required")
    certified = _certified(bytes(pems[0]), trust_domain)
    now = time.time()
    if now > certified.not_after:
        raise Unauthenticated(
            f"the client certificate expired at {_utc(certified.not_after)}; connect again with a renewed one"
        )
    if now < certified.not_before:
        raise Unauthenticated(f"the client certificate is not valid before {_utc(certified.not_before)}")
    return certified.principal


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
