"""OAuth2 providers as data: the one table the catalog, the OAuth2 client and the testers read.

Endpoints change rarely but do change; each entry follows the provider's own documentation.
A provider whose revocation endpoint is not RFC 7009 (a bearer call, a JSON body) has
`revocation_url=None`: revoking there needs code of its own, not a wrong standard call.
Token requests are form-encoded with `Accept: application/json` (GitHub answers form data
otherwise; Notion and Atlassian document JSON bodies but accept forms).
"""

# "token" in a field name is not a password: token_url, token_auth_method are endpoint data.
# ruff: noqa: S105, S106

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

TokenAuthMethod = Literal["client_secret_basic", "client_secret_post", "none"]
TOKEN_AUTH_METHODS: tuple[TokenAuthMethod, ...] = ("client_secret_basic", "client_secret_post", "none")
# What the authorization flow sets itself (RFC 6749 4.1.1, RFC 7636 4.3, RFC 8707 2.1 from the
# connection's typed `resource`, which the token requests must repeat), and the secrets it must
# never put in a URL: a provider's or a connection's extra authorization parameters never replace
# or add these.
FLOW_PARAMS = frozenset(
    {
        "response_type",
        "resource",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
        "client_secret",
        "code_verifier",
    }
)


def flow_params_in(url: str) -> list[str]:
    """The flow's own parameters an endpoint URL's query already sets, sorted.

    The flow adds them after the endpoint's query: a second copy (which many servers read first)
    would send the user, and the code, wherever the URL says.
    """
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    return sorted({name for name, _ in query if name.lower() in FLOW_PARAMS})


@dataclass(frozen=True)
class OAuthProvider:
    """One authorization server: where its endpoints are and how it wants to be spoken to.

    `rotates_refresh_tokens` is None when the provider does not document it (or it is an
    app setting); callers store a returned refresh token either way. `scope_separator`
    joins scopes in the authorization URL (Slack wants commas). `userinfo_method` and
    `userinfo_headers` say how to call `userinfo_url` with the access token.
    """

    name: str
    authorize_url: str
    token_url: str
    revocation_url: str | None = None
    userinfo_url: str | None = None
    default_scopes: tuple[str, ...] = ()
    pkce_required: bool = False
    token_auth_method: TokenAuthMethod = "client_secret_basic"
    extra_authorize_params: Mapping[str, str] = field(default_factory=dict)
    rotates_refresh_tokens: bool | None = None
    scope_separator: str = " "
    userinfo_method: str = "GET"
    userinfo_headers: Mapping[str, str] = field(default_factory=dict)
    # Where proxied API calls go, when that is not the origin of `userinfo_url`.
    api_base_url: str | None = None
    # RFC 8707 resource indicators, from a connection's `resource`: sent on the authorization
    # request and on every token request (code, refresh, client credentials), so a refreshed
    # token keeps the audience the first one had.
    resources: tuple[str, ...] = ()


_GITHUB_HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}

_ENTRIES = (
    OAuthProvider(
        name="google",
        authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
        token_url="https://oauth2.googleapis.com/token",
        revocation_url="https://oauth2.googleapis.com/revoke",
        userinfo_url="https://openidconnect.googleapis.com/v1/userinfo",
        default_scopes=("openid", "email", "profile"),
        token_auth_method="client_secret_post",
        # Without offline access there is no refresh token; without consent a second
        # authorization of the same app returns none either.
        extra_authorize_params={"access_type": "offline", "prompt": "consent"},
        rotates_refresh_tokens=False,
        api_base_url="https://www.googleapis.com",
    ),
    # The `common` tenant serves multi-tenant apps; a single-tenant app overrides the URLs.
    # Microsoft has no RFC 7009 endpoint (sign-out revokes sessions, not one token).
    OAuthProvider(
        name="microsoft",
        authorize_url="https://login.microsoftonline.com/common/oauth2/v2.0/authorize",
        token_url="https://login.microsoftonline.com/common/oauth2/v2.0/token",
        userinfo_url="https://graph.microsoft.com/oidc/userinfo",
        # offline_access is what yields a refresh token.
        default_scopes=("openid", "email", "profile", "offline_access"),
        token_auth_method="client_secret_post",
        rotates_refresh_tokens=True,
    ),
    # GitHub App user tokens expire and their refresh tokens rotate; OAuth App tokens never
    # expire (no expires_in, no refresh token). Revocation is a non-standard DELETE.
    OAuthProvider(
        name="github",
        authorize_url="https://github.com/login/oauth/authorize",
        token_url="https://github.com/login/oauth/access_token",
        userinfo_url="https://api.github.com/user",
        default_scopes=("read:user",),
        token_auth_method="client_secret_post",
        rotates_refresh_tokens=True,
        userinfo_headers=_GITHUB_HEADERS,
    ),
    # Slack: comma-separated scopes, errors in HTTP 200 bodies ({"ok": false}); refresh
    # tokens exist (and rotate) only with token rotation turned on for the app. auth.revoke
    # is a bearer call, not RFC 7009.
    OAuthProvider(
        name="slack",
        authorize_url="https://slack.com/oauth/v2/authorize",
        token_url="https://slack.com/api/oauth.v2.access",
        userinfo_url="https://slack.com/api/auth.test",
        token_auth_method="client_secret_post",
        rotates_refresh_tokens=True,
        scope_separator=",",
        userinfo_method="POST",
    ),
    # Notion has no scopes; `owner=user` is required. Its tokens have not expired so far.
    OAuthProvider(
        name="notion",
        authorize_url="https://api.notion.com/v1/oauth/authorize",
        token_url="https://api.notion.com/v1/oauth/token",
        userinfo_url="https://api.notion.com/v1/users/me",
        token_auth_method="client_secret_basic",
        extra_authorize_params={"owner": "user"},
        userinfo_headers={"Notion-Version": "2022-06-28"},
    ),
    # Atlassian (Jira, Confluence): rotating refresh tokens, offline_access for one at all.
    OAuthProvider(
        name="atlassian",
        authorize_url="https://auth.atlassian.com/authorize",
        token_url="https://auth.atlassian.com/oauth/token",
        userinfo_url="https://api.atlassian.com/me",
        default_scopes=("read:me", "offline_access"),
        token_auth_method="client_secret_post",
        extra_authorize_params={"audience": "api.atlassian.com", "prompt": "consent"},
        rotates_refresh_tokens=True,
    ),
    # Dropbox: short-lived access tokens; `token_access_type=offline` yields a long-lived,
    # non-rotating refresh token. Scopes are set on the app. Revocation is a bearer call.
    OAuthProvider(
        name="dropbox",
        authorize_url="https://www.dropbox.com/oauth2/authorize",
        token_url="https://api.dropboxapi.com/oauth2/token",
        userinfo_url="https://api.dropboxapi.com/2/users/get_current_account",
        token_auth_method="client_secret_basic",
        extra_authorize_params={"token_access_type": "offline"},
        rotates_refresh_tokens=False,
        userinfo_method="POST",
    ),
)

PROVIDERS: Mapping[str, OAuthProvider] = MappingProxyType({p.name: p for p in _ENTRIES})
