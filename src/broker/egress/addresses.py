"""Address classification: always blocked, loopback, private or public.

These are our own tables rather than `ipaddress`'s `is_private`/`is_global`, whose
answers changed between Python releases. An IPv6 address that carries an IPv4
address (IPv4-mapped, IPv4-compatible, SIIT, NAT64, 6to4, Teredo) is judged by
that IPv4 address as well, because that is where the packets end up.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Kind(enum.Enum):
    ALWAYS_BLOCKED = "always blocked"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    PUBLIC = "public"


@dataclass(frozen=True)
class Verdict:
    """How one view of an address (itself, or an IPv4 address embedded in it) is classified."""

    address: IPAddress
    kind: Kind
    label: str
    # How the address was found inside the original one ("" for the address itself).
    via: str = ""


_A = Kind.ALWAYS_BLOCKED
_L = Kind.LOOPBACK
_P = Kind.PRIVATE
_G = Kind.PUBLIC

# First match wins, so single addresses come before the ranges that contain them.
_V4: list[tuple[ipaddress.IPv4Network, Kind, str]] = [
    (ipaddress.IPv4Network(net), kind, label)
    for net, kind, label in [
        ("169.254.169.254/32", _A, "a cloud metadata address"),
        ("100.100.100.200/32", _A, "a cloud metadata address"),  # Alibaba Cloud
        ("192.0.0.192/32", _A, "a cloud metadata address"),  # Oracle Cloud Classic
        ("0.0.0.0/8", _A, "unspecified (this network)"),
        ("169.254.0.0/16", _A, "link-local"),
        ("224.0.0.0/4", _A, "multicast"),
        ("255.255.255.255/32", _A, "broadcast"),
        ("240.0.0.0/4", _A, "reserved"),
        ("127.0.0.0/8", _L, "loopback"),
        ("10.0.0.0/8", _P, "private"),
        ("172.16.0.0/12", _P, "private"),
        ("192.168.0.0/16", _P, "private"),
        ("100.64.0.0/10", _P, "carrier-grade NAT (private)"),
        ("198.18.0.0/15", _P, "benchmarking (private)"),
    ]
]

# Anything outside these rows (outside global unicast 2000::/3) is reserved: always blocked.
_V6: list[tuple[ipaddress.IPv6Network, Kind, str]] = [
    (ipaddress.IPv6Network(net), kind, label)
    for net, kind, label in [
        ("::/128", _A, "unspecified"),
        ("::1/128", _L, "loopback"),
        ("fd00:ec2::254/128", _A, "a cloud metadata address"),  # AWS over IPv6
        ("fe80::/10", _A, "link-local"),
        ("ff00::/8", _A, "multicast"),
        ("fc00::/7", _P, "unique local (private)"),
        # Translation prefixes: judged by the IPv4 address inside (see `_embedded`).
        ("::ffff:0:0/96", _G, "IPv4-mapped"),
        ("::ffff:0:0:0/96", _G, "IPv4-translated"),
        ("::/96", _G, "IPv4-compatible"),
        ("64:ff9b::/96", _G, "NAT64"),
        ("64:ff9b:1::/48", _G, "local-use NAT64"),
        ("2000::/3", _G, "global unicast"),
    ]
]

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_6TO4 = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def _bits(value: int, start: int, end: int) -> int:
    """Bits [start, end) of a 128-bit value, counted from the most significant bit."""
    return (value >> (128 - end)) & ((1 << (end - start)) - 1)


def _nat64_local_candidates(value: int) -> list[int]:
    # RFC 6052 embeds the IPv4 address differently per prefix length, skipping bits 64-71;
    # which length an operator chose inside 64:ff9b:1::/48 is unknown, so every one counts.
    return [
        _bits(value, 48, 64) << 16 | _bits(value, 72, 88),  # /48
        _bits(value, 56, 64) << 24 | _bits(value, 72, 96),  # /56
        _bits(value, 72, 104),  # /64
        _bits(value, 96, 128),  # /96
    ]


def _embedded(address: ipaddress.IPv6Address) -> list[tuple[ipaddress.IPv4Address, str]]:
    """The IPv4 addresses an IPv6 address carries, with the name of the form."""
    value = int(address)
    low = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if address in _MAPPED:
        return [(low, "IPv4-mapped")]
    if address in _TRANSLATED:
        return [(low, "IPv4-translated")]
    if address in _COMPATIBLE and value > 1:  # :: and ::1 are themselves, not 0.0.0.0 / 0.0.0.1
        return [(low, "IPv4-compatible")]
    if address in _NAT64:
        return [(low, "NAT64")]
    if address in _NAT64_LOCAL:
        return [(ipaddress.IPv4Address(v), "local-use NAT64") for v in _nat64_local_candidates(value)]
    if address in _6TO4 and address.sixtofour is not None:
        return [(address.sixtofour, "6to4")]
    if address in _TEREDO and address.teredo is not None:
        # The client address (stored inverted) is where a Teredo relay delivers the packets.
        return [(address.teredo[1], "Teredo")]
    return []


def _classify_one(address: IPAddress) -> tuple[Kind, str]:
    if isinstance(address, ipaddress.IPv4Address):
        for net4, kind, label in _V4:
            if address in net4:
                return kind, label
        return Kind.PUBLIC, "public"
    for net6, kind, label in _V6:
        if address in net6:
            return kind, label
    return Kind.ALWAYS_BLOCKED, "reserved"


def without_scope(address: IPAddress) -> IPAddress:
    """The address without an IPv6 zone id (`fe80::1%eth0` -> `fe80::1`)."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return ipaddress.IPv6Address(int(address))
    return address


def classify(address: IPAddress) -> list[Verdict]:
    """The address's own verdict, then one for every IPv4 address embedded in it."""
    address = without_scope(address)
    kind, label = _classify_one(address)
    verdicts = [Verdict(address, kind, label)]
    if isinstance(address, ipaddress.IPv6Address):
        for inner, form in _embedded(address):
            inner_kind, inner_label = _classify_one(inner)
            verdicts.append(Verdict(inner, inner_kind, inner_label, via=form))
    return verdicts
