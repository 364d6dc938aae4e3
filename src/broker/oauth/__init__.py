"""The OAuth2 client protocol: authorization URLs with state and PKCE, token requests, revocation.

Protocol pieces come from Authlib; every request goes out through the egress policy
(`broker.egress.http`). No state is kept here: the service layer stores the state and
verifier, the tokens, and decides when to refresh.

    _authorize.py  provider_for, new_state, new_pkce, authorization_url (front channel)
    _token.py      exchange_code, refresh, client_credentials_token, revoke (back channel)
    _expiry.py     infer_expiry: expires_in, else the JWT exp, else a default lifetime
    _types.py      ClientCredentials, TokenSet (masked reprs, not picklable), OAuthError

What the back-channel calls raise:

    Exception
     ├── OAuthError       kind: "invalid_grant" | "transient" | "invalid_config";
     │                    error (provider's code), status, retry_after
     ├── egress.Blocked   the policy refused the endpoint; nothing was sent (unchanged)
     └── egress.DnsFailure  the endpoint's host did not resolve (unchanged)
"""

from broker.catalog.oauth_providers import OAuthProvider
from broker.oauth._authorize import authorization_url, new_pkce, new_state, provider_for
from broker.oauth._expiry import infer_expiry
from broker.oauth._token import client_credentials_token, exchange_code, refresh, revoke
from broker.oauth._types import ClientCredentials, OAuthError, TokenSet

__all__ = [
    "ClientCredentials",
    "OAuthError",
    "OAuthProvider",
    "TokenSet",
    "authorization_url",
    "client_credentials_token",
    "exchange_code",
    "infer_expiry",
    "new_pkce",
    "new_state",
    "provider_for",
    "refresh",
    "revoke",
]
