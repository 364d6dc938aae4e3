"""Verification endpoints of known providers, as data: what to call and how to read the answer.

`broker.testers.http` interprets these. An API key provider's endpoint is a path under a
base URL (the connection's `base_url` overrides `default_base`, so tests and proxies can
aim it elsewhere); an OAuth2 provider's endpoint is a full user-info URL from the provider
table in `broker.catalog.oauth_providers` (the connection's `verify_url` overrides it).
Each endpoint is the cheapest read-only call that proves the credential: a model list,
the current user, or an auth test.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from broker.catalog.oauth_providers import PROVIDERS as OAUTH_PROVIDERS
from broker.catalog.oauth_providers import OAuthProvider


class Reading(enum.Enum):
    """How success is read from an answer."""

    STATUS = "status"  # any 2xx is success
    SLACK_OK = "slack_ok"  # HTTP 200 with a JSON body whose "ok" is true; Slack errors travel in 200s


class KeyStyle(enum.Enum):
    """How the credential is sent."""

    BEARER = "bearer"  # Authorization: Bearer <key>
    HEADER = "header"  # <key_header>: <key>


@dataclass(frozen=True)
class Endpoint:
    """One verification call. `url` is a path for API key providers and a full URL for OAuth2."""

    method: str
    url: str
    operation: str
    key_style: KeyStyle = KeyStyle.BEARER
    key_header: str = "Authorization"
    headers: Mapping[str, str] = field(default_factory=dict)
    reading: Reading = Reading.STATUS
    # JSON fields of a successful answer copied into the result's details (account names, never tokens).
    identity: tuple[str, ...] = ()
    # (status, marker): an answer with this status whose body contains the marker means a bad key;
    # Google answers 400 API_KEY_INVALID rather than 401.
    bad_key_answer: tuple[int, str] | None = None


@dataclass(frozen=True)
class ApiKeyProvider:
    """An API key provider: its default base URL and its verification endpoint under it."""

    default_base: str
    endpoint: Endpoint


_GITHUB_HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}

API_KEY_PROVIDERS: Mapping[str, ApiKeyProvider] = {
    "openai": ApiKeyProvider("https://api.openai.com", Endpoint("GET", "/v1/models", "list models")),
    "anthropic": ApiKeyProvider(
        "https://api.anthropic.com",
        Endpoint(
            "GET",
            "/v1/models",
            "list models",
            key_style=KeyStyle.HEADER,
            key_header="x-api-key",
            headers={"anthropic-version": "2023-06-01"},
        ),
    ),
    "google_ai": ApiKeyProvider(
        "https://generativelanguage.googleapis.com",
        Endpoint(
            "GET",
            "/v1beta/models",
            "list models",
            key_style=KeyStyle.HEADER,
            key_header="x-goog-api-key",
            bad_key_answer=(400, "API_KEY_INVALID"),
        ),
    ),
    "github": ApiKeyProvider(
        "https://api.github.com",
        Endpoint("GET", "/user", "read the current user", headers=_GITHUB_HEADERS, identity=("login",)),
    ),
    "slack": ApiKeyProvider(
        "https://slack.com",
        Endpoint("POST", "/api/auth.test", "auth.test", reading=Reading.SLACK_OK, identity=("team", "user")),
    ),
    "mistral": ApiKeyProvider("https://api.mistral.ai", Endpoint("GET", "/v1/models", "list models")),
    "cohere": ApiKeyProvider("https://api.cohere.com", Endpoint("GET", "/v1/models", "list models")),
    "huggingface": ApiKeyProvider(
        "https://huggingface.co",
        Endpoint("GET", "/api/whoami-v2", "read the current user", identity=("name",)),
    ),
}

# How each OAuth2 provider's user-info answer reads (operation, success, identity fields).
# Where to call it, with which method and headers, comes from the one provider table.
_USERINFO_READING: Mapping[str, tuple[str, Reading, tuple[str, ...]]] = {
    "google": ("read user info", Reading.STATUS, ("email",)),
    "microsoft": ("read user info", Reading.STATUS, ("email", "name")),
    "github": ("read the current user", Reading.STATUS, ("login",)),
    "slack": ("auth.test", Reading.SLACK_OK, ("team", "user")),
    "notion": ("read the current user", Reading.STATUS, ("name", "type")),
    "atlassian": ("read the current user", Reading.STATUS, ("email", "name")),
    "dropbox": ("read the current account", Reading.STATUS, ("email",)),
}


def _userinfo(provider: OAuthProvider, url: str) -> Endpoint:
    operation, reading, identity = _USERINFO_READING.get(
        provider.name, ("read user info", Reading.STATUS, ())
    )
    return Endpoint(
        provider.userinfo_method,
        url,
        operation,
        headers=provider.userinfo_headers,
        reading=reading,
        identity=identity,
    )


OAUTH2_USERINFO: Mapping[str, Endpoint] = {
    name: _userinfo(provider, provider.userinfo_url)
    for name, provider in OAUTH_PROVIDERS.items()
    if provider.userinfo_url
}

# A provider without an entry (oauth2 `custom`) needs a `verify_url`; it is read by status alone.
CUSTOM_USERINFO = Endpoint("GET", "", "read the verification URL")

# Slack `error` codes that mean the token itself is bad, or lacks a scope.
SLACK_AUTH_ERRORS = frozenset(
    {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}
)
SLACK_PERMISSION_ERRORS = frozenset(
    {"missing_scope", "no_permission", "not_allowed_token_type", "ekm_access_denied"}
)
