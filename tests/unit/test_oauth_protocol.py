"""`broker.oauth` without sockets: PKCE, state, authorization URLs, providers, expiry, error reading."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

import broker.oauth
from broker import oauth
from broker.catalog import get_type, validate
from broker.catalog.oauth_providers import PROVIDERS, TOKEN_AUTH_METHODS
from broker.oauth import _token

NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
HOUR = timedelta(hours=1)
# RFC 7636 appendix B.
RFC7636_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
RFC7636_CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
RFC7636_OCTETS = [116, 24, 223, 180, 151, 153, 224, 37, 79, 250, 96, 125, 216, 173, 187, 186]
RFC7636_OCTETS += [22, 212, 37, 77, 105, 214, 191, 240, 91, 88, 5, 88, 83, 132, 141, 121]


def test_all_is_complete() -> None:
    public = {n for n in dir(broker.oauth) if not n.startswith("_")}
    assert set(broker.oauth.__all__) == public - {"annotations"}


# ------------------------------------------------------------------ state and PKCE


def test_new_state_is_long_and_url_safe() -> None:
    states = {oauth.new_state() for _ in range(100)}
    assert len(states) == 100
    for state in states:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", state)
        assert len(base64.urlsafe_b64decode(state + "=" * (-len(state) % 4))) >= 32


def test_new_pkce_matches_rfc7636_appendix_b(monkeypatch: pytest.MonkeyPatch) -> None:
    # The appendix's 32 random octets, base64url-encoded, are its verifier.
    assert base64.urlsafe_b64encode(bytes(RFC7636_OCTETS)).rstrip(b"=").decode() == RFC7636_VERIFIER
    monkeypatch.setattr("broker.oauth._authorize.secrets.token_urlsafe", lambda n: RFC7636_VERIFIER)
    assert oauth.new_pkce() == (RFC7636_VERIFIER, RFC7636_CHALLENGE)


def test_new_pkce_lengths_and_challenge() -> None:
    pairs = {oauth.new_pkce() for _ in range(50)}
    assert len(pairs) == 50
    for verifier, challenge in pairs:
        assert re.fullmatch(r"[A-Za-z0-9._~-]{43,128}", verifier)
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        assert challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# ------------------------------------------------------------------ authorization URL


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def test_authorization_url_for_google() -> None:
    google = oauth.provider_for("google", {})
    url = oauth.authorization_url(
        google, "cid", "https://app.example.com/cb", google.default_scopes, "the-state", "the-challenge"
    )
    assert url.startswith("https://accounts.google.com/o/oauth2/v2/auth?")
    assert query(url) == {
        "response_type": ["code"],
        "client_id": ["cid"],
        "redirect_uri": ["https://app.example.com/cb"],
        "scope": ["openid email profile"],
        "state": ["the-state"],
        "code_challenge": ["the-challenge"],
        "code_challenge_method": ["S256"],
        "access_type": ["offline"],
        "prompt": ["consent"],
    }


def test_authorization_url_slack_joins_scopes_with_commas() -> None:
    url = oauth.authorization_url(
        oauth.provider_for("slack", {}), "cid", "https://a/cb", ["chat:write", "channels:read"], "s", "c"
    )
    assert query(url)["scope"] == ["chat:write,channels:read"]


def test_authorization_url_keeps_the_endpoint_query_and_omits_empty_scopes() -> None:
    custom = oauth.provider_for(
        "custom", {"authorize_url": "https://id.example.com/auth?tenant=t1", "token_url": "https://t/x"}
    )
    url = oauth.authorization_url(custom, "cid", "https://a/cb", [], "s", "c")
    found = query(url)
    assert found["tenant"] == ["t1"]
    assert "scope" not in found


def test_extra_params_cannot_replace_the_flows_own() -> None:
    hostile = oauth.OAuthProvider(
        name="x",
        authorize_url="https://id.example.com/auth",
        token_url="https://id.example.com/token",
        extra_authorize_params={"code_challenge_method": "plain", "state": "fixed", "owner": "user"},
    )
    found = query(oauth.authorization_url(hostile, "cid", "https://a/cb", [], "mine", "c"))
    assert found["code_challenge_method"] == ["S256"]
    assert found["state"] == ["mine"]
    assert found["owner"] == ["user"]


def test_each_resource_indicator_is_its_own_parameter_and_extra_params_cannot_add_one() -> None:
    """RFC 8707 section 2: repeated `resource` parameters; only the typed field sets them."""
    custom = oauth.provider_for(
        "custom",
        {
            "authorize_url": "https://id.example.com/auth",
            "token_url": "https://t/x",
            "resource": ["https://mcp.example.com/mcp", "urn:example:api"],
        },
    )
    hostile = replace(custom, extra_authorize_params={"Resource": "https://evil.example.com"})
    found = query(oauth.authorization_url(hostile, "cid", "https://a/cb", [], "s", "c"))
    assert found["resource"] == ["https://mcp.example.com/mcp", "urn:example:api"]
    assert "Resource" not in found


def test_a_resource_saved_among_the_authorize_params_becomes_the_connections_resource() -> None:
    """Saved before `resource` was a field: it was meant as the audience, so every token request
    carries it from now on (the catalog refuses it among authorize_params for new writes)."""
    legacy = {"token_url": "https://t/x", "authorize_params": {"resource": "https://api.example.com"}}
    assert oauth.provider_for("custom", legacy).resources == ("https://api.example.com",)
    typed = {**legacy, "resource": ["https://mcp.example.com"]}
    assert oauth.provider_for("custom", typed).resources == ("https://mcp.example.com",)


def test_authorization_url_needs_an_endpoint() -> None:
    custom = oauth.provider_for("custom", {"token_url": "https://t/x"})
    with pytest.raises(oauth.OAuthError) as caught:
        oauth.authorization_url(custom, "cid", "https://a/cb", [], "s", "c")
    assert caught.value.kind == "invalid_config"


# ------------------------------------------------------------------ providers


def test_provider_table_drives_the_catalog() -> None:
    assert {"google", "microsoft", "github", "slack", "notion", "atlassian", "dropbox"} == set(PROVIDERS)
    assert set(get_type("oauth2").providers) == {*PROVIDERS, "custom"}
    for name, entry in PROVIDERS.items():
        assert entry.name == name
        assert entry.token_auth_method in TOKEN_AUTH_METHODS
        assert entry.authorize_url.startswith("https://") and entry.token_url.startswith("https://")
        config = validate("oauth2", name, {"client_id": "c"}, {}).config
        assert config["authorize_url"] == entry.authorize_url
        assert config["token_url"] == entry.token_url
        assert config["token_auth_method"] == entry.token_auth_method
        assert config.get("revocation_url") == entry.revocation_url


def test_custom_oauth2_defaults_to_client_secret_basic() -> None:
    config = validate(
        "oauth2",
        "custom",
        {"client_id": "c", "grant_type": "client_credentials", "token_url": "https://t/x"},
        {},
    ).config
    assert config["token_auth_method"] == "client_secret_basic"
    assert "revocation_url" not in config


def test_tester_user_info_reads_the_provider_table() -> None:
    from broker.testers.providers import OAUTH2_USERINFO

    assert set(OAUTH2_USERINFO) == {n for n, p in PROVIDERS.items() if p.userinfo_url}
    for name, endpoint in OAUTH2_USERINFO.items():
        assert endpoint.url == PROVIDERS[name].userinfo_url
        assert endpoint.method == PROVIDERS[name].userinfo_method
        assert dict(endpoint.headers) == dict(PROVIDERS[name].userinfo_headers)
    assert OAUTH2_USERINFO["notion"].headers["Notion-Version"]


def test_provider_for_applies_the_connections_config() -> None:
    config = validate(
        "oauth2",
        "microsoft",
        {
            "client_id": "c",
            "token_url": "https://login.microsoftonline.com/contoso/oauth2/v2.0/token",
            "scopes": ["User.Read"],
            "verify_url": "https://graph.microsoft.com/v1.0/me",
        },
        {},
    ).config
    found = oauth.provider_for("microsoft", config)
    assert found.token_url == "https://login.microsoftonline.com/contoso/oauth2/v2.0/token"
    assert found.authorize_url == PROVIDERS["microsoft"].authorize_url
    assert found.default_scopes == ("User.Read",)
    assert found.userinfo_url == "https://graph.microsoft.com/v1.0/me"
    assert found.token_auth_method == "client_secret_post"


def test_provider_for_custom_takes_everything_from_config() -> None:
    found = oauth.provider_for(
        "custom",
        {
            "authorize_url": "https://id.example.com/a",
            "token_url": "https://id.example.com/t",
            "revocation_url": "https://id.example.com/r",
            "token_auth_method": "client_secret_post",
        },
    )
    assert (found.name, found.authorize_url, found.token_url, found.revocation_url) == (
        "custom",
        "https://id.example.com/a",
        "https://id.example.com/t",
        "https://id.example.com/r",
    )
    assert found.token_auth_method == "client_secret_post"
    assert found.extra_authorize_params == {}


@pytest.mark.parametrize(
    ("name", "config"),
    [("custom", {}), ("nope", {"token_url": "https://t/x"}), ("google", {"token_auth_method": "magic"})],
)
def test_provider_for_refuses_what_it_cannot_use(name: str, config: dict[str, Any]) -> None:
    with pytest.raises(oauth.OAuthError) as caught:
        oauth.provider_for(name, config)
    assert caught.value.kind == "invalid_config"


# ------------------------------------------------------------------ expiry


def jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part(claims)}.c2lnbmF0dXJl"


@pytest.mark.parametrize("expires_in", [3600, "3600", 3600.0, " 3600 "])
def test_expiry_from_expires_in(expires_in: object) -> None:
    assert oauth.infer_expiry("opaque", expires_in, NOW, HOUR * 5) == (NOW + HOUR, "expires_in")


def test_expires_in_wins_over_the_jwt() -> None:
    token = jwt({"exp": int((NOW + HOUR * 2).timestamp())})
    assert oauth.infer_expiry(token, 60, NOW, HOUR) == (NOW + timedelta(seconds=60), "expires_in")


def test_huge_expires_in_is_capped() -> None:
    when, source = oauth.infer_expiry("opaque", 10**12, NOW, HOUR)
    assert (when, source) == (NOW + timedelta(days=365), "expires_in")


def test_expiry_from_the_jwt_exp() -> None:
    exp = int((NOW + timedelta(minutes=30)).timestamp())
    assert oauth.infer_expiry(jwt({"exp": exp, "sub": "u"}), None, NOW, HOUR) == (
        datetime.fromtimestamp(exp, UTC),
        "jwt",
    )


@pytest.mark.parametrize("expires_in", [None, 0, -5, "soon", True, float("nan"), float("inf"), [], {}])
@pytest.mark.parametrize(
    "token",
    [
        "opaque-token",
        "a.b.c",
        "a.b",
        jwt({"sub": "no exp"}),
        jwt({"exp": "tomorrow"}),
        jwt({"exp": True}),
        jwt({"exp": int((NOW - HOUR).timestamp())}),  # already past: not believed
        jwt({"exp": 10**20}),  # absurd: not believed (and no OverflowError)
        "x." + base64.urlsafe_b64encode(b"[1, 2]").decode() + ".y",
    ],
)
def test_expiry_falls_back_to_the_default(token: str, expires_in: object) -> None:
    assert oauth.infer_expiry(token, expires_in, NOW, timedelta(minutes=7)) == (
        NOW + timedelta(minutes=7),
        "default",
    )


def test_expiry_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        oauth.infer_expiry("t", 60, datetime(2030, 1, 1), HOUR)


# ------------------------------------------------------------------ reading answers


def answer(status: int, body: object = None, headers: dict[str, str] | None = None) -> httpx.Response:
    # An answer to a refresh, as the client gets it: the request it answers is attached.
    sent = httpx.Request(
        "POST", "https://idp.example/token", content=b"grant_type=refresh_token&refresh_token=rt"
    )
    if body is None:
        return httpx.Response(status, headers=headers, request=sent)
    if isinstance(body, str):
        return httpx.Response(status, text=body, headers=headers, request=sent)
    return httpx.Response(status, json=body, headers=headers, request=sent)


@pytest.mark.parametrize(
    ("status", "body", "kind", "error"),
    [
        (
            400,
            {"error": "invalid_grant", "error_description": "token rt-SECRET is revoked"},
            "invalid_grant",
            "invalid_grant",
        ),
        # The client asked for scopes it may not have (the broker sends none on refresh): its
        # configuration, which signing in again would not change.
        (400, {"error": "invalid_scope"}, "invalid_config", "invalid_scope"),
        (400, {"error": "invalid_request"}, "invalid_config", "invalid_request"),
        (400, "<html>bad</html>", "invalid_grant", None),
        (401, None, "invalid_grant", None),
        (401, {"error": "invalid_client"}, "invalid_config", "invalid_client"),
        (400, {"error": "unauthorized_client"}, "invalid_config", "unauthorized_client"),
        (200, {"error": "bad_verification_code"}, "invalid_grant", "bad_verification_code"),  # GitHub
        (200, {"error": "incorrect_client_credentials"}, "invalid_config", "incorrect_client_credentials"),
        (
            200,
            {"ok": False, "error": "invalid_refresh_token"},
            "invalid_grant",
            "invalid_refresh_token",
        ),  # Slack
        (200, {"ok": False, "error": "ratelimited"}, "transient", "ratelimited"),
        (200, "not json", "invalid_config", None),
        (400, {"error": "rt-SECRET has spaces"}, "invalid_grant", None),  # not a code: not repeated
        (400, {"error": "x" * 65}, "invalid_grant", None),
        (500, {"error": "server_error"}, "transient", "server_error"),
        (502, "<html>bad gateway</html>", "transient", None),
        (503, None, "transient", None),
        (429, None, "transient", None),
        (408, None, "transient", None),
        (404, None, "invalid_config", None),
        (403, "<html>forbidden</html>", "invalid_config", None),
        (302, None, "invalid_config", None),
    ],
)
def test_answers_are_classified(status: int, body: object, kind: str, error: str | None) -> None:
    response = answer(status, body)
    found = _token._failure(response, _token._document(response), "token endpoint", NOW)
    assert (found.kind, found.error, found.status) == (kind, error, status)
    assert "SECRET" not in str(found) and "SECRET" not in repr(found)


def test_retry_after_as_seconds_or_a_date() -> None:
    seconds = answer(503, None, {"Retry-After": "30"})
    assert _token._failure(seconds, None, "token endpoint", NOW).retry_after == 30.0
    date = answer(429, None, {"Retry-After": format_datetime(NOW + timedelta(seconds=90), usegmt=True)})
    assert _token._failure(date, None, "token endpoint", NOW).retry_after == 90.0
    past = answer(503, None, {"Retry-After": format_datetime(NOW - HOUR, usegmt=True)})
    assert _token._failure(past, None, "token endpoint", NOW).retry_after == 0.0
    for bad in ("soon", "-3", "1.5e9x"):
        assert _token._failure(answer(503, None, {"Retry-After": bad}), None, "t", NOW).retry_after is None


def test_form_encoded_token_answer() -> None:
    response = httpx.Response(
        200,
        content=b"access_token=at&scope=repo%2Cgist&token_type=bearer",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    document = _token._document(response)
    assert document is not None
    tokens = _token._token_set(document, NOW, HOUR, None)
    assert (tokens.access_token, tokens.scopes, tokens.token_type) == ("at", ("repo", "gist"), "bearer")
    assert (tokens.expires_at, tokens.expiry_source) == (NOW + HOUR, "default")


def test_a_token_type_the_broker_cannot_send_is_refused_and_never_quoted_unless_plain() -> None:
    assert _token._token_set({"access_token": "at"}, NOW, HOUR, None).token_type == "Bearer"
    for value, shown in (("mac", "'mac'"), ("at-SECRET value", "an unknown type"), (7, "an unknown type")):
        with pytest.raises(oauth.OAuthError) as caught:
            _token._token_set({"access_token": "at", "token_type": value}, NOW, HOUR, None)
        assert caught.value.kind == "invalid_config" and f"of type {shown};" in str(caught.value)


def test_answer_without_an_access_token_is_invalid_config() -> None:
    with pytest.raises(oauth.OAuthError) as caught:
        _token._token_set({"token_type": "Bearer"}, NOW, HOUR, None)
    assert caught.value.kind == "invalid_config"


# ------------------------------------------------------------------ masked values


def test_reprs_mask_secrets() -> None:
    tokens = oauth.TokenSet("at-SECRET", "rt-SECRET", NOW, ("a",), "Bearer", "expires_in", NOW)
    credentials = oauth.ClientCredentials("cid", "cs-SECRET")
    for text in (repr(tokens), str(tokens), repr(credentials), str(credentials)):
        assert "SECRET" not in text
    assert "access_token=<set>" in repr(tokens) and "refresh_token=<set>" in repr(tokens)
    assert "cid" in repr(credentials)
    no_refresh = oauth.TokenSet("at", None, NOW, (), "Bearer", "default", NOW)
    assert "refresh_token=<unset>" in repr(no_refresh)


def test_an_authorization_endpoint_saved_with_the_flows_own_parameters_is_never_used() -> None:
    """The catalog refuses such an endpoint now; a row saved before gets no URL with two redirect_uris."""
    saved = oauth.provider_for(
        "custom",
        {
            "authorize_url": "https://id.example.com/auth?REDIRECT_URI=https://evil.example/",
            "token_url": "https://t/x",
        },
    )
    with pytest.raises(oauth.OAuthError) as caught:
        oauth.authorization_url(saved, "cid", "https://a/cb", [], "s", "c")
    assert caught.value.kind == "invalid_config" and "REDIRECT_URI" in str(caught.value)
