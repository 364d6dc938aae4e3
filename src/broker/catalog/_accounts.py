"""Connection types for accounts and API credentials: api_key, oauth2, aws, gcp, azure, custom.
Pure data; `_validate` interprets it.
"""

from __future__ import annotations

from broker.catalog import _values as v
from broker.catalog._spec import PROVIDER, ConnectionType, Default, FieldKind, FieldSpec, is_, require, secret
from broker.catalog.oauth_providers import PROVIDERS as OAUTH_PROVIDERS
from broker.catalog.oauth_providers import TOKEN_AUTH_METHODS

_GUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
_GUID_TEXT = "a GUID like 00000000-0000-0000-0000-000000000000"

API_KEY = ConnectionType(
    name="api_key",
    proxy="http",
    description="An API key for a hosted service; the provider names the service.",
    providers=(
        "openai",
        "anthropic",
        "google_ai",
        "github",
        "slack",
        "mistral",
        "cohere",
        "huggingface",
        "custom",
    ),
    fields=(
        secret("api_key", required=True, description="The API key."),
        secret("api_secret", description="A second secret, where the API has one."),
        FieldSpec(
            "base_url",
            FieldKind.URL,
            description="API base URL; required for provider custom.",
            destination=True,
        ),
    ),
    rules=(require("base_url", when=(is_(PROVIDER, "custom"),)),),
)

# Endpoint defaults come from the one provider table, so a caller only supplies them for
# `custom` (or to override, e.g. a single-tenant Microsoft app).
_OAUTH_DEFAULTS = tuple(
    Default(name, value, (is_(PROVIDER, provider.name),))
    for provider in OAUTH_PROVIDERS.values()
    for name, value in (
        ("authorize_url", provider.authorize_url),
        ("token_url", provider.token_url),
        ("revocation_url", provider.revocation_url),
        ("token_auth_method", provider.token_auth_method),
    )
    if value is not None
)

OAUTH2 = ConnectionType(
    name="oauth2",
    proxy="http",
    description="An OAuth2 client and, once authorised, its tokens; the provider names the service.",
    providers=(*OAUTH_PROVIDERS, "custom"),
    fields=(
        FieldSpec(
            "authorize_url",
            FieldKind.URL,
            destination=True,
            description="Authorization endpoint; known for named providers, required for custom. Its "
            "query may not set the flow's own parameters (redirect_uri, client_id, state, scope...).",
            check=v.authorization_endpoint,
        ),
        FieldSpec(
            "token_url",
            FieldKind.URL,
            destination=True,
            description="Token endpoint; known for named providers, required for custom.",
        ),
        FieldSpec(
            "revocation_url",
            FieldKind.URL,
            destination=True,
            description="RFC 7009 token revocation endpoint; known for named providers that have one.",
        ),
        FieldSpec(
            "token_auth_method",
            FieldKind.ENUM,
            default="client_secret_basic",
            choices=TOKEN_AUTH_METHODS,
            description="How the client authenticates at the token endpoint; known for named providers.",
        ),
        FieldSpec("client_id", FieldKind.STRING, required=True, description="OAuth2 client id."),
        # Public clients (PKCE, native apps) have no secret.
        # The broker's, to get and refresh tokens: an executor gets the access token only.
        secret("client_secret", description="Client secret; none for public clients.", withheld=True),
        FieldSpec(
            "scopes",
            FieldKind.STRING_LIST,
            description="Scopes to request; an authorization asked with other scopes stores those.",
            # RFC 6749 scope tokens: printable ASCII without space, quote or backslash.
            check=v.each(v.matching(r"[!#-\[\]-~]+", "a list of scope names without spaces")),
        ),
        FieldSpec(
            "issuer",
            FieldKind.STRING,
            description="The authorization server's issuer identifier (RFC 8414). When set, an "
            "authorization completes only if the redirect's iss parameter equals it (RFC 9207): set it "
            "for servers that send iss, and a response from another server cannot be passed off as theirs.",
            check=v.matching(r"https?://[!-~]{1,500}", "an http(s) URL, like https://idp.example.com"),
        ),
        FieldSpec(
            "granted_scopes",
            FieldKind.STRING_LIST,
            description="Scopes the provider granted with the current token, as its token response "
            "said (set by the broker; absent when the response did not say, which means as requested). "
            "`scopes` stays what is asked for.",
        ),
        FieldSpec(
            "authorize_params",
            FieldKind.STRING_MAP,
            description="Extra authorization request parameters, added to (or replacing) the provider's "
            "own: prompt=consent for an OpenID Connect provider to issue a refresh token for "
            "offline_access, audience for the API the tokens are for (resource is a field of its own).",
            check=v.authorize_params,
        ),
        FieldSpec(
            "resource",
            FieldKind.STRING_LIST,
            description="RFC 8707 resource indicators: the API or MCP server the tokens are for, by its "
            "canonical URI (like https://mcp.example.com/mcp). Sent on the authorization request and on "
            "every token request (code exchange, refresh, client credentials), so a refreshed token keeps "
            "its audience. Absolute URIs without a fragment, at most 16.",
            check=v.resource_indicators,
        ),
        FieldSpec(
            "verify_url",
            FieldKind.URL,
            destination=True,
            description="URL a connection test calls with the access token; defaults to the provider's "
            "user-info endpoint, required to test provider custom.",
        ),
        secret("access_token", description="Current access token."),
        secret("refresh_token", description="Refresh token.", withheld=True),
        FieldSpec(
            "expires_at",
            FieldKind.TIMESTAMP,
            description="When the access token expires (RFC 3339; stored in UTC).",
        ),
        FieldSpec(
            "issued_at",
            FieldKind.TIMESTAMP,
            description="When the broker obtained the access token (RFC 3339; stored in UTC). A token "
            "living no longer than the refresh margin is refreshed at half its life.",
        ),
        FieldSpec(
            "grant_type",
            FieldKind.ENUM,
            default="authorization_code",
            choices=("authorization_code", "client_credentials"),
            description="OAuth2 grant used to obtain tokens.",
        ),
    ),
    rules=(
        require("token_url", when=(is_(PROVIDER, "custom"),)),
        # client_credentials never sends a user to the authorization endpoint.
        require("authorize_url", when=(is_(PROVIDER, "custom"), is_("grant_type", "authorization_code"))),
    ),
    defaults=_OAUTH_DEFAULTS,
)

AWS = ConnectionType(
    name="aws",
    description="AWS credentials: an access key, optionally a role to assume. Takes no provider.",
    fields=(
        # The key id identifies the key (it appears in CloudTrail); it is not the secret half.
        FieldSpec(
            "access_key_id",
            FieldKind.STRING,
            required=True,
            description="Access key id (AKIA...).",
            check=v.matching(r"[A-Z0-9]{16,128}", "an AWS access key id (uppercase letters and digits)"),
        ),
        secret("secret_access_key", required=True, description="Secret access key."),
        secret("session_token", description="Session token of temporary credentials."),
        FieldSpec(
            "region",
            FieldKind.STRING,
            default="us-east-1",
            description="Default region.",
            check=v.matching(r"[a-z]{2}(-[a-z]+)+-\d{1,2}", "an AWS region like us-east-1"),
        ),
        FieldSpec(
            "role_arn",
            FieldKind.STRING,
            description="IAM role to assume.",
            check=v.matching(
                r"arn:[a-z0-9-]+:iam::\d{12}:role/\S+",
                "an IAM role ARN like arn:aws:iam::123456789012:role/name",
            ),
        ),
    ),
)

GCP = ConnectionType(
    name="gcp",
    description="A Google Cloud service account key. Takes no provider.",
    fields=(
        secret(
            "service_account_json",
            required=True,
            description="The service account key file (JSON).",
            check=v.service_account_json,
        ),
        FieldSpec(
            "project_id",
            FieldKind.STRING,
            description="Default project id.",
            check=v.matching(r"([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]", "a Google Cloud project id"),
        ),
    ),
)

AZURE = ConnectionType(
    name="azure",
    description="An Azure AD (Entra ID) application with a client secret. Takes no provider.",
    fields=(
        FieldSpec(
            "tenant_id",
            FieldKind.STRING,
            required=True,
            description="Directory (tenant) id or domain.",
            check=v.matching(
                rf"{_GUID}|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+",
                "a tenant GUID or a domain like contoso.onmicrosoft.com",
            ),
        ),
        FieldSpec(
            "client_id",
            FieldKind.STRING,
            required=True,
            description="Application (client) id.",
            check=v.matching(_GUID, _GUID_TEXT),
        ),
        secret("client_secret", required=True, description="Client secret."),
        FieldSpec(
            "subscription_id",
            FieldKind.STRING,
            description="Default subscription id.",
            check=v.matching(_GUID, _GUID_TEXT),
        ),
    ),
)

# Free-form: any config keys, any secret names (checked in `_validate`), at least one secret.
CUSTOM = ConnectionType(
    name="custom",
    description="Anything else: free config, freely named secrets (at least one). Takes no provider.",
    fields=(),
    open_config=True,
)

ACCOUNT_TYPES = (API_KEY, OAUTH2, AWS, GCP, AZURE, CUSTOM)
