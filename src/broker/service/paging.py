"""Opaque page tokens and page-size rules shared by every List call."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from broker.errors import InvalidArgument
from broker.model import AuditFilter, SecurityEventFilter

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """0 means the default; negative or above the maximum is an error."""
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= requested <= MAX_PAGE_SIZE:
        raise InvalidArgument.field("page_size", f"must be between 1 and {MAX_PAGE_SIZE}")
    return requested


def _digest(filter: Any) -> str:
    """A short digest of a listing's filter (a dataclass), the same for equal filters (labels in
    any order). It catches a mistake, not an attack: a caller may list with any filter anyway."""
    canonical = json.dumps(dataclasses.asdict(filter), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_token(kind: str, position: Any, filter: Any) -> str:
    """A token that resumes a listing of `kind` with this `filter` after `position`."""
    raw = json.dumps([kind, position, _digest(filter)], separators=(",", ":")).encode()
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


def decode_token(kind: str, token: str, is_position: Callable[[Any], bool], filter: Any) -> Any:
    """The position in a token made by `encode_token`, or None for an empty token.

    A token is input like any other: one not made for this listing, or whose position is
    not of the listing's shape (`is_position`), is INVALID_ARGUMENT, never a store error.
    So is a token sent with other filters than the call that returned it (AIP-158): its
    position means nothing in another listing, and the pages would silently skip or repeat.
    """
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument.field("page_token", _FORGED)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        found_kind, position, digest = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, RecursionError):
        raise InvalidArgument.field("page_token", _FORGED) from None
    if found_kind != kind or not is_position(position):
        raise InvalidArgument.field("page_token", _FORGED)
    if digest != _digest(filter):
        raise InvalidArgument.field(
            "page_token",
            "was returned for other filters: send it with the filters of the call that returned it",
        )
    return position


class _Numbered(Protocol):
    @property
    def id(self) -> int: ...


Event = TypeVar("Event", bound=_Numbered)


async def newest_first(
    kind: str,
    filter: AuditFilter | SecurityEventFilter,
    page_size_requested: int,
    page_token: str,
    fetch: Callable[[int, int | None], Awaitable[Sequence[Event]]],
) -> tuple[list[Event], str]:
    """One page of an event listing ordered by descending id, within the filter's time window.

    `fetch(limit, before_id)` reads from the store; one row more than the page tells
    whether another page follows.
    """
    if filter.start_time and filter.end_time and filter.start_time >= filter.end_time:
        raise InvalidArgument.field("end_time", "must be after start_time")
    limit = page_size(page_size_requested)
    before = decode_token(kind, page_token, event_id, filter)
    events = list(await fetch(limit + 1, before))
    if len(events) > limit:
        return events[:limit], encode_token(kind, events[limit - 1].id, filter)
    return events, ""
