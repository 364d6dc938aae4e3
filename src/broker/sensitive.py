"""`SecretFields`: a connection's secret values, hard to leak by accident.

The repr masks every value, pickling is refused, and the plain dict is reached
only through `reveal()`, which the Resolve response builder alone calls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import NoReturn


class SecretFields:
    """Secret field names and values; the values never appear in repr, str or logs."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._values))

    def reveal(self) -> dict[str, str]:
        """The plain values. Call only where a secret is released (Resolve) or re-sealed."""
        return dict(self._values)

    def without(self, names: frozenset[str]) -> SecretFields:
        """These secrets less the fields in `names`."""
        return SecretFields({k: v for k, v in self._values.items() if k not in names})

    def to_bytes(self) -> bytes:
        return json.dumps(self._values, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SecretFields:
        values = json.loads(data)
        if not isinstance(values, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()
        ):
            raise ValueError("sealed secrets are not a map of strings")
        return cls(values)

    def __repr__(self) -> str:
        return f"SecretFields({', '.join(f'{k}=<redacted>' for k in self.names)})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretFields) and other._values == self._values

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> NoReturn:
        raise TypeError("secret values cannot be pickled")
