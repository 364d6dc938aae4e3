"""Opaque page tokens and page-size rules shared by every List call."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from broker.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """0 means the default; negative or above the maximum is an error."""
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= requested <= MAX_PAGE_SIZE:
        raise InvalidArgument.field("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
    return requested


def encode_token(kind: str, position: Any) -> str:
    """A token that resumes a listing of `kind` after `position`."""
    raw = json.dumps([kind, position], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# A token this broker made is short; anything longer is forged, and not worth decoding.
MAX_TOKEN_CHARS = 1024
# Event ids and similar positions are SQL BIGINTs; a larger number would overflow the driver.
MAX_ID = 2**63 - 1
_FORGED = "is not a token returned by this listing"


def event_id(position: Any) -> bool:
    """Whether a position is an event id (a positive BIGINT; not a bool, not a float)."""
    return type(position) is int and 0 < position <= MAX_ID


def text(position: Any) -> bool:
    """Whether a position is a string key, such as a connection id or a SPIFFE id.

    Keys are printable ASCII; JSON could carry a lone surrogate, which no driver can encode.
    """
    return (
        isinstance(position, str)
        and len(position) <= MAX_TOKEN_CHARS
        and position.isascii()
        and position.isprintable()
    )


def text_pair(position: Any) -> bool:
    """Whether a position is a pair of string keys, such as (connection id, principal)."""
    return isinstance(position, list) and len(position) == 2 and all(text(x) for x in position)


def decode_token(kind: str, token: str, is_position: Callable[[Any], bool]) -> Any:
    """The position in a token made by `encode_token`, or None for an empty token.

    A token is input like any other: one not made for this listing, or whose position is
    not of the listing's shape (`is_position`), is INVALID_ARGUMENT, never a store error.
    """
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument.field("page_token", _FORGED)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        found_kind, position = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, RecursionError):
        raise InvalidArgument.field("page_token", _FORGED) from None
    if found_kind != kind or not is_position(position):
        raise InvalidArgument.field("page_token", _FORGED)
    return position


class _Numbered(Protocol):
    @property
    def id(self) -> int: ...


Event = TypeVar("Event", bound=_Numbered)


async def newest_first(
    kind: str,
    window: tuple[datetime | None, datetime | None],
    page_size_requested: int,
    page_token: str,
    fetch: Callable[[int, int | None], Awaitable[Sequence[Event]]],
) -> tuple[list[Event], str]:
    """One page of an event listing ordered by descending id, for a (start, end) time window.

    `fetch(limit, before_id)` reads from the store; one row more than the page tells
    whether another page follows.
    """
    start, end = window
    if start and end and start >= end:
        raise InvalidArgument.field("end_time", "must be after start_time")
    limit = page_size(page_size_requested)
    before = decode_token(kind, page_token, event_id)
    events = list(await fetch(limit + 1, before))
    if len(events) > limit:
        return events[:limit], encode_token(kind, events[limit - 1].id)
    return events, ""
