"""Opaque page tokens and page-size rules shared by every List call."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

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
