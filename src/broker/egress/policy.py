"""Address classification and pinned resolution."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class Blocked(Exception):
    """The target is not allowed by the egress policy; nothing was sent to it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DnsFailure(Exception):
    """The host name did not resolve."""


@dataclass(frozen=True)
class EgressSettings:
    allow_loopback: bool = False
    allow_private: bool = True
    allow_cidrs: tuple[str, ...] = ()
    deny_cidrs: tuple[str, ...] = ()
    # When non-empty, only these host names (exact, case-insensitive) may be contacted.
    allow_hosts: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    total_timeout: float = 15.0
    max_response_bytes: int = 1024 * 1024
    max_redirects: int = 3


async def _system_resolve(host: str, port: int) -> Sequence[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class EgressPolicy:
    """Decides whether an address may be contacted and resolves host names to checked addresses."""

    def __init__(self, settings: EgressSettings, resolver: Resolver = _system_resolve) -> None:
        self.settings = settings
        self._resolver = resolver
        self._allow = [ipaddress.ip_network(c, strict=False) for c in settings.allow_cidrs]
        self._deny = [ipaddress.ip_network(c, strict=False) for c in settings.deny_cidrs]
        self._hosts = {h.lower().rstrip(".") for h in settings.allow_hosts}

    def check_address(self, address: IPAddress) -> None:
        """Raise `Blocked` unless `address` may be contacted."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_link_local or address.is_unspecified or address.is_multicast or address.is_reserved:
            raise Blocked(f"address {address} is in a range that is always blocked")
        if any(address in net for net in self._deny):
            raise Blocked(f"address {address} is denied by egress.deny_cidrs")
        if any(address in net for net in self._allow):
            return
        if address.is_loopback and not self.settings.allow_loopback:
            raise Blocked(f"loopback address {address} is blocked (egress.allow_loopback)")
        if address.is_private and not address.is_loopback and not self.settings.allow_private:
            raise Blocked(f"private address {address} is blocked (egress.allow_private)")

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Resolve once and check every answer; all must be allowed."""
        name = host.strip().lower().rstrip(".")
        if self._hosts and name not in self._hosts:
            raise Blocked(f"host {name} is not in egress.allow_hosts")
        try:
            literal = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            self.check_address(literal)
            return [literal]
        try:
            answers = await self._resolver(name, port)
        except (OSError, UnicodeError) as exc:
            raise DnsFailure(f"cannot resolve {name}") from exc
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in answers]
        if not addresses:
            raise DnsFailure(f"cannot resolve {name}")
        for address in addresses:
            self.check_address(address)
        return addresses
