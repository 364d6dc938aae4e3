"""The `WWW-Authenticate` parser of `oauth connect --mcp-server` (RFC 9110 11.6.1), hostile inputs too."""

from __future__ import annotations

import contextlib
import time

import pytest

from broker.cli._www_authenticate import (
    MAX_HEADER,
    MAX_ITEMS,
    Challenge,
    ChallengeError,
    bearer_params,
    parse_challenges,
)

PRM = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp"


def test_the_mcp_spec_example() -> None:
    header = f'Bearer resource_metadata="{PRM}", scope="files:read files:write"'
    assert bearer_params(header) == {"resource_metadata": PRM, "scope": "files:read files:write"}


def test_several_challenges_in_one_header_and_the_bearer_one_is_taken() -> None:
    header = (
        'Basic realm="simple", Newauth realm="apps", type=1, title="Login to \\"apps\\"", '
        f'Bearer realm=example, error="invalid_token", resource_metadata="{PRM}", DPoP algs="ES256"'
    )
    challenges = parse_challenges(header)
    assert [c.scheme for c in challenges] == ["basic", "newauth", "bearer", "dpop"]
    assert challenges[1].params == {"realm": "apps", "type": "1", "title": 'Login to "apps"'}
    assert bearer_params(header) == {"realm": "example", "error": "invalid_token", "resource_metadata": PRM}


def test_schemes_and_names_are_case_insensitive_values_are_not() -> None:
    assert parse_challenges('BEARER Resource_Metadata="A", SCOPE=B') == [
        Challenge("bearer", {"resource_metadata": "A", "scope": "B"})
    ]


def test_token68_and_bare_schemes() -> None:
    assert parse_challenges("Bearer a=") == [Challenge("bearer", token68="a=")]
    assert parse_challenges("Basic YWxhZGRpbjpvcGVuc2VzYW1l==, Negotiate, Bearer") == [
        Challenge("basic", token68="YWxhZGRpbjpvcGVuc2VzYW1l=="),
        Challenge("negotiate"),
        Challenge("bearer"),
    ]
    assert bearer_params("Bearer") == {} and bearer_params('Basic realm="x"') == {}


def test_whitespace_and_empty_list_elements_are_allowed_where_rfc_9110_allows_them() -> None:
    header = ' ,  Bearer  realm = "x" ,, scope=a , , Basic realm="y",'
    assert parse_challenges(header) == [
        Challenge("bearer", {"realm": "x", "scope": "a"}),
        Challenge("basic", {"realm": "y"}),
    ]


def test_escapes_in_quoted_strings() -> None:
    params = bearer_params(r'Bearer a="\\", b="\"", c="x\yz", d=""')
    assert params == {"a": "\\", "b": '"', "c": "xyz", "d": ""}


@pytest.mark.parametrize(
    "header",
    [
        'Bearer resource_metadata="https://x',  # unbalanced quote
        'Bearer a="x\\"',  # the closing quote is escaped
        'Bearer a="x" b="y"',  # no comma between parameters
        "Bearer realm=x, scope=",  # no value (alone, `a=` would be a token68)
        "Bearer a==b",
        'Bearer a="x", a="y"',  # a parameter twice (RFC 9110 11.2)
        'Bearer"x"',
        "=x",
        'Bearer a="line\nbreak"',
        'Bearer a="nul\x00"',
        "Bearer a=b\r\nSet-Cookie: x=y",
        'Bearer a="\u2603"',  # not obs-text: beyond latin-1
    ],
)
def test_malformed_headers_are_refused(header: str) -> None:
    with pytest.raises(ChallengeError):
        parse_challenges(header)


def test_many_parameters_are_refused_beyond_the_limit() -> None:
    within = "Bearer " + ", ".join(f"p{i}=v" for i in range(MAX_ITEMS - 1))
    assert len(bearer_params(within)) == MAX_ITEMS - 1
    beyond = "Bearer " + ", ".join(f"p{i}=v" for i in range(MAX_ITEMS + 1))
    with pytest.raises(ChallengeError, match="more than"):
        parse_challenges(beyond)
    with pytest.raises(ChallengeError, match="more than"):
        parse_challenges(", ".join(["Negotiate"] * (MAX_ITEMS + 1)))


def test_a_huge_header_is_refused_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(ChallengeError, match="longer than"):
        parse_challenges("Bearer a=" + "x" * (10 * MAX_HEADER))
    # Just under the limit, the worst shapes parse or fail in linear time.
    for header in (
        'Bearer a="' + "\\x" * (MAX_HEADER // 2 - 10),  # an unterminated quote full of escapes
        "Bearer " + "a" * (MAX_HEADER - 20) + "=b",  # a long name
        "Basic " + "A" * (MAX_HEADER - 20) + "=x",  # looks like token68 until the end
        "Bearer a=b," + " ," * (MAX_HEADER // 2 - 10),  # empty list elements
    ):
        with contextlib.suppress(ChallengeError):
            parse_challenges(header)
    assert time.monotonic() - start < 2.0
