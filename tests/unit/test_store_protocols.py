"""The store's roles stay small: each protocol a service can depend on has at most 12 methods,
and `Store` is exactly those roles put together (nothing only the whole store has)."""

from __future__ import annotations

import inspect
from typing import Protocol

from broker.store import protocols

MAX_METHODS = 12


def _roles() -> dict[str, type]:
    """Every protocol defined in `broker.store.protocols` except the composition `Store`."""
    return {
        name: cls
        for name, cls in vars(protocols).items()
        if inspect.isclass(cls)
        and cls.__module__ == protocols.__name__
        and Protocol in cls.__bases__
        and cls is not protocols.Store
    }


def _own_methods(cls: type) -> set[str]:
    return {name for name, value in vars(cls).items() if callable(value) and not name.startswith("_")}


def test_no_store_protocol_has_more_than_twelve_methods() -> None:
    roles = _roles()
    assert {"ConnectionStore", "GrantStore", "AuditLogStore", "KeyStore", "Coordination"} <= set(roles)
    too_big = {
        name: len(_own_methods(cls)) for name, cls in roles.items() if len(_own_methods(cls)) > MAX_METHODS
    }
    assert too_big == {}, f"store protocols over {MAX_METHODS} methods (split them by role): {too_big}"


def test_store_is_every_role_and_each_method_belongs_to_one_role() -> None:
    roles = {name: cls for name, cls in _roles().items() if cls is not protocols.ChangeSink}
    assert set(protocols.Store.__bases__) == {*roles.values(), Protocol}
    owners: dict[str, list[str]] = {}
    for name, cls in roles.items():
        for method in _own_methods(cls):
            owners.setdefault(method, []).append(name)
    shared = {method: names for method, names in owners.items() if len(names) > 1}
    assert shared == {}
    assert _own_methods(protocols.Store) == set()  # a method there would belong to no role
