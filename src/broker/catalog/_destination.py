"""Where a connection's secrets are sent, and how, as one digest bound into their ciphertext.

Digest version 2 (current) is SHA-256 over `broker.destination.v2\\n` followed by the
canonical JSON (sorted keys, no spaces, UTF-8) of

    {"config": {<each destination or transport field>: <its stored value, or null>},
     "provider": <provider>, "type": <type>}

The destination fields are those the catalog marks `destination` (URLs, host, port,
driver); the transport fields those it marks `transport` (TLS on or off, the CA that
vouches for the server, driver options): a row whose TLS is turned off or whose CA is
swapped is as re-pointed as one whose host is changed. For a type whose config is free
(`custom`) or not in the catalog, every config key counts. Values are the config as
stored, which `validate` already completed with the defaults, so a default added to
the catalog later does not change the digest of a row sealed before it; a field
removed from a row changes it.

Digest version 1 is the same over `broker.destination.v1\\n` and the destination fields
only. It is computed only to open rows sealed with it (envelope format 2), which the
start-up pass (`service.rebind`) re-seals; `service.sealing` says which envelope format
binds which digest version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from broker.catalog._registry import list_types
from broker.catalog._spec import FieldSpec

DIGEST_VERSION = 2
_DOMAIN = {1: b"broker.destination.v1\n", 2: b"broker.destination.v2\n"}


def _bound(spec: FieldSpec, version: int) -> bool:
    return spec.destination or (version >= 2 and spec.transport)


# Per digest version, per type: the config fields it covers; None: every config key (free config).
_FIELDS: dict[int, dict[str, tuple[str, ...] | None]] = {
    version: {
        ctype.name: None if ctype.open_config else tuple(f.name for f in ctype.fields if _bound(f, version))
        for ctype in list_types()
    }
    for version in _DOMAIN
}


def destination_fields(type_name: str) -> tuple[str, ...]:
    """The config fields of `type_name` that say where its secrets are sent (none for free config)."""
    return _FIELDS[1].get(type_name) or ()


def bound_fields(type_name: str, version: int = DIGEST_VERSION) -> tuple[str, ...]:
    """The config fields digest `version` covers for `type_name` (none listed for free config)."""
    return _FIELDS[version].get(type_name) or ()


def destination_digest(type_name: str, provider: str, config: Any, version: int = DIGEST_VERSION) -> bytes:
    """The digest of where (and, from version 2, how) a connection with this type, provider and
    stored config sends its secrets."""
    names = _FIELDS[version].get(type_name)
    if names is None or not isinstance(config, dict):
        where = config
    else:
        where = {name: config.get(name) for name in names}
    doc = {"config": where, "provider": provider, "type": type_name}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(_DOMAIN[version] + canonical.encode("utf-8", "surrogatepass")).digest()
