"""The vocabulary of the catalog: field kinds, field specs, conditional rules, connection types.

A connection type is data: its fields, which of them are secret, their defaults, and a few
conditional rules ("token is required when auth_type is bearer"). `_validate` interprets
that data; nothing else in the catalog knows about a particular type.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


class FieldKind(enum.StrEnum):
    """What a field holds; mirrors `FieldKind` in the proto."""

    STRING = "string"
    INTEGER = "integer"
    BOOLEAN = "boolean"
    URL = "url"
    ENUM = "enum"
    STRING_LIST = "string_list"
    STRING_MAP = "string_map"
    NUMBER = "number"
    TIMESTAMP = "timestamp"
    OBJECT = "object"


class Problem(ValueError):
    """A value is unacceptable. The message is shown to the caller, so it never quotes the value."""


# Called with a value already parsed for its kind; returns the value to store (possibly
# normalised) or raises `Problem`. Only `Problem` is caught, so a bug cannot leak a value
# through an unrelated exception message turned into a violation.
Check = Callable[[Any], Any]


@dataclass(frozen=True)
class FieldSpec:
    """One field of a connection type. Secret fields travel in `secrets`, all others in `config`.

    `default` of None means there is no default. `check` is a validation hook beyond the
    kind (ranges, formats); it is not part of the API's view of the field. `destination`
    marks a field that says where the secrets are sent (a URL, host, port, driver): a
    change to it needs the secrets again, and its value is bound into their ciphertext.
    `transport` marks a field that says how they travel there (whether the wire is
    encrypted, which CA vouches for the server, driver options): its value is bound into
    the ciphertext too, so a row whose TLS was turned off or whose CA was swapped in the
    database does not open. `use` marks a field that says what the broker does with the secrets
    where they go (a dynamic database connection: whether the stored credentials are released at
    all or only used to make users, the SQL run with them, the role and lifetime of those users):
    bound like a destination and, like one, a change needs the secrets again, or someone who may
    edit a connection, or write the database, would have the stored administrator run their SQL.
    `withheld` marks a secret the broker keeps for its own use and
    never releases to an executor (an OAuth2 client secret or refresh token: with them an
    executor could mint tokens for itself long after its grant is gone).
    """

    name: str
    kind: FieldKind
    secret: bool = False
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()
    description: str = ""
    check: Check | None = field(default=None, repr=False, compare=False)
    destination: bool = False
    transport: bool = False
    use: bool = False
    withheld: bool = False


def secret(
    name: str,
    description: str,
    *,
    required: bool = False,
    check: Check | None = None,
    withheld: bool = False,
) -> FieldSpec:
    """Shorthand for a secret string field."""
    return FieldSpec(
        name,
        FieldKind.STRING,
        secret=True,
        required=required,
        description=description,
        check=check,
        withheld=withheld,
    )


# The pseudo-field a condition uses to test the connection's provider.
PROVIDER = "provider"


@dataclass(frozen=True)
class Cond:
    """`field` (a config field, or PROVIDER) has one of `values`; or, with `negate`, none of them.

    A condition on a field the caller got wrong is treated as unknown, and a rule that
    depends on it is skipped, so one mistake yields one violation, not a cascade.
    """

    field: str
    values: tuple[str, ...]
    negate: bool = False

    def holds(self, value: Any) -> bool:
        """Whether the condition is true for the (normalised) value of `field`."""
        return (value in self.values) != self.negate


class RuleKind(enum.Enum):
    REQUIRE = "require"  # each field must be set
    ONE_OF = "one_of"  # at least one of the fields must be set
    FORBID = "forbid"  # none of the fields may be set by the caller


@dataclass(frozen=True)
class Rule:
    """A conditional constraint on which fields are set; applies when every `when` holds."""

    kind: RuleKind
    fields: tuple[str, ...]
    when: tuple[Cond, ...] = ()


@dataclass(frozen=True)
class Default:
    """A default that depends on other fields: the first `Default` for a field whose `when` holds wins.

    When none holds, the field's static `FieldSpec.default` applies.
    """

    field: str
    value: Any
    when: tuple[Cond, ...]


def require(*fields: str, when: tuple[Cond, ...] = ()) -> Rule:
    """Shorthand for a REQUIRE rule."""
    return Rule(RuleKind.REQUIRE, fields, when)


def one_of(*fields: str, when: tuple[Cond, ...] = ()) -> Rule:
    """Shorthand for a ONE_OF rule."""
    return Rule(RuleKind.ONE_OF, fields, when)


def forbid(*fields: str, when: tuple[Cond, ...] = ()) -> Rule:
    """Shorthand for a FORBID rule."""
    return Rule(RuleKind.FORBID, fields, when)


def is_(field_name: str, *values: str) -> Cond:
    """Condition: `field_name` is one of `values`."""
    return Cond(field_name, values)


def is_not(field_name: str, *values: str) -> Cond:
    """Condition: `field_name` is none of `values`."""
    return Cond(field_name, values, negate=True)


@dataclass(frozen=True)
class ConnectionType:
    """A kind of connection: its fields and, where it has them, its known providers.

    `rules` and `defaults` are the conditional parts, interpreted by `validate`; `open_config`
    (only `custom`) accepts free config keys and freely named secrets.
    """

    name: str
    description: str
    fields: tuple[FieldSpec, ...]
    providers: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = field(default=(), repr=False)
    defaults: tuple[Default, ...] = field(default=(), repr=False)
    open_config: bool = field(default=False, repr=False)
    # What the broker can do with it on an executor's behalf (proxy grants): "http" requests
    # with the credential injected, "mcp" tool calls, or "" (nothing: the secret is only resolved).
    proxy: Literal["http", "mcp", ""] = ""

    @functools.cached_property
    def withheld(self) -> frozenset[str]:
        """The secret fields Resolve never releases (`FieldSpec.withheld`)."""
        return frozenset(f.name for f in self.fields if f.withheld)

    def spec(self, name: str) -> FieldSpec | None:
        """The field called `name`, or None."""
        for f in self.fields:
            if f.name == name:
                return f
        return None


@dataclass(frozen=True)
class Validated:
    """A connection's content after validation: defaults applied, values normalised.

    `config` holds only non-secret fields; `secrets` only secret ones.
    """

    type: str
    provider: str
    config: dict[str, Any]
    secrets: dict[str, str]

    def __repr__(self) -> str:
        # The dataclass repr would print secret values into any log line or traceback.
        return (
            f"Validated(type={self.type!r}, provider={self.provider!r}, config={self.config!r}, "
            f"secrets=<{', '.join(sorted(self.secrets))}>)"
        )
