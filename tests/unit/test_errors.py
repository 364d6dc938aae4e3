"""InvalidArgument: what a caller receives is de-duplicated and bounded, whatever was found."""

from __future__ import annotations

from broker.errors import (
    MAX_DESCRIPTION_CHARS,
    MAX_FIELD_CHARS,
    MAX_MESSAGE_CHARS,
    MAX_SHOWN_VIOLATIONS,
    FieldViolation,
    InvalidArgument,
)


def test_the_same_violation_twice_is_said_once() -> None:
    error = InvalidArgument([FieldViolation("name", "is required")] * 3 + [FieldViolation("port", "bad")])
    assert error.violations == (FieldViolation("name", "is required"), FieldViolation("port", "bad"))
    assert error.message == "name: is required; port: bad"


def test_many_violations_show_the_first_few_then_how_many_more() -> None:
    error = InvalidArgument(FieldViolation(f"secrets.s{i}", "unknown") for i in range(100))
    assert len(error.violations) == 100
    assert len(error.shown) == MAX_SHOWN_VIOLATIONS + 1
    assert error.shown[-1] == FieldViolation("", f"and {100 - MAX_SHOWN_VIOLATIONS} more")
    assert error.message.endswith(f"; and {100 - MAX_SHOWN_VIOLATIONS} more")


def test_long_fields_descriptions_and_messages_are_clipped() -> None:
    error = InvalidArgument(FieldViolation("f" * 10_000 + str(i), "d" * 10_000) for i in range(50))
    assert all(len(v.field) <= MAX_FIELD_CHARS for v in error.shown)
    assert all(len(v.description) <= MAX_DESCRIPTION_CHARS for v in error.shown)
    assert len(error.message) <= MAX_MESSAGE_CHARS
    assert error.message.endswith("...")
