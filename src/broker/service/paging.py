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


def decode_token(kind: str, token: str) -> Any:
    """The position in a token made by `encode_token`, or None for an empty token."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        found_kind, position = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidArgument.field("page_token", "is not a token returned by this listing") from None
    if found_kind != kind:
        raise InvalidArgument.field("page_token", "is not a token returned by this listing")
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
    before = decode_token(kind, page_token)
    if before is not None and not isinstance(before, int):
        raise InvalidArgument.field("page_token", "is not a token returned by this listing")
    events = list(await fetch(limit + 1, before))
    if len(events) > limit:
        return events[:limit], encode_token(kind, events[limit - 1].id)
    return events, ""
