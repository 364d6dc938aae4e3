"""`oauth connect --mcp-server` without sockets: which URLs it builds, compares and follows, and the
caps on what it reads (httpx's MockTransport stands in for servers)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from broker.cli import _discovery_http as h
from broker.cli import _mcp_oauth as m


def test_resource_metadata_urls_insert_the_well_known_part_before_the_path() -> None:
    assert m.resource_metadata_urls("https://mcp.example.com/mcp") == [
        "https://mcp.example.com/.well-known/oauth-protected-resource/mcp",
        "https://mcp.example.com/.well-known/oauth-protected-resource",
    ]
    assert m.resource_metadata_urls("https://mcp.example.com/a/b?x=1") == [
        "https://mcp.example.com/.well-known/oauth-protected-resource/a/b?x=1",
        "https://mcp.example.com/.well-known/oauth-protected-resource",
    ]
    for root in ("https://mcp.example.com", "https://mcp.example.com/"):
        assert m.resource_metadata_urls(root) == [
            "https://mcp.example.com/.well-known/oauth-protected-resource"
        ]


def test_authorization_server_metadata_urls_in_the_mcp_specs_order() -> None:
    assert m.authorization_server_metadata_urls("https://auth.example.com/tenant1/") == [
        "https://auth.example.com/.well-known/oauth-authorization-server/tenant1",
        "https://auth.example.com/.well-known/openid-configuration/tenant1",
        "https://auth.example.com/tenant1/.well-known/openid-configuration",
    ]
    assert m.authorization_server_metadata_urls("https://auth.example.com") == [
        "https://auth.example.com/.well-known/oauth-authorization-server",
        "https://auth.example.com/.well-known/openid-configuration",
    ]


def test_urls_are_compared_after_rfc_3986_normalisation_only() -> None:
    same = m.normalised("https://mcp.example.com/mcp")
    assert m.normalised("HTTPS://MCP.Example.COM:443/mcp") == same
    assert m.normalised("https://mcp.example.com") == m.normalised("https://mcp.example.com/")
    for other in (
        "https://mcp.example.com/mcp/",  # a trailing slash is another path
        "https://mcp.example.com/MCP",
        "https://mcp.example.com:8443/mcp",
        "http://mcp.example.com/mcp",
        "https://mcp.example.com/mcp?x=1",
    ):
        assert m.normalised(other) != same, other
    assert m.normalised("http://[::1]:80/x") == "http://[::1]/x"


@pytest.mark.parametrize(
    "url",
    [
        "http://mcp.example.com/mcp",
        "http://127.0.0.2/mcp",  # loopback, but not one of the three names
        "ftp://127.0.0.1/x",
        "https:///nohost",
        "https://user:pw@mcp.example.com/",
        "https://mcp.example.com/#frag",
        "https://mcp.example.com/a b",
        "https://mcp.example.com:99999/",
        "https://[::1/",
        "https://mcp.exämple.com/",
        "",
    ],
)
def test_urls_that_are_not_followed(url: str) -> None:
    with pytest.raises(h.DiscoveryError):
        h.check_url(url, "x")


@pytest.mark.parametrize(
    "url", ["https://a.example/x", "http://127.0.0.1:8/x", "http://[::1]:8/", "http://localhost/"]
)
def test_urls_that_are_followed(url: str) -> None:
    assert h.check_url(url, "x") == url


def test_the_token_endpoint_auth_method() -> None:
    assert m.auth_method(None) == "client_secret_basic"  # RFC 8414's default
    assert (
        m.auth_method(("private_key_jwt", "client_secret_post", "client_secret_basic"))
        == "client_secret_basic"
    )
    assert m.auth_method(("client_secret_post", "none")) == "client_secret_post"
    assert m.auth_method(("none",)) == "none"
    assert m.auth_method(("client_secret_basic",), has_secret=False) == "none"
    with pytest.raises(h.DiscoveryError, match="private_key_jwt"):
        m.auth_method(("private_key_jwt",))


def _client(handler: httpx.MockTransport) -> httpx.Client:
    return httpx.Client(transport=handler, follow_redirects=False)


def test_a_body_beyond_the_cap_is_refused_even_without_a_length() -> None:
    def chunks() -> Iterator[bytes]:
        while True:
            yield b"x" * 4096

    client = _client(httpx.MockTransport(lambda request: httpx.Response(200, content=chunks())))
    with pytest.raises(h.DiscoveryError, match="larger than 64 KiB"):
        h.fetch(client, "GET", "https://a.example/x", "the metadata")


def test_a_declared_length_beyond_the_cap_is_refused_before_reading() -> None:
    response = httpx.Response(200, headers={"Content-Length": str(10**9)}, content=b"{}")
    client = _client(httpx.MockTransport(lambda request: response))
    with pytest.raises(h.DiscoveryError, match="larger than 64 KiB"):
        h.fetch(client, "GET", "https://a.example/x", "the metadata")


def test_a_compressed_answer_is_refused_and_identity_is_asked_for() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers["accept-encoding"])
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"\x1f\x8b")

    with pytest.raises(h.DiscoveryError, match="content coding"):
        h.fetch(_client(httpx.MockTransport(handler)), "GET", "https://a.example/x", "the metadata")
    assert asked == ["identity"]


def test_json_must_be_an_object_and_fields_typed() -> None:
    def answer(body: bytes) -> h.Answer:
        return h.Answer("https://a.example/x", 200, httpx.Headers(), body)

    for body in (b"", b"nope", b"\xff\xfe", b"[" * 100_000, b"[]", b"null", b'"s"'):
        with pytest.raises(h.DiscoveryError, match=r"not (a )?JSON"):
            h.json_object(answer(body), "the metadata")
    assert h.json_object(answer(b'{"a": 1}'), "the metadata") == {"a": 1}


def test_a_registered_client_never_shows_its_secret() -> None:
    client = m.Client("id-1", "client_secret_basic", "s3cret-value")
    assert "s3cret-value" not in repr(client)
    settings = m.Settings({"client_id": "id-1"}, {"client_secret": "s3cret-value"})
    assert "s3cret-value" not in repr(settings)


def test_shown_escapes_terminal_control_and_bounds_length() -> None:
    assert h.shown("a\x1b[31mb\n") == "a\\x1b[31mb\\n"
    assert len(h.shown("x" * 10_000)) == 203
