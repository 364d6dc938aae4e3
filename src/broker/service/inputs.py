"""Checks on short text a caller sends that the store matches or keeps: ids, filters, reasons."""

from __future__ import annotations

from broker.errors import FieldViolation, InvalidArgument

# Longer than any id, name, SPIFFE id (2048 bytes at most), action or reason the broker keeps: a
# longer value can match nothing, and is refused before it costs a query.
MAX_TEXT = 2048


def require_printable(**fields: str) -> None:
    """INVALID_ARGUMENT naming each field that holds a control character (a NUL, a line break)
    or is longer than `MAX_TEXT` characters.

    No id, name, principal or reason contains one, so the text can only be a mistake or a
    probe; and PostgreSQL cannot even take a NUL as a query parameter (it would be INTERNAL).
    """
    bad = [
        FieldViolation(name, f"must be at most {MAX_TEXT} characters")
        if len(value) > MAX_TEXT
        else FieldViolation(name, "must not contain control characters")
        for name, value in fields.items()
        if len(value) > MAX_TEXT or not value.isprintable()
    ]
    if bad:
        raise InvalidArgument(bad)
