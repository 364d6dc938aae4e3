"""The address classifier and pinned resolution, on a corpus of tricky forms (no sockets, no DNS)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest

from broker.egress import Blocked, DnsFailure, EgressPolicy, EgressSettings, InvalidTarget

# A fake DNS: every name a test uses, and what it answers.
ZONE: dict[str, list[str]] = {
    "localhost": ["127.0.0.1"],
    "public.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
    "metadata.example": ["169.254.169.254"],
    "rebind.example": ["93.184.215.14", "127.0.0.1"],  # one bad answer among good ones
    "private.example": ["10.1.2.3"],
    "mapped.example": ["::ffff:169.254.169.254"],
    "scoped.example": ["fe80::1%eth0"],
    "api.example.com": ["93.184.215.14"],
    "evil.example.com.attacker.net": ["93.184.215.14"],
}


class FakeDns:
    def __init__(self, zone: dict[str, list[str]] | None = None) -> None:
        self.zone = ZONE if zone is None else zone
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        if host not in self.zone:
            raise OSError(f"no such host {host}")
        return self.zone[host]


def policy(**settings: object) -> EgressPolicy:
    return EgressPolicy(EgressSettings(**settings), resolver=FakeDns())  # type: ignore[arg-type]


ALWAYS_BLOCKED = [
    # The metadata address in every form.
    "169.254.169.254",
    "2852039166",
    "0251.0376.0251.0376",
    "0xa9fea9fe",
    "0xa9.0xfe.0xa9.0xfe",
    "0xa9.254.0251.0xfe",
    "169.254.43518",
    "169.254.169.254.",
    " 169.254.169.254",
    "[::ffff:169.254.169.254]",
    "[::ffff:a9fe:a9fe]",
    "::a9fe:a9fe",  # IPv4-compatible
    "::ffff:0:a9fe:a9fe",  # IPv4-translated (SIIT)
    "64:ff9b::a9fe:a9fe",  # NAT64
    "64:ff9b:1:a9fe:a9:fe00::",  # local-use NAT64, /48 layout
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64, /96 layout
    "2002:a9fe:a9fe::1",  # 6to4
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo: client ~0x56015601 = 169.254.169.254
    "metadata.example",
    "mapped.example",
    # Other cloud metadata addresses, inside otherwise configurable ranges.
    "fd00:ec2::254",
    "100.100.100.200",
    # Link-local, unspecified, multicast, broadcast, reserved.
    "169.254.0.1",
    "fe80::1",
    "fe80::1%eth0",
    "scoped.example",
    "0.0.0.0",
    "0",
    "0.1.2.3",
    "[::]",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "255.255.255.255",
    "240.0.0.1",
    "::ffff:0.0.0.0",
    "::ffff:255.255.255.255",
    "100::1",  # discard-only: outside global unicast
    "fec0::1",  # deprecated site-local
]


@pytest.mark.parametrize("host", ALWAYS_BLOCKED)
async def test_always_blocked_whatever_the_settings(host: str) -> None:
    # The most permissive settings possible: allow_cidrs cannot lift these.
    lenient = policy(allow_loopback=True, allow_private=True, allow_cidrs=("0.0.0.0/0", "::/0"))
    with pytest.raises(Blocked):
        await lenient.resolve(host, 80)


LOOPBACK = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f.1",
    "[::1]",
    "localhost",
    "::ffff:127.0.0.1",
    "::7f00:1",
]


@pytest.mark.parametrize("host", LOOPBACK)
async def test_loopback_is_blocked_by_default_and_allowed_on_request(host: str) -> None:
    with pytest.raises(Blocked, match="allow_loopback"):
        await policy().resolve(host, 80)
    addresses = await policy(allow_loopback=True).resolve(host, 80)
    assert addresses and all(
        a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None) or int(a) == 0x7F000001
        for a in addresses
    )


PRIVATE = [
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",  # carrier-grade NAT
    "100.127.255.254",
    "fc00::1",
    "fd12:3456::1",
    "::ffff:10.0.0.1",
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "private.example",
]


@pytest.mark.parametrize("host", PRIVATE)
async def test_private_ranges_follow_allow_private(host: str) -> None:
    assert await policy().resolve(host, 80)
    with pytest.raises(Blocked, match="allow_private"):
        await policy(allow_private=False).resolve(host, 80)


PUBLIC = [
    "93.184.215.14",
    "8.8.8.8",
    "2606:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "public.example",
]


@pytest.mark.parametrize("host", PUBLIC)
async def test_public_addresses_are_allowed_even_when_strict(host: str) -> None:
    assert await policy(allow_private=False).resolve(host, 443)


def test_edges_of_the_ranges() -> None:
    strict = policy(allow_private=False)
    for outside in ("172.15.255.255", "172.32.0.1", "100.63.255.255", "100.128.0.1", "169.253.255.255"):
        strict.check_address(outside)
    for inside in ("172.16.0.0", "100.64.0.0", "192.168.255.255"):
        with pytest.raises(Blocked):
            strict.check_address(inside)


async def test_every_answer_is_checked_one_bad_answer_blocks_the_host() -> None:
    with pytest.raises(Blocked, match=r"rebind\.example resolves to a blocked address.*127\.0\.0\.1"):
        await policy().resolve("rebind.example", 443)


async def test_resolve_returns_all_checked_answers_in_order_once() -> None:
    dns = FakeDns({"twice.example": ["8.8.8.8", "8.8.4.4", "8.8.8.8"]})
    p = EgressPolicy(EgressSettings(), resolver=dns)
    assert await p.resolve("Twice.Example.", 53) == [
        ipaddress.ip_address("8.8.8.8"),
        ipaddress.ip_address("8.8.4.4"),
    ]
    assert dns.asked == ["twice.example"]  # normalised before it reaches DNS


async def test_literals_never_reach_the_resolver() -> None:
    dns = FakeDns({})
    p = EgressPolicy(EgressSettings(), resolver=dns)
    await p.resolve("0x08080808", 53)
    with pytest.raises(Blocked):
        await p.resolve("0xa9fea9fe", 80)
    assert dns.asked == []


async def test_dns_failures() -> None:
    with pytest.raises(DnsFailure, match=r"cannot resolve nowhere\.example"):
        await policy().resolve("nowhere.example", 80)
    with pytest.raises(DnsFailure):
        await EgressPolicy(EgressSettings(), resolver=FakeDns({"empty.example": []})).resolve(
            "empty.example", 80
        )
    with pytest.raises(DnsFailure, match="malformed"):
        await EgressPolicy(EgressSettings(), resolver=FakeDns({"junk.example": ["not-an-ip"]})).resolve(
            "junk.example", 80
        )


async def test_a_hanging_resolver_is_bounded_by_the_connect_timeout() -> None:
    async def hang(host: str, port: int) -> Sequence[str]:
        import asyncio

        await asyncio.sleep(30)
        return []

    p = EgressPolicy(EgressSettings(connect_timeout=0.05), resolver=hang)
    with pytest.raises(DnsFailure, match="timed out"):
        await p.resolve("slow.example", 80)


async def test_deny_cidrs_win_over_allow_and_over_allowed_ranges() -> None:
    p = policy(allow_loopback=True, allow_cidrs=("10.0.0.0/8",), deny_cidrs=("10.9.0.0/16", "127.0.0.2"))
    await p.resolve("10.1.1.1", 80)
    await p.resolve("127.0.0.1", 80)
    for host in ("10.9.1.1", "127.0.0.2", "::ffff:10.9.0.1", "2002:0a09:0001::1"):
        with pytest.raises(Blocked, match="deny_cidrs"):
            await p.resolve(host, 80)
    with pytest.raises(Blocked, match="deny_cidrs"):
        await policy(deny_cidrs=("93.184.215.0/24",)).resolve("public.example", 80)


async def test_allow_cidrs_lift_loopback_and_private_but_not_the_always_blocked_set() -> None:
    p = policy(allow_private=False, allow_cidrs=("127.0.0.1/32", "10.1.0.0/16", "169.254.0.0/16"))
    await p.resolve("127.0.0.1", 80)
    await p.resolve("::ffff:127.0.0.1", 80)  # the embedded IPv4 is what the allow list matches
    await p.resolve("10.1.2.3", 80)
    for host in ("127.0.0.2", "10.2.0.1", "169.254.169.254", "169.254.1.1"):
        with pytest.raises(Blocked):
            await p.resolve(host, 80)


async def test_allow_hosts_limits_names_and_literals() -> None:
    p = policy(allow_hosts=("Public.Example.", "*.example.com", "8.8.8.8"))
    await p.resolve("public.example", 80)
    await p.resolve("PUBLIC.example", 80)
    await p.resolve("api.example.com", 80)
    await p.resolve("8.8.8.8", 80)
    await p.resolve("0x08080808", 80)  # the same address, spelled differently
    for host in ("example.com", "private.example", "8.8.4.4", "evil.example.com.attacker.net"):
        with pytest.raises(Blocked, match="allow_hosts"):
            await p.resolve(host, 80)


async def test_allow_hosts_does_not_skip_the_address_check() -> None:
    p = policy(allow_hosts=("metadata.example", "localhost"))
    with pytest.raises(Blocked, match="always blocked"):
        await p.resolve("metadata.example", 80)
    with pytest.raises(Blocked, match="allow_loopback"):
        await p.resolve("localhost", 80)


async def test_malformed_hosts_are_invalid_targets_and_never_resolved() -> None:
    dns = FakeDns()
    p = EgressPolicy(EgressSettings(), resolver=dns)
    for host in ("", "evil@169.254.169.254", "a b", "public.example/x", "256.0.0.1"):
        with pytest.raises(InvalidTarget):
            await p.resolve(host, 80)
    assert dns.asked == []


def test_check_address_accepts_text_and_names_the_reason() -> None:
    p = policy()
    with pytest.raises(Blocked, match=r"::ffff:a9fe:a9fe \(IPv4-mapped\) carries 169\.254\.169\.254"):
        p.check_address("::ffff:169.254.169.254")
    with pytest.raises(Blocked, match=r"Teredo\) carries 169\.254\.169\.254"):
        p.check_address(ipaddress.ip_address("2001:0:4136:e378:8000:63bf:5601:5601"))
    with pytest.raises(InvalidTarget):
        p.check_address("not an address")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("deny_cidrs", ("10.0.0.0/33",), "deny_cidrs: '10.0.0.0/33'"),
        ("allow_cidrs", ("nonsense",), "allow_cidrs: 'nonsense'"),
        ("allow_hosts", ("a@b",), "allow_hosts: 'a@b'"),
        ("allow_hosts", ("*.10.0.0.1",), "allow_hosts"),
        ("connect_timeout", 0, "connect_timeout"),
        ("max_response_bytes", 0, "max_response_bytes"),
        ("max_redirects", -1, "max_redirects"),
    ],
)
def test_settings_are_validated_naming_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace(".", r"\.")):
        EgressSettings(**{field: value})  # type: ignore[arg-type]
