"""Statement templates: the defaults per driver and the connection's own, checked again before
they run. They are filled in (`broker.catalog.fill_statement`) with values already quoted by the
server's own rules, never by str.format of raw values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from broker.catalog import CREATION_ONLY_PLACEHOLDERS, statement_placeholders, statement_problem

# The placeholders' grammar is the catalog's (broker.catalog.statement_problem and friends).
# {{password}}: what the default templates always meant (PostgreSQL: the SCRAM verifier; MySQL and
# MariaDB: the password itself). {{password_hash}}: the password as the server stores it, for the
# servers that accept one (PostgreSQL, MariaDB); see the sessions' password_form / password_hash.
_KEYS = {
    "creation": "creation_statements",
    "renewal": "renewal_statements",
    "revocation": "revocation_statements",
}


@dataclass(frozen=True)
class Statements:
    """A connection's statement templates, each list run in order, one statement at a time."""

    creation: tuple[str, ...]
    renewal: tuple[str, ...]
    revocation: tuple[str, ...]
    # Set when the connection's own revocation statements could never run and the driver's
    # defaults stand in for them: the placeholder that made them unusable (e.g. "{{password}}").
    revocation_replaced: str = ""
    # The driver's own revocation: what runs when the connection's keeps being refused.
    default_revocation: tuple[str, ...] = ()

    @property
    def own_revocation(self) -> bool:
        """Whether the revocation statements are the connection's own, not the driver's defaults."""
        return self.revocation != self.default_revocation


_PG_DEFAULT = Statements(
    creation=("CREATE ROLE {{name}} WITH LOGIN PASSWORD {{password}} VALID UNTIL {{expiration}}",),
    renewal=("ALTER ROLE {{name}} VALID UNTIL {{expiration}}",),
    revocation=("DROP ROLE IF EXISTS {{name}}",),
)
_PG_GROUP = ("GRANT {{group}} TO {{name}}",)
_MY_DEFAULT = Statements(
    # MySQL rewrites this statement's password out of its general, slow and binary logs.
    creation=("CREATE USER {{name}}@'%' IDENTIFIED BY {{password}}",),
    # MySQL has no login expiry: the broker's revocation ends the user.
    renewal=(),
    revocation=("DROP USER IF EXISTS {{name}}@'%'",),
)
# MariaDB logs statements as they came: the password only as its mysql_native_password hash, the
# plugin `IDENTIFIED BY 'password'` would have chosen too.
_MARIADB_HASHED = ("CREATE USER {{name}}@'%' IDENTIFIED BY PASSWORD {{password_hash}}",)
# The default role makes the group's privileges active at login without SET ROLE.
_MY_GROUP = {
    True: ("GRANT {{group}} TO {{name}}@'%'", "SET DEFAULT ROLE {{group}} FOR {{name}}@'%'"),
    False: ("GRANT {{group}} TO {{name}}@'%'", "SET DEFAULT ROLE {{group}} TO {{name}}@'%'"),
}


def statements_for(
    driver: str, config: Mapping[str, Any], *, mariadb: bool = True, password_hashes: bool = True
) -> Statements:
    """The connection's statement templates: config keys `creation_statements`,
    `renewal_statements`, `revocation_statements` (lists of str; empty/absent -> the driver's
    defaults). driver is "postgresql" or "mysql"; for "mysql", `mariadb` picks the default-role
    syntax, and with `password_hashes` (the server accepts {{password_hash}}) MariaDB's default
    creates the user from the password's hash (UserAdmin passes what the server reports). Raises
    ValueError for a bad template. A placeholder with no value where it is used ({{password_hash}}
    on a server that takes none) is left for UserAdmin to refuse when it renders the statement:
    the revocation statements must run whatever the creation statements say. Revocation statements
    that ask for a password (saved before the catalog refused that) are replaced by the driver's
    default, named in `revocation_replaced`."""
    if driver == "postgresql":
        default = _PG_DEFAULT
        group: tuple[str, ...] = _PG_GROUP
    elif driver == "mysql":
        default, group = _MY_DEFAULT, _MY_GROUP[mariadb]
        if mariadb and password_hashes:
            default = Statements(_MARIADB_HASHED, default.renewal, default.revocation)
    else:
        raise ValueError(f"driver {driver!r} has no database users the broker can manage")
    has_group = bool(config.get("group_role"))
    if has_group:
        default = Statements(default.creation + group, default.renewal, default.revocation)
    chosen: dict[str, tuple[str, ...]] = {}
    for field, key in _KEYS.items():
        given = config.get(key) or ()
        if isinstance(given, str) or not all(isinstance(s, str) for s in given):
            raise ValueError(f"{key} must be a list of statements")
        for index, statement in enumerate(given):
            problem = statement_problem(statement)
            if problem is None and not has_group and "group" in statement_placeholders(statement):
                problem = "{{group}} is used but group_role is not set"
            if problem is not None:
                raise ValueError(f"{key}[{index}]: {problem}")
        chosen[field] = tuple(given) or getattr(default, field)
    replaced = _unfillable_at_revocation(chosen["revocation"])
    if replaced:
        # A row saved before the catalog refused this (later_statement_template): the broker keeps
        # no password, so these statements could never run and the user would outlive its lease.
        # The defaults drop the user; the caller says so in the lease's audit event.
        chosen["revocation"] = default.revocation
    return Statements(**chosen, revocation_replaced=replaced, default_revocation=default.revocation)


def _unfillable_at_revocation(templates: tuple[str, ...]) -> str:
    """The first creation-only placeholder the revocation templates use, as "{{name}}", or ""."""
    for template in templates:
        used = statement_placeholders(template)
        for name in CREATION_ONLY_PLACEHOLDERS:
            if name in used:
                return "{{" + name + "}}"
    return ""


def expiration_text(expires_at: datetime, *, postgresql: bool) -> str:
    """The expiry in UTC as each server reads it: PostgreSQL with the zone, MySQL without."""
    if expires_at.tzinfo is None:
        raise ValueError("expires_at must carry a time zone")
    text = expires_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return text + "+00" if postgresql else text
