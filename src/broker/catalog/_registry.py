"""The one registry of connection types, checked for consistency when the module loads.

A typo in the type tables (a rule naming a field that does not exist, a default its own
field would reject) fails at import, not on the first request that happens to hit it.
"""

from __future__ import annotations

import re

from broker.catalog._accounts import ACCOUNT_TYPES
from broker.catalog._services import SERVICE_TYPES
from broker.catalog._spec import PROVIDER, ConnectionType, FieldKind, Problem
from broker.catalog._values import parse
from broker.errors import InvalidArgument

# Names that say how the wire is secured: forgetting the `transport` mark would leave them unbound.
_TRANSPORT_NAME = re.compile(r"(ssl|tls)(_\w+)?|\w+_ca|encryption")


def _check_type(ctype: ConnectionType) -> None:
    """Raise ValueError if `ctype`'s data contradicts itself."""

    def fail(why: str) -> ValueError:
        return ValueError(f"catalog type {ctype.name}: {why}")

    names = [f.name for f in ctype.fields]
    if len(set(names)) != len(names) or PROVIDER in names:
        raise fail("field names must be unique and not 'provider'")
    if ctype.open_config and ctype.fields:
        raise fail("an open-config type declares no fields")
    for spec in ctype.fields:
        if (spec.kind is FieldKind.ENUM) != bool(spec.choices):
            raise fail(f"{spec.name}: choices go with kind enum, and only with it")
        if spec.secret and (spec.kind is not FieldKind.STRING or spec.default is not None):
            raise fail(f"{spec.name}: a secret is a string without a default")
        # A URL says where something is sent: forgetting the mark would leave it unbound.
        if (spec.kind is FieldKind.URL and not spec.destination) or (spec.secret and spec.destination):
            raise fail(f"{spec.name}: a URL is a destination field, a secret never is")
        if spec.withheld and not spec.secret:
            raise fail(f"{spec.name}: only a secret can be withheld")
        if spec.use and (spec.secret or spec.destination or spec.transport):
            raise fail(f"{spec.name}: a use field is neither a secret, a destination nor a transport field")
        if spec.transport and (spec.secret or spec.destination):
            raise fail(f"{spec.name}: a transport field is neither a secret nor a destination field")
        if _TRANSPORT_NAME.fullmatch(spec.name) and not spec.transport and not spec.secret:
            raise fail(f"{spec.name}: says how the wire is secured, so it is a transport field")
    derived = {d.field for d in ctype.defaults}
    conds = [c for r in ctype.rules for c in r.when] + [c for d in ctype.defaults for c in d.when]
    for cond in conds:
        read = ctype.spec(cond.field)
        if cond.field == PROVIDER:
            if not ctype.providers or not set(cond.values) <= set(ctype.providers):
                raise fail("a provider condition names an unknown provider")
        elif read is None or read.secret or cond.field in derived:
            # Conditions read config after static defaults, before derived ones.
            raise fail(f"condition on {cond.field}: must be a non-secret field without derived defaults")
    for rule in ctype.rules:
        if any(ctype.spec(name) is None for name in rule.fields):
            raise fail(f"rule names an unknown field among {rule.fields}")
        for cond in rule.when:
            read = ctype.spec(cond.field)
            # A rule's violation quotes the value it depends on, which is safe only for an enum.
            if cond.field != PROVIDER and (read is None or read.kind is not FieldKind.ENUM):
                raise fail(f"rule condition on {cond.field}: must be the provider or an enum field")
    defaults = [(ctype.spec(d.field), d.value) for d in ctype.defaults]
    defaults += [(spec, spec.default) for spec in ctype.fields if spec.default is not None]
    for target, value in defaults:
        if target is None or target.secret:
            raise fail("a default names an unknown or secret field")
        try:
            ok = parse(target, value) == value
        except Problem:
            ok = False
        if not ok:
            raise fail(f"{target.name}: default is not a valid, normalised value")


def _build(*types: ConnectionType) -> dict[str, ConnectionType]:
    registry: dict[str, ConnectionType] = {}
    for ctype in types:
        if ctype.name in registry:
            raise ValueError(f"catalog type {ctype.name} is defined twice")
        _check_type(ctype)
        registry[ctype.name] = ctype
    return dict(sorted(registry.items()))


_REGISTRY = _build(*SERVICE_TYPES, *ACCOUNT_TYPES)


def list_types() -> list[ConnectionType]:
    """Every connection type, sorted by name."""
    return list(_REGISTRY.values())


def get_type(name: str) -> ConnectionType:
    """The connection type called `name`; InvalidArgument on field `type` if there is none."""
    ctype = _REGISTRY.get(name) if isinstance(name, str) else None
    if ctype is None:
        raise InvalidArgument.field("type", "unknown connection type; known types: " + ", ".join(_REGISTRY))
    return ctype


def withheld_fields(type_name: str) -> frozenset[str]:
    """The secrets of `type_name` that Resolve never releases (none for a name the catalog lacks)."""
    ctype = _REGISTRY.get(type_name)
    return frozenset() if ctype is None else ctype.withheld
