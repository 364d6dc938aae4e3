"""SPIFFE ids: `spiffe://<trust-domain>/tenant/<tenant>/<admin|executor>/<name>`.

Parsing lives here (no grpc) so the API layer, the grant service and the CLI
agree on one definition of a principal.
"""

from __future__ import annotations

import re

from broker.model import Principal, Role

_SEGMENT = r"[A-Za-z0-9._-]{1,128}"
_SPIFFE = re.compile(
    rf"^spiffe://(?P<domain>[A-Za-z0-9.-]{{1,253}})/tenant/(?P<tenant>{_SEGMENT})"
    rf"/(?P<role>admin|executor)/(?P<name>{_SEGMENT})$"
)


class InvalidSpiffeId(ValueError):
    """The text is not a broker SPIFFE id."""


def parse_spiffe_id(text: str, trust_domain: str | None = None) -> Principal:
    """Parse a SPIFFE id; when `trust_domain` is given, it must match."""
    match = _SPIFFE.fullmatch(text)
    # The SPIFFE spec forbids dot segments: anything that normalises paths would read another id.
    if match is None or {match["tenant"], match["name"]} & {".", ".."}:
        raise InvalidSpiffeId("expected spiffe://<trust-domain>/tenant/<tenant>/<admin|executor>/<name>")
    if trust_domain is not None and match["domain"] != trust_domain:
        raise InvalidSpiffeId(f"trust domain must be {trust_domain}")
    return Principal(
        trust_domain=match["domain"],
        tenant=match["tenant"],
        role=Role(match["role"]),
        name=match["name"],
    )
