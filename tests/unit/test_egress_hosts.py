"""Host and URL parsing: every spelling the OS reads as an address becomes that address."""

from __future__ import annotations

import ipaddress

import pytest

import broker.egress
from broker.egress import InvalidTarget, Url, parse_host, parse_url

METADATA = ipaddress.IPv4Address("169.254.169.254")


@pytest.mark.parametrize(
    "text",
    [
        "169.254.169.254",
        "2852039166",  # one decimal number
        "0251.0376.0251.0376",  # octal parts
        "0xa9fea9fe",  # one hex number
        "0XA9FEA9FE",
        "0xa9.0xfe.0xa9.0xfe",  # hex parts
        "0xa9.254.0251.0xfe",  # mixed
        "169.254.43518",  # a.b.c with a 16-bit tail
        "169.16689662",  # a.b with a 24-bit tail
        "169.254.169.254.",  # trailing dot
        "  169.254.169.254",  # leading spaces
        "169.254.169.254 \t",
        "169\u3002254\u3002169\u3002254",  # ideographic full stops, folded by IDNA
        "\uff11\uff16\uff19.254.169.254",  # full-width digits
    ],
)
def test_every_spelling_of_the_metadata_address_is_that_address(text: str) -> None:
    assert parse_host(text) == METADATA


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[::ffff:169.254.169.254]", "::ffff:a9fe:a9fe"),
        ("[::ffff:a9fe:a9fe]", "::ffff:a9fe:a9fe"),
        ("::a9fe:a9fe", "::a9fe:a9fe"),
        ("[64:ff9b::a9fe:a9fe]", "64:ff9b::a9fe:a9fe"),
        ("2002:a9fe:a9fe::1", "2002:a9fe:a9fe::1"),
        ("fe80::1%eth0", "fe80::1"),  # the zone id only picks an interface
        ("[fe80::1%eth0]", "fe80::1"),
        ("[::]", "::"),
        ("[::1]", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
    ],
)
def test_ipv6_literals(text: str, expected: str) -> None:
    assert parse_host(text) == ipaddress.IPv6Address(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", "0.0.0.0"),
        ("0x", "0.0.0.0"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("1.2.3.4", "1.2.3.4"),
    ],
)
def test_short_forms(text: str, expected: str) -> None:
    assert parse_host(text) == ipaddress.IPv4Address(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        (" api.example.com ", "api.example.com"),
        ("localhost", "localhost"),
        ("db_1.internal", "db_1.internal"),
        ("Bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("1password.com", "1password.com"),
        ("0xg.example", "0xg.example"),
    ],
)
def test_names_are_normalised(text: str, expected: str) -> None:
    assert parse_host(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "a b.example",
        "evil@169.254.169.254",
        "169.254.169.254@evil",
        "a/b",
        "a\\b",
        "host:80",
        "a\x00b",
        "a\nb",
        "ex\u00adample.com",  # soft hyphen: invisible, refused
        "%31%36%39.254.169.254",  # percent-encoding in a host
        "256.1.1.1",  # ends in a number but is no address: refused, not sent to DNS
        "1.2.3.4.5",
        "08",
        "example.123",
        "[127.0.0.1]",
        "[::1",
        "fe80::1%eth 0",
        "-lead.example",
        "a..b",
        ".",
        "x" * 64 + ".example",
    ],
)
def test_bad_hosts_are_refused(text: str) -> None:
    with pytest.raises(InvalidTarget):
        parse_host(text)


def test_invalid_target_is_a_blocked_and_a_value_error() -> None:
    with pytest.raises(broker.egress.Blocked):
        parse_host("a@b")
    with pytest.raises(ValueError, match="empty"):
        parse_host("")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com", Url("http", "example.com", 80)),
        ("HTTPS://Example.com./path?q=1#f", Url("https", "example.com", 443, "/path?q=1#f")),
        ("https://example.com:8443/", Url("https", "example.com", 8443, "/")),
        ("http://[::1]:8080/x", Url("http", "::1", 8080, "/x")),
        ("http://0xa9fea9fe/latest/meta-data", Url("http", "169.254.169.254", 80, "/latest/meta-data")),
        ("http://[::ffff:169.254.169.254]/", Url("http", "::ffff:a9fe:a9fe", 80, "/")),
        ("http://host:/", Url("http", "host", 80, "/")),
        ("  http://example.com/  ", Url("http", "example.com", 80, "/")),
        ("http://%31%32%37.1:8080?q", Url("http", "127.0.0.1", 8080, "?q")),
    ],
)
def test_parse_url(url: str, expected: Url) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    ("url", "text"),
    [
        # What HTTP clients are given: the host in standard form, the rest exactly as typed.
        ("http://0251.0376.0251.0376/latest?a=%20#f", "http://169.254.169.254/latest?a=%20#f"),
        # Zero-padded parts are octal to inet_aton and browsers alike: 0254 is 172.
        ("http://169.254.169.0254:80/", "http://169.254.169.172/"),
        ("https://0x7f.1:08443", "https://127.0.0.1:8443"),
        ("http://\uff11\uff12\uff17.0.0.1/", "http://127.0.0.1/"),
        ("http://[::FFFF:169.254.169.254]/", "http://[::ffff:a9fe:a9fe]/"),
        ("http://[fe80::1%25eth0]:81/", "http://[fe80::1]:81/"),
        ("http://\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444/", "http://xn--e1afmkfd.xn--p1ai/"),
        ("HTTP://\uff25xample.COM./", "http://example.com/"),
    ],
)
def test_url_text_is_the_standard_spelling(url: str, text: str) -> None:
    assert parse_url(url).text == text


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://evil@169.254.169.254/", "credentials"),
        ("http://169.254.169.254@evil.example/", "credentials"),
        ("http://user:pass@example.com/", "credentials"),
        ("http://evil.example\\@169.254.169.254/", "credentials"),
        ("ftp://example.com/", "only http"),
        ("file:///etc/passwd", "only http"),
        ("gopher://127.0.0.1:6379/", "only http"),
        ("example.com", "only http"),
        ("http:/example.com", "only http"),
        ("http:///path", "empty"),
        ("http://example.com:99999/", "out of range"),
        ("http://example.com:+80/", "invalid port"),
        ("http://example.com:8o/", "invalid port"),
        ("http://[::1/", "unterminated"),
        ("http://exa mple.com/", "whitespace"),
        ("http://example.com/\r\nX-Injected: 1", "whitespace"),
        ("http://256.1.1.1/", "not a valid one"),
        ("http://1.2.3.4.5/", "not a valid one"),
        ("http://%ff.example/", "not UTF-8"),
        ("http://%2525.example/", "not allowed"),
        ("http://ex%2Fample.com/", "not allowed"),
        ("http://\uff11\uff16\uff19.254.169.254\uff1a80/", "international domain name"),
    ],
)
def test_parse_url_refuses(url: str, reason: str) -> None:
    with pytest.raises(InvalidTarget, match=reason):
        parse_url(url)


def test_package_exports_are_complete() -> None:
    public = {name for name in vars(broker.egress) if not name.startswith("_")}
    modules = {"addresses", "errors", "hosts", "policy", "http", "tcp"}
    assert public - modules == set(broker.egress.__all__)
