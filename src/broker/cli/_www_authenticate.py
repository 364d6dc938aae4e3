"""`WWW-Authenticate` challenges (RFC 9110 section 11.6.1), parsed for `oauth connect --mcp-server`.

    challenge  = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
    auth-param = token BWS "=" BWS ( token / quoted-string )

Several challenges share one header, separated by commas like their parameters; a name followed
by `=` continues the challenge, anything else starts the next one. The parser scans once, left
to right, with patterns that cannot backtrack, and refuses (`ChallengeError`) a header longer than
`MAX_HEADER`, more than `MAX_ITEMS` challenges and parameters, a parameter given twice in one
challenge (section 11.2), an unterminated quoted string or anything outside the grammar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_HEADER = 16 * 1024
MAX_ITEMS = 64

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# token68, then only whitespace up to the next comma or the end: a `name=value` is a parameter.
_TOKEN68 = re.compile(r"([A-Za-z0-9\-._~+/]+=*)[ \t]*(?=,|\Z)")
_PARAM_NAME = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+)[ \t]*=[ \t]*")
# qdtext and quoted-pair (RFC 9110 5.6.4); the two alternatives start with different characters.
_QUOTED = re.compile(r'"((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*)"')
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)
_SPACE = re.compile(r"[ \t]*")
_SEPARATORS = re.compile(r"[ \t,]*")


class ChallengeError(ValueError):
    """The header does not follow RFC 9110's grammar, or is larger than this parser accepts."""


@dataclass(frozen=True)
class Challenge:
    """One challenge: its scheme in lower case, its parameters (names in lower case) or token68."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)
    token68: str = ""


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge in a `WWW-Authenticate` value, in order."""
    if len(header) > MAX_HEADER:
        raise ChallengeError(f"longer than {MAX_HEADER} characters")
    challenges: list[Challenge] = []
    items = 0
    pos = _skip(_SEPARATORS, header, 0)
    while pos < len(header):
        scheme = _TOKEN.match(header, pos)
        if scheme is None:
            raise ChallengeError(f"expected an auth scheme at character {pos}")
        pos = scheme.end()
        after = _skip(_SPACE, header, pos)
        params: dict[str, str] = {}
        token68 = ""
        if after < len(header) and header[after] != ",":
            if after == pos:
                raise ChallengeError(f"expected a space after the scheme at character {pos}")
            pos = after
            short = _TOKEN68.match(header, pos)
            if short is not None:
                token68, pos = short.group(1), short.end()
            else:
                pos, items = _params(header, pos, params, items)
        else:
            pos = after
        challenges.append(Challenge(scheme.group().lower(), params, token68))
        items += 1
        if items > MAX_ITEMS:
            raise ChallengeError(f"more than {MAX_ITEMS} challenges and parameters")
        pos = _skip(_SEPARATORS, header, pos)
    return challenges


def _params(header: str, pos: int, params: dict[str, str], items: int) -> tuple[int, int]:
    """The auth-params from `pos` into `params`; returns where the next challenge may start."""
    while True:
        name = _PARAM_NAME.match(header, pos)
        if name is None:
            raise ChallengeError(f"expected name=value at character {pos}")
        key, pos = name.group(1).lower(), name.end()
        quoted = _QUOTED.match(header, pos)
        token = None if quoted else _TOKEN.match(header, pos)
        if quoted is not None:
            value, pos = _ESCAPE.sub(r"\1", quoted.group(1)), quoted.end()
        elif token is not None:
            value, pos = token.group(), token.end()
        elif header.startswith('"', pos):
            raise ChallengeError(f"unterminated or invalid quoted string at character {pos}")
        else:
            raise ChallengeError(f"expected a value for {key} at character {pos}")
        if key in params:
            raise ChallengeError(f"parameter {key} is given twice")
        params[key] = value
        items += 1
        if items > MAX_ITEMS:
            raise ChallengeError(f"more than {MAX_ITEMS} challenges and parameters")
        pos = _skip(_SPACE, header, pos)
        if pos >= len(header):
            return pos, items
        if header[pos] != ",":
            raise ChallengeError(f"expected ',' at character {pos}")
        following = _skip(_SEPARATORS, header, pos)
        if following >= len(header) or _PARAM_NAME.match(header, following) is None:
            return following, items  # the end, or the next challenge's scheme
        pos = following


def _skip(pattern: re.Pattern[str], header: str, pos: int) -> int:
    """Where `pattern` (which matches the empty string too) ends, from `pos`."""
    match = pattern.match(header, pos)
    return match.end() if match is not None else pos


def bearer_params(header: str) -> dict[str, str]:
    """The parameters of the first Bearer challenge (RFC 6750 section 3); empty when there is none."""
    for challenge in parse_challenges(header):
        if challenge.scheme == "bearer":
            return challenge.params
    return {}
