"""The values the OAuth2 client hands around: client credentials, a token set, and its one error."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, NoReturn

ErrorKind = Literal["invalid_grant", "transient", "invalid_config"]
ExpirySource = Literal["expires_in", "jwt", "default"]


class _Unpicklable:
    __slots__ = ()

    def __reduce__(self) -> NoReturn:
        # A pickle is a copy of the secret in a place nobody audits.
        raise TypeError(f"{type(self).__name__} holds secrets and cannot be pickled")


@dataclass(frozen=True, repr=False)
class ClientCredentials(_Unpicklable):
    """An OAuth2 client: its id and secret (empty for a public client). The repr masks the secret."""

    client_id: str
    client_secret: str

    def __repr__(self) -> str:
        return f"ClientCredentials(client_id={self.client_id!r}, client_secret=<{_set(self.client_secret)}>)"


@dataclass(frozen=True, repr=False)
class TokenSet(_Unpicklable):
    """What a token endpoint granted. The repr masks both tokens.

    `scopes` are those the response stated (empty when it did not say; RFC 6749 then
    means "as requested"). `expiry_source` says where `expires_at` came from.
    `issued_at` is when the request was made: with `expires_at`, the token's lifetime.
    """

    access_token: str
    refresh_token: str | None
    expires_at: datetime
    scopes: tuple[str, ...]
    token_type: str
    expiry_source: ExpirySource
    issued_at: datetime

    def __repr__(self) -> str:
        return (
            f"TokenSet(access_token=<{_set(self.access_token)}>, refresh_token=<{_set(self.refresh_token)}>, "
            f"expires_at={self.expires_at.isoformat()!r}, scopes={self.scopes!r}, "
            f"token_type={self.token_type!r}, expiry_source={self.expiry_source!r})"
        )


def _set(value: str | None) -> str:
    return "set" if value else "unset"


class OAuthError(Exception):
    """A token or revocation endpoint refused, failed, or could not be used.

    `kind`: `invalid_grant` (the grant is dead: a human must authorize again),
    `transient` (retry later; `retry_after` seconds when the server said), or
    `invalid_config` (the connection's client or endpoints are wrong). `error` is the
    provider's error code when it sent a well-formed one (never its description, which
    may echo what was sent); `status` the HTTP status when there was an answer.
    `description` is the provider's error_description scrubbed of every secret the request
    carried and cut short: for the connection's summary only, never in the message, a log or
    the audit trail.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        error: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        description: str = "",
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.error = error
        self.status = status
        self.retry_after = retry_after
        self.description = description

    def __repr__(self) -> str:
        return (
            f"OAuthError(kind={self.kind!r}, error={self.error!r}, status={self.status!r}, "
            f"retry_after={self.retry_after!r}, message={str(self)!r})"
        )
