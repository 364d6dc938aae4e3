"""Where a connection's secrets are sent, as one digest bound into their ciphertext.

The digest is SHA-256 over `broker.destination.v1\\n` followed by the canonical JSON
(sorted keys, no spaces, UTF-8) of

    {"config": {<each destination field>: <its stored value, or null>},
     "provider": <provider>, "type": <type>}

The destination fields are those the catalog marks `destination` (URLs, host, port,
driver); for a type whose config is free (`custom`) or not in the catalog, every
config key. Values are the config as stored, which `validate` already completed
with the defaults, so a default added to the catalog later does not change the
digest of a row sealed before it; a field removed from a row changes it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from broker.catalog._registry import list_types

_DOMAIN = b"broker.destination.v1\n"

# None: every config key is a destination (free config).
_FIELDS: dict[str, tuple[str, ...] | None] = {
    ctype.name: None if ctype.open_config else tuple(f.name for f in ctype.fields if f.destination)
    for ctype in list_types()
}


def destination_fields(type_name: str) -> tuple[str, ...]:
    """The config fields of `type_name` that say where its secrets are sent (none for free config)."""
    return _FIELDS.get(type_name) or ()


def destination_digest(type_name: str, provider: str, config: Any) -> bytes:
    """The digest of where a connection with this type, provider and stored config sends its secrets."""
    names = _FIELDS.get(type_name)
    if names is None or not isinstance(config, dict):
        where = config
    else:
        where = {name: config.get(name) for name in names}
    doc = {"config": where, "provider": provider, "type": type_name}
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(_DOMAIN + canonical.encode("utf-8", "surrogatepass")).digest()
