"""Checks on short text a caller sends that the store matches or keeps: ids, filters, reasons."""

from __future__ import annotations

from broker.errors import FieldViolation, InvalidArgument


def require_printable(**fields: str) -> None:
    """INVALID_ARGUMENT naming each field that holds a control character (a NUL, a line break).

    No id, name, principal or reason contains one, so the text can only be a mistake or a
    probe; and PostgreSQL cannot even take a NUL as a query parameter (it would be INTERNAL).
    """
    bad = [
        FieldViolation(name, "must not contain control characters")
        for name, value in fields.items()
        if not value.isprintable()
    ]
    if bad:
        raise InvalidArgument(bad)
