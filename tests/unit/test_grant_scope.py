"""Proxy grants' scopes: what a scope lets through, and what a grant request may hold."""

from __future__ import annotations

import pytest

from broker.errors import InvalidArgument
from broker.model import GrantMode, GrantScope
from broker.service.access import checked_scope


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/repos", True),
        ("/repos/x", True),
        ("/repos/x/issues", True),
        ("/user", True),
        ("/reposx", False),  # a prefix is a whole segment
        ("/", False),
        ("/admin", False),
        ("/repos/../admin", False),  # dot segments could leave the prefix at the upstream
        ("/repos/./x", False),
        ("/repos/..", False),
        ("/repos/%2e%2e/admin", False),
        ("/repos/%2E%2E/admin", False),
        ("/repos%2fadmin", False),
        ("/repos/x%5c..%5cadmin", False),
        ("/repos\\..\\admin", False),
        ("/repos/file..txt", True),  # dots inside a segment are fine
        ("/repos/..;/admin", False),  # Tomcat and Spring drop `;params`, then resolve the `..`
        ("/repos/..;jsessionid=1/admin", False),
        ("/repos/.;/x", False),
        ("/repos/..%3b/admin", False),  # the `;` encoded: decoded, then dropped with its params
        ("/repos/..%3Bjsessionid=1/admin", False),
        ("/repos/.%3b/x", False),
        ("/repos/..%3b", False),
        ("/repos/..%253b/admin", False),  # and double encoded
        ("/repos/x%3bv=1", True),  # an encoded `;` on an ordinary segment is fine
        ("/repos/x;v=1", True),  # a parameter on an ordinary segment is fine
        ("/repos/%252e%252e/admin", False),  # double encoded, for a server that decodes twice
        ("/repos/%252F..", False),
        ("/repos/%25252e%25252e", False),
        ("/repos/100%25", True),  # a percent sign itself is fine
        # What older or lenient decoders read as a dot or a slash, and control characters.
        ("/repos/%u002e%u002e/admin", False),  # IIS
        ("/repos/%U002E%u002F", False),
        ("/repos/%c0%ae%c0%ae/admin", False),  # overlong UTF-8
        ("/repos/%C0%AF", False),
        ("/repos/%c1%9c", False),
        ("/repos/%e0%80%ae", False),
        ("/repos/%ef%bc%8e%ef%bc%8e/admin", False),  # full-width dots, normalised to ".."
        ("/repos/x%EF%BC%8Fadmin", False),  # a full-width solidus
        ("/repos/x%00/../admin", False),  # NUL ends the path in C-based servers
        ("/repos/.%09./admin", False),  # a tab some servers drop
        ("/repos/x%1f", False),
        ("/repos/x%7f", False),
        ("/repos/%25c0%25ae%25c0%25ae/admin", False),  # each double encoded
        ("/repos/%25u002e", False),
        ("/repos/%2500", False),
        ("/repos/%25ef%25bc%258e", False),
        ("/repos/%e2%82%ac", True),  # other UTF-8 is fine
        ("/repos/caf%c3%a9", True),
        ("/repos/a%20b", True),  # so is an encoded space
    ],
)
def test_path_prefixes_match_whole_segments_and_never_ambiguous_paths(path: str, allowed: bool) -> None:
    assert GrantScope(path_prefixes=("/repos", "/user")).allows_request("GET", path) is allowed


def test_a_prefix_ending_in_a_slash_matches_only_below_it() -> None:
    scope = GrantScope(path_prefixes=("/v1/",))
    assert scope.allows_request("GET", "/v1/models")
    assert not scope.allows_request("GET", "/v1")
    assert not scope.allows_request("GET", "/v10/models")


def test_methods_and_tools() -> None:
    scope = GrantScope(methods=("GET", "HEAD"))
    assert scope.allows_request("get", "/anything/../at/all")  # no path prefixes: any path
    assert not scope.allows_request("POST", "/x")
    assert GrantScope(tools=("search",)).allows_tool("search")
    assert not GrantScope(tools=("search",)).allows_tool("delete_everything")
    assert GrantScope().allows_tool("anything") and GrantScope().allows_request("DELETE", "/x")
    assert not GrantScope() and GrantScope(tools=("a",))


def test_a_scope_is_normalised() -> None:
    scope = GrantScope(methods=("post", "GET", "get"), path_prefixes=("/b", "/a", "/b"))
    assert checked_scope("http", GrantMode.PROXY, scope) == GrantScope(("GET", "POST"), ("/a", "/b"), ())
    assert checked_scope("mcp", GrantMode.PROXY, GrantScope(tools=("b", "a"))).tools == ("a", "b")
    assert checked_scope("database", GrantMode.RESOLVE, GrantScope()) == GrantScope()


def violations(connection_type: str, mode: GrantMode, scope: GrantScope) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        checked_scope(connection_type, mode, scope)
    return {v.field: v.description for v in caught.value.violations}


def test_what_a_grant_request_may_not_hold() -> None:
    assert "cannot be used through the proxy" in violations("database", GrantMode.PROXY, GrantScope())["mode"]
    assert "PROXY" in violations("http", GrantMode.RESOLVE, GrantScope(methods=("GET",)))["scope"]
    assert "scope.tools" in violations("http", GrantMode.PROXY, GrantScope(tools=("x",)))
    assert "scope" in violations("mcp", GrantMode.PROXY, GrantScope(path_prefixes=("/x",)))
    assert (
        "at most 32"
        in violations("http", GrantMode.PROXY, GrantScope(path_prefixes=tuple(f"/{i}" for i in range(33))))[
            "scope.path_prefixes"
        ]
    )
    bad = violations(
        "api_key",
        GrantMode.PROXY,
        GrantScope(
            methods=("GET", "TRACE"), path_prefixes=("/ok", "relative", "/a b", "/x/../y", "/q?x=1", "/é")
        ),
    )
    assert set(bad) == {
        "scope.methods[1]",
        "scope.path_prefixes[1]",
        "scope.path_prefixes[2]",
        "scope.path_prefixes[3]",
        "scope.path_prefixes[4]",
        "scope.path_prefixes[5]",
    }
    assert set(violations("mcp", GrantMode.PROXY, GrantScope(tools=("ok", "", "two words")))) == {
        "scope.tools[1]",
        "scope.tools[2]",
    }
