"""The egress policy: settings, the address check, and pinned resolution.

URLs are read by `hosts.parse_url` (see `check_url`), never first by an HTTP client.

Order of the address rules (the first that applies decides):

1. always blocked: link-local and cloud metadata addresses, unspecified, multicast,
   broadcast, reserved, 0.0.0.0/8, and any IPv6 form that embeds one of those;
2. `deny_cidrs`;
3. `allow_cidrs` (cannot lift rule 1);
4. loopback unless `allow_loopback`; private ranges unless `allow_private`.

`allow_hosts`, when set, additionally limits which names (or literal addresses)
may be contacted at all; the addresses they resolve to are still checked.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from broker.egress.addresses import IPAddress, Kind, Verdict, classify, without_scope
from broker.egress.errors import Blocked, DnsFailure, InvalidTarget
from broker.egress.hosts import Url, host_text, parse_host, parse_url

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

__all__ = [
    "Blocked",
    "DnsFailure",
    "EgressPolicy",
    "EgressSettings",
    "IPAddress",
    "Resolver",
    "parse_allowed_host",
    "parse_cidr",
]


def parse_cidr(text: str) -> IPNetwork:
    """A network from `10.0.0.0/8` or a bare address (a /32 or /128); ValueError says why not."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP network such as 10.0.0.0/8 or fd00::/8") from None


def parse_allowed_host(text: str) -> str:
    """An `allow_hosts` entry normalised: a host name, an IP literal, or `*.suffix` for subdomains."""
    wildcard = text.strip().startswith("*.")
    try:
        parsed = parse_host(text.strip()[2:] if wildcard else text)
    except InvalidTarget as exc:
        raise ValueError(f"{text!r}: {exc.reason}") from None
    if wildcard and not isinstance(parsed, str):
        raise ValueError(f"{text!r}: a wildcard needs a domain name, not an address")
    return ("*." if wildcard else "") + host_text(parsed)


@dataclass(frozen=True)
class EgressSettings:
    """What the egress policy allows, and how long and how much it may take; validated on creation."""

    allow_loopback: bool = False
    allow_private: bool = True
    allow_cidrs: tuple[str, ...] = ()
    deny_cidrs: tuple[str, ...] = ()
    # When non-empty, only these hosts may be contacted: exact names or IP literals
    # (case-insensitive, trailing dot ignored) and `*.example.com` for any subdomain.
    allow_hosts: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    total_timeout: float = 15.0
    max_response_bytes: int = 1024 * 1024
    max_redirects: int = 3
    # Connections the proxy keeps to upstreams, shared by every executor; a call waits for one.
    proxy_connections: int = 200

    def __post_init__(self) -> None:
        for name in ("allow_cidrs", "deny_cidrs"):
            for cidr in getattr(self, name):
                try:
                    parse_cidr(cidr)
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        for host in self.allow_hosts:
            try:
                parse_allowed_host(host)
            except ValueError as exc:
                raise ValueError(f"allow_hosts: {exc}") from None
        if self.connect_timeout <= 0 or self.total_timeout <= 0:
            raise ValueError("connect_timeout and total_timeout must be positive")
        if self.max_response_bytes < 1:
            raise ValueError("max_response_bytes must be at least 1")
        if self.max_redirects < 0:
            raise ValueError("max_redirects must not be negative")


async def _system_resolve(host: str, port: int) -> Sequence[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _describe(address: IPAddress, verdict: Verdict) -> str:
    if not verdict.via:
        return f"{address} is {verdict.label}"
    return f"{address} ({verdict.via}) carries {verdict.address}, which is {verdict.label}"


class EgressPolicy:
    """Decides whether an address may be contacted and resolves host names to checked addresses."""

    def __init__(self, settings: EgressSettings, resolver: Resolver = _system_resolve) -> None:
        self.settings = settings
        self._resolver = resolver
        self._allow = [parse_cidr(c) for c in settings.allow_cidrs]
        self._deny = [parse_cidr(c) for c in settings.deny_cidrs]
        self._hosts = {parse_allowed_host(h) for h in settings.allow_hosts}

    def check_address(self, address: IPAddress | str) -> None:
        """Raise `Blocked` unless `address` (and every IPv4 address embedded in it) may be contacted."""
        if isinstance(address, str):
            try:
                address = ipaddress.ip_address(address)
            except ValueError:
                raise InvalidTarget(f"{address!r} is not an IP address") from None
        address = without_scope(address)
        verdicts = classify(address)
        for verdict in verdicts:
            if verdict.kind is Kind.ALWAYS_BLOCKED:
                raise Blocked(f"address {_describe(address, verdict)}: always blocked")
        for verdict in verdicts:
            if any(verdict.address in net for net in self._deny):
                raise Blocked(f"address {verdict.address} is denied by egress.deny_cidrs")
        for verdict in verdicts:
            if any(verdict.address in net for net in self._allow):
                continue
            if verdict.kind is Kind.LOOPBACK and not self.settings.allow_loopback:
                raise Blocked(f"address {_describe(address, verdict)}: blocked by egress.allow_loopback")
            if verdict.kind is Kind.PRIVATE and not self.settings.allow_private:
                raise Blocked(f"address {_describe(address, verdict)}: blocked by egress.allow_private")

    def _host_allowed(self, name: str) -> bool:
        if not self._hosts or name in self._hosts:
            return True
        return any(h.startswith("*.") and name.endswith(h[1:]) for h in self._hosts)

    def check_host(self, host: str) -> IPAddress | str:
        """Parse `host` as typed and apply the checks that need no DNS; returns the parsed host.

        An IP literal is fully checked here; a name still has to go through `resolve`.
        """
        parsed = parse_host(host)
        if not self._host_allowed(host_text(parsed)):
            raise Blocked(f"host {host_text(parsed)} is not in egress.allow_hosts")
        if not isinstance(parsed, str):
            self.check_address(parsed)
        return parsed

    def check_url(self, url: str) -> Url:
        """Parse a user-given http(s) URL with the policy's own parser and check its host.

        Every path that sends to a URL calls this first and hands `.text` (the host in
        standard form) to its HTTP client, so an odd spelling of an address is judged as
        the address (`Blocked`) or refused as malformed (`InvalidTarget`) the same way
        everywhere, whatever the client would have made of it.
        """
        parsed = parse_url(url)
        self.check_host(parsed.host)
        return parsed

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Resolve once and check every answer; one blocked answer blocks the host."""
        parsed = self.check_host(host)
        if not isinstance(parsed, str):
            return [parsed]
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                answers = await self._resolver(parsed, port)
        except TimeoutError:
            raise DnsFailure(f"resolving {parsed} timed out") from None
        except (OSError, UnicodeError) as exc:
            raise DnsFailure(f"cannot resolve {parsed}") from exc
        addresses: list[IPAddress] = []
        for answer in answers:
            try:
                address = without_scope(ipaddress.ip_address(str(answer).split("%")[0]))
            except ValueError:
                raise DnsFailure(f"resolving {parsed} gave a malformed answer") from None
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise DnsFailure(f"cannot resolve {parsed}")
        for address in addresses:
            try:
                self.check_address(address)
            except Blocked as exc:
                raise Blocked(f"host {parsed} resolves to a blocked address: {exc.reason}") from None
        return addresses
