"""Remove secret values, in every common encoding, from text that leaves the broker."""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Iterable

MASK = "[redacted]"
# Shorter values would mask ordinary words; validation keeps real secrets longer.
MIN_LENGTH = 4


def _forms(value: str) -> set[str]:
    raw = value.encode()
    forms = {
        value,
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
        urllib.parse.quote(value),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        raw.hex(),
    }
    return {f for f in forms if len(f) >= MIN_LENGTH}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with each secret (plain, URL-encoded, base64, hex) replaced by a mask."""
    forms: set[str] = set()
    for value in secrets:
        if len(value) >= MIN_LENGTH:
            forms |= _forms(value)
    # Longest first, so a form that contains another is masked whole.
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, MASK)
    return text
