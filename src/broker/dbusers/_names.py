"""Generated user names and passwords, from `secrets`."""

from __future__ import annotations

import re
import secrets
import string

PREFIX_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,11}")
_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits
SUFFIX_LENGTH = 16


def check_prefix(prefix: str) -> str:
    """`prefix` if it is [a-z][a-z0-9_]{0,11}, else ValueError: a prefix is what keeps the broker
    away from every user it did not create, so it may not be empty or a pattern."""
    if not isinstance(prefix, str) or PREFIX_PATTERN.fullmatch(prefix) is None:
        raise ValueError("a user name prefix is 1-12 characters: a-z first, then a-z, 0-9 or _")
    return prefix


def new_username(prefix: str) -> str:
    """prefix + 16 random characters [a-z0-9]: lower case needs no quoting on any server."""
    return check_prefix(prefix) + "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(SUFFIX_LENGTH))


def new_password() -> str:
    """43 URL-safe random characters (256 bits)."""
    return secrets.token_urlsafe(32)
