"""Where a connection's secrets are sent, how, and what is done with them there, as one digest
bound into their ciphertext.

Digest version 3 (current) is SHA-256 over `broker.destination.v3\\n` followed by the
canonical JSON (sorted keys, no spaces, UTF-8) of

    {"config": {<each destination, transport or use field>: <its stored value, or null>},
     "provider": <provider>, "type": <type>}

The destination fields are those the catalog marks `destination` (URLs, host, port,
driver); the transport fields those it marks `transport` (TLS on or off, the CA that
vouches for the server, driver options); the use fields those it marks `use` (a dynamic
database connection's switch, statements, role, user-name prefix and lifetimes): a row whose
TLS is turned off, whose CA is swapped or whose creation statements are rewritten is as
re-pointed as one whose host is changed. For a type whose config is free (`custom`) or not
in the catalog, every config key counts. Values are the config as stored, which `validate`
already completed with the defaults, so a default added to the catalog later does not change
the digest of a row sealed before it; a field removed from a row changes it.

Digest version 2 is the same over `broker.destination.v2\\n` without the use fields, and
version 1 over `broker.destination.v1\\n` with the destination fields only. They are computed
only to open rows sealed with them (envelope formats 3 and 2), which the start-up pass
(`service.rebind`) re-seals; `service.sealing` says which envelope format binds which digest
version.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from broker.catalog._registry import list_types
from broker.catalog._spec import FieldSpec

DIGEST_VERSION = 3
_DOMAIN = {1: b"broker.destination.v1\n", 2: b"broker.destination.v2\n", 3: b"broker.destination.v3\n"}


def _bound(spec: FieldSpec, version: int) -> bool:
    return spec.destination or (version >= 2 and spec.transport) or (version >= 3 and spec.use)


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


def fields_needing_secrets(type_name: str) -> tuple[str, ...]:
    """The config fields of `type_name` whose change needs the secrets again: where they are sent
    and what is done with them there (`destination` and `use`; none for free config)."""
    return _NEEDING_SECRETS.get(type_name, ())


_NEEDING_SECRETS = {
    ctype.name: tuple(f.name for f in ctype.fields if f.destination or f.use) for ctype in list_types()
}


def bound_fields(type_name: str, version: int = DIGEST_VERSION) -> tuple[str, ...]:
    """The config fields digest `version` covers for `type_name` (none listed for free config)."""
    return _FIELDS[version].get(type_name) or ()


def destination_digest(type_name: str, provider: str, config: Any, version: int = DIGEST_VERSION) -> bytes:
    """The digest of where (from version 2, how; from version 3, to do what) a connection with this
    type, provider and stored config sends its secrets."""
    names = _FIELDS[version].get(type_name)
    if names is None or not isinstance(config, dict):
        where = config
    else:
        where = {name: config.get(name) for name in names}
    doc = {"config": where, "provider": provider, "type": type_name}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(_DOMAIN[version] + canonical.encode("utf-8", "surrogatepass")).digest()
