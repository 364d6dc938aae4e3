"""What a user typed as a host or URL, turned into something safe to check.

`parse_host` returns an IP address for every spelling the operating system would
treat as one (`inet_aton` forms such as `2852039166`, `0251.0376.0251.0376`,
`0xa9fea9fe`, `169.254.43518`, `127.1`), so the policy judges the address that
would really be contacted; anything else becomes a lower-case ASCII host name.
Ambiguous input (a name ending in a number that is not a valid address, a `%` or
`@` in a name) is refused rather than guessed at.

`parse_url` reads a URL's host the same way (after undoing percent-encoding, as a
browser does), and `Url.text` is the URL rewritten with that host in its standard
form (`http://0251.0376.0251.0376/x` -> `http://169.254.169.254/x`). Every user-given
URL goes through it before any HTTP client sees it: clients disagree on odd
spellings (httpx refuses octal, reads `127.1` as a name), and the policy must judge
the address, not the client's opinion of the spelling.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
import urllib.parse
from typing import NamedTuple

import idna

from broker.egress.addresses import IPAddress, without_scope
from broker.egress.errors import InvalidTarget

DEFAULT_PORTS = {"http": 80, "https": 443}

# Characters that change how a URL or host is split, anywhere in a host.
_FORBIDDEN = set("@/\\?#%:[] ")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NUMBER = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_ZONE = re.compile(r"^[A-Za-z0-9_.~-]+$")


class Url(NamedTuple):
    """An http(s) URL's scheme, host (a normalised name or an IP literal), port, and the rest
    (path, query and fragment, exactly as typed)."""

    scheme: str
    host: str
    port: int
    rest: str = ""

    @property
    def text(self) -> str:
        """The URL with its host in standard form: what HTTP clients are given."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORTS[self.scheme] else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.rest}"


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def _number(part: str) -> int | None:
    """An inet_aton number: decimal, 0x hex, or 0-prefixed octal; None if it is not one."""
    if not _NUMBER.match(part):
        return None
    if part.startswith("0x"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        return int(part, 8) if set(part) <= set("01234567") else None
    return int(part)


def _inet_aton(name: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address for a dotted name in any inet_aton form, or None when it is not one."""
    parts = name.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_number(p) for p in parts]
    if any(n is None for n in numbers):
        return None
    values = [n for n in numbers if n is not None]
    # The last part fills the remaining bytes (a.b -> 8+24 bits, a.b.c -> 8+8+16 bits).
    last_bits = 8 * (5 - len(values))
    if any(v > 255 for v in values[:-1]) or values[-1] >= 1 << last_bits:
        return None
    value = values[-1]
    for i, v in enumerate(values[:-1]):
        value |= v << (24 - 8 * i)
    return ipaddress.IPv4Address(value)


def _ipv6(text: str) -> ipaddress.IPv6Address:
    address, _, zone = text.partition("%")
    if "%" in text and not _ZONE.match(zone):
        raise InvalidTarget(f"invalid IPv6 zone id in {text!r}")
    try:
        parsed = ipaddress.IPv6Address(address)
    except ValueError:
        raise InvalidTarget(f"{text!r} is not a valid IPv6 address") from None
    # The zone only selects an interface; the policy judges the address itself.
    result = without_scope(parsed)
    assert isinstance(result, ipaddress.IPv6Address)
    return result


def _to_ascii(text: str) -> str:
    try:
        # UTS 46 mapping folds case, full-width letters and the ideographic full stop
        # ("169。254。169。254"), so the IPv4 check below sees what DNS would.
        return idna.encode(text, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise InvalidTarget(f"{text!r} is not a valid international domain name") from None


def parse_host(text: str) -> IPAddress | str:
    """The IP address `text` denotes, or its normalised (lower-case, ASCII, no trailing dot) name.

    Raises `InvalidTarget` for empty or malformed hosts and for hosts containing
    whitespace, control characters, `@`, `/` or other URL delimiters.
    """
    host = text.strip()
    if not host:
        raise InvalidTarget("the host is empty")
    if _has_control(host) or any(c.isspace() for c in host):
        raise InvalidTarget(f"the host {host!r} contains whitespace or control characters")
    if host.startswith("[") and host.endswith("]"):
        return _ipv6(host[1:-1])
    if ":" in host and not set(host) & (_FORBIDDEN - {":", "%"}):
        return _ipv6(host)
    if not host.isascii():
        host = _to_ascii(host)
    host = host.lower()
    if set(host) & _FORBIDDEN:
        raise InvalidTarget(f"the host {host!r} contains a character that is not allowed in a host name")
    if host.endswith("."):
        host = host[:-1]
    address = _inet_aton(host)
    if address is not None:
        return address
    labels = host.split(".")
    if _NUMBER.match(labels[-1]):
        # inet_aton-like but out of range: some resolvers would still call it an address.
        raise InvalidTarget(f"the host {host!r} looks like an IPv4 address but is not a valid one")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise InvalidTarget(f"{host!r} is not a valid host name")
    return host


def host_text(host: IPAddress | str) -> str:
    """The form of a parsed host to hand to a resolver, a driver or a comparison."""
    return str(host)


def parse_url(url: str) -> Url:
    """Scheme, host and port of an http(s) URL; refuses userinfo, other schemes and bad ports."""
    text = url.strip()
    if _has_control(text) or any(c.isspace() for c in text):
        raise InvalidTarget("the URL contains whitespace or control characters")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise InvalidTarget("only http:// and https:// URLs are allowed")
    # The authority ends at the first "/", "?" or "#". Browsers also end it at a backslash
    # but httpx does not; keeping it in the authority makes parse_host refuse it.
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        raise InvalidTarget("credentials in the URL (user@host) are not allowed; use the secret fields")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise InvalidTarget("unterminated [ in the URL's host")
        host_part, port_part = authority[: end + 1], authority[end + 1 :]
    else:
        host_part, colon, port_text = authority.partition(":")
        port_part = colon + port_text
        host_part = _percent_decoded(host_part)
    if port_part and not re.fullmatch(r":[0-9]{0,5}", port_part):
        raise InvalidTarget(f"invalid port in {authority!r}")
    port = int(port_part[1:]) if port_part[1:] else DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise InvalidTarget(f"port {port} is out of range")
    return Url(scheme, host_text(parse_host(host_part)), port, rest[len(authority) :])


def _percent_decoded(host: str) -> str:
    # A browser decodes %XX in a host before reading it, so `%31%32%37.0.0.1` is 127.0.0.1;
    # decoded once only: a `%` left after that makes parse_host refuse the host.
    if "%" not in host:
        return host
    try:
        return urllib.parse.unquote(host, errors="strict")
    except UnicodeDecodeError:
        raise InvalidTarget("the URL's host is percent-encoded but not UTF-8") from None
