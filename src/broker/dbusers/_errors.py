"""The one error of this package: a short reason and a code, never server text or a secret."""

from __future__ import annotations

import re

REASONS = frozenset(
    {
        "blocked",
        "dns",
        "connect_failed",
        "timeout",
        "tls",
        "auth_failed",
        "statement_failed",
        "protocol",
        "invalid_config",
        "decrypt_failed",
    }
)


# Refusals that say nothing about the statements, only about this moment: PostgreSQL's class 40
# (a serialization failure, a deadlock) and 55P03 (a lock not available), MySQL's 1205 (a lock wait
# timed out) and 1213 (a deadlock).
_FOR_NOW = frozenset({"55P03", "1205", "1213"})

# What a code may be: a SQLSTATE, a MySQL error number, a placeholder. It reaches the executor's
# UNAVAILABLE message, and a server writes its SQLSTATE as it likes (any length, any bytes).
_CODE = re.compile(r"[0-9A-Z]{5}|[0-9]{1,5}|\{\{[a-z_]{1,32}\}\}")


class LeaseDbError(Exception):
    """A step failed. `reason` is a short token for metrics/ListLeases, never containing a secret
    or server text: "blocked" (egress policy), "dns", "connect_failed", "timeout", "tls",
    "auth_failed", "statement_failed" (+ `code`: SQLSTATE or MySQL errno as str), "protocol",
    "invalid_config" (the connection's statements cannot be used, e.g. {{group}} without group_role;
    + `code`: the placeholder that has no value, e.g. "{{password_hash}}" on MySQL),
    "decrypt_failed" (the connection's stored credentials do not open; raised by the lease service)."""

    def __init__(self, reason: str, code: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        self.reason = reason
        self.code = code if not code or _CODE.fullmatch(code) else "unrecognised"
        super().__init__(f"{reason} ({self.code})" if self.code else reason)

    @property
    def refused_for_now(self) -> bool:
        """A statement refused for a lock or a conflict: the same statements may well run next time."""
        return self.reason == "statement_failed" and (self.code in _FOR_NOW or self.code.startswith("40"))

    def __repr__(self) -> str:
        return f"LeaseDbError({self.reason!r}, {self.code!r})"

    def __reduce__(self) -> tuple[type[LeaseDbError], tuple[str, str]]:
        return (LeaseDbError, (self.reason, self.code))
