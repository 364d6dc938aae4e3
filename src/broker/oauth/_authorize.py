"""The front-channel half: which provider, the state and PKCE pair, and the authorization URL."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, cast

from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from broker.catalog.oauth_providers import (
    FLOW_PARAMS,
    PROVIDERS,
    TOKEN_AUTH_METHODS,
    OAuthProvider,
    TokenAuthMethod,
    flow_params_in,
)
from broker.oauth._types import OAuthError

CUSTOM = "custom"


def provider_for(provider_name: str, config: Mapping[str, Any]) -> OAuthProvider:
    """The provider a connection talks to: the table entry, overridden by its validated config.

    `custom` takes everything from the config. The config's `scopes` become `default_scopes`
    and its `verify_url` the `userinfo_url`; its `authorize_params` are added to the provider's
    extra authorization parameters, replacing those of the same name. Raises
    `OAuthError(kind="invalid_config")`.
    """
    if provider_name == CUSTOM:
        token_url = config.get("token_url")
        if not token_url:
            raise OAuthError("invalid_config", "provider custom needs a token_url")
        base = OAuthProvider(name=CUSTOM, authorize_url="", token_url=str(token_url))
    else:
        known = PROVIDERS.get(provider_name)
        if known is None:
            raise OAuthError("invalid_config", f"unknown OAuth2 provider {provider_name!r}")
        base = known
    changes: dict[str, Any] = {
        name: str(config[key])
        for name, key in (
            ("authorize_url", "authorize_url"),
            ("token_url", "token_url"),
            ("revocation_url", "revocation_url"),
            ("userinfo_url", "verify_url"),
        )
        if config.get(key)
    }
    method = config.get("token_auth_method")
    if method:
        if method not in TOKEN_AUTH_METHODS:
            raise OAuthError("invalid_config", "token_auth_method is not one the client supports")
        changes["token_auth_method"] = cast(TokenAuthMethod, method)
    scopes = config.get("scopes")
    if scopes:
        changes["default_scopes"] = tuple(str(s) for s in scopes)
    params = config.get("authorize_params")
    params = {str(k): str(v) for k, v in params.items()} if isinstance(params, Mapping) else {}
    if params:
        changes["extra_authorize_params"] = {**base.extra_authorize_params, **params}
    resources = config.get("resource")
    if resources:
        changes["resources"] = tuple(str(r) for r in resources)
    elif params.get("resource"):
        # Saved before `resource` was a field of its own (the catalog refuses it there now): it
        # was meant as the audience, so it goes on the token requests too, not only the first.
        changes["resources"] = (params["resource"],)
    return dataclasses.replace(base, **changes)


def new_state() -> str:
    """A fresh `state`: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def new_pkce() -> tuple[str, str]:
    """A fresh PKCE pair: (code_verifier, S256 code_challenge) per RFC 7636."""
    # 64 random bytes make 86 characters of [A-Za-z0-9_-]: inside RFC 7636's 43..128.
    verifier = secrets.token_urlsafe(64)
    return verifier, str(create_s256_code_challenge(verifier))


def authorization_url(
    provider: OAuthProvider,
    client_id: str,
    redirect_uri: str,
    scopes: Sequence[str],
    state: str,
    code_challenge: str,
) -> str:
    """The URL to send the user to: an authorization code request with `state` and PKCE S256.

    `scopes` are sent as given (joined with the provider's separator; omitted when empty),
    plus one `resource` per RFC 8707 indicator and the provider's extra parameters.
    """
    if not provider.authorize_url:
        raise OAuthError("invalid_config", f"provider {provider.name} has no authorization endpoint")
    taken = flow_params_in(provider.authorize_url)
    if taken:
        # The catalog refuses such an endpoint; this is for rows saved before it did.
        raise OAuthError(
            "invalid_config",
            f"the authorization endpoint's query sets {', '.join(taken)}, which the flow sets",
        )
    extra: dict[str, str | list[str]] = {
        k: v for k, v in provider.extra_authorize_params.items() if k.lower() not in FLOW_PARAMS
    }
    if provider.resources:
        extra["resource"] = list(provider.resources)  # repeated, one parameter per indicator
    scope = provider.scope_separator.join(scopes) or None
    return str(
        prepare_grant_uri(
            provider.authorize_url,
            client_id,
            "code",
            redirect_uri=redirect_uri,
            scope=scope,
            state=state,
            code_challenge=code_challenge,
            code_challenge_method="S256",
            **extra,
        )
    )
