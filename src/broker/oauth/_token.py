"""The back-channel half: token requests (code, refresh, client credentials) and RFC 7009 revocation.

Authlib builds the request bodies and the client authentication; every request is sent by
`broker.egress.http.request` on a policy-checked client, so each connection goes to an
address the egress policy allowed. (Authlib's `AsyncOAuth2Client` is an httpx client of its
own, built with its own transport; it is not used, so nothing can bypass the policy.)

Answers are classified once, in `_failure`: the provider's error code (RFC 6749 section 5.2,
or the 200-with-error dialects of GitHub and Slack) and the HTTP status decide the kind. No
token, code, verifier or client secret is ever put into an exception: messages name the
endpoint, the status and a well-formed error code, never the provider's description, which
may echo what was sent; a "code" that repeats a secret the request carried, or four characters of
one, is dropped too.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import re
import ssl
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode

import certifi
import httpx
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_token_request
from authlib.oauth2.rfc7009 import prepare_revoke_token_request

from broker.catalog.oauth_providers import OAuthProvider
from broker.egress import EgressPolicy, InvalidTarget, ResponseTooLarge
from broker.egress.http import http_client, request
from broker.oauth._expiry import infer_expiry
from broker.oauth._types import ClientCredentials, ErrorKind, OAuthError, TokenSet
from broker.scrub import Scrubber

_HEADERS = {
    "Accept": "application/json",  # GitHub answers form data without it
    "Content-Type": "application/x-www-form-urlencoded",
    "User-Agent": "secrets-broker",
}
# What an error code may look like to be repeated in messages, audit and logs.
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# How much of a provider's error_description is kept (scrubbed) for the connection's summary.
DESCRIPTION_LENGTH = 200
_WHITESPACE = re.compile(r"[\s\x00-\x1f\x7f]+")
# Granted scopes kept from a token answer (they become plain config): RFC 6749 scope tokens, bounded.
_SCOPE = re.compile(r"[!#-\[\]-~]{1,256}")
MAX_GRANTED_SCOPES = 100
# Request fields that carry a secret (RFC 6749, RFC 7636, RFC 7009).
_SECRET_FIELDS = frozenset({"code", "code_verifier", "refresh_token", "client_secret", "token"})
# Codes that mean the grant itself is dead, including GitHub's and Slack's own words.
_REAUTHORIZE = frozenset(
    {
        "invalid_grant",
        "bad_verification_code",
        "bad_refresh_token",
        "invalid_code",
        "code_already_used",
        "invalid_refresh_token",
        "token_revoked",
        "token_expired",
    }
)
# Codes that mean the client, its registration or its request is wrong: authorizing again will not
# help (RFC 6749 section 5.2: invalid_scope is a scope the grant does not cover or the client may not
# ask for, invalid_request a malformed request).
_MISCONFIGURED = frozenset(
    {
        "invalid_client",
        "invalid_scope",
        "invalid_request",
        "unauthorized_client",
        "unsupported_grant_type",
        "unsupported_token_type",
        "incorrect_client_credentials",
        "redirect_uri_mismatch",
        "invalid_target",  # RFC 8707 section 2: the resource indicator is not one this server serves
        "bad_redirect_uri",
        "invalid_client_id",
        "bad_client_secret",
    }
)
_BUSY = frozenset({"temporarily_unavailable", "server_error", "slow_down", "ratelimited"})
_TRANSIENT_STATUS = frozenset({408, 425, 429})


@functools.cache
def _trust() -> ssl.SSLContext:
    # The same trust as the testers: the system store plus certifi's bundle.
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=certifi.where())
    return context


async def exchange_code(
    egress: EgressPolicy,
    provider: OAuthProvider,
    client: ClientCredentials,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    *,
    now: datetime,
    default_lifetime: timedelta,
) -> TokenSet:
    """Exchange an authorization code (with its PKCE verifier) for tokens."""
    if not code:
        raise OAuthError("invalid_grant", "no authorization code to exchange")
    body = prepare_token_request(
        "authorization_code", redirect_uri=redirect_uri, code=code, code_verifier=code_verifier
    )
    body = _with_resources(body, provider)
    document, sent = await _token_call(egress, provider, client, body, now)
    return _token_set(document, now, default_lifetime, None, sent=_sent_secrets(sent))


async def refresh(
    egress: EgressPolicy,
    provider: OAuthProvider,
    client: ClientCredentials,
    refresh_token: str,
    *,
    now: datetime,
    default_lifetime: timedelta,
) -> TokenSet:
    """New tokens for a refresh token; when the answer has no refresh token, the given one is kept."""
    if not refresh_token:
        raise OAuthError("invalid_grant", "no refresh token to refresh with; authorize again")
    body = _with_resources(prepare_token_request("refresh_token", refresh_token=refresh_token), provider)
    document, sent = await _token_call(egress, provider, client, body, now)
    return _token_set(document, now, default_lifetime, refresh_token, sent=_sent_secrets(sent))


async def client_credentials_token(
    egress: EgressPolicy,
    provider: OAuthProvider,
    client: ClientCredentials,
    scopes: Sequence[str],
    *,
    now: datetime,
    default_lifetime: timedelta,
) -> TokenSet:
    """A token for the client itself (client credentials grant), with `scopes` when given."""
    body = prepare_token_request("client_credentials", scope=provider.scope_separator.join(scopes))
    body = _with_resources(body, provider)
    document, sent = await _token_call(egress, provider, client, body, now)
    return _token_set(document, now, default_lifetime, None, sent=_sent_secrets(sent))


async def revoke(
    egress: EgressPolicy,
    provider: OAuthProvider,
    client: ClientCredentials,
    token: str,
    token_type_hint: str | None,
) -> None:
    """Revoke a token at the provider's RFC 7009 endpoint; raises `OAuthError` when that fails."""
    if not provider.revocation_url:
        raise OAuthError(
            "invalid_config",
            f"provider {provider.name} has no RFC 7009 revocation endpoint; revoke the grant at the provider",
        )
    body, _ = prepare_revoke_token_request(token, token_type_hint)
    response = await _post(egress, provider, client, provider.revocation_url, body, "revocation endpoint")
    if not 200 <= response.status_code < 300:
        raise _failure(response, _document(response), "revocation endpoint", datetime.now(UTC))


def _with_resources(body: str, provider: OAuthProvider) -> str:
    """The token request body with one `resource` per RFC 8707 indicator (section 2.2).

    Sent on every token request, refresh included: an authorization server that binds the audience
    from the request alone would otherwise issue the refreshed token for no resource, or all.
    """
    if not provider.resources:
        return body
    # Authlib's body encoder takes no repeated parameter; it is appended, encoded the same way.
    return body + "&" + urlencode([("resource", value) for value in provider.resources])


async def _token_call(
    egress: EgressPolicy, provider: OAuthProvider, client: ClientCredentials, body: str, now: datetime
) -> tuple[dict[str, Any], httpx.Request]:
    """The token answer as a JSON object, and the request that was sent; raises `OAuthError`."""
    response = await _post(egress, provider, client, provider.token_url, body, "token endpoint")
    document = _document(response)
    # GitHub and Slack report errors in 200 answers: `error`, or Slack's `"ok": false`.
    if (
        not 200 <= response.status_code < 300
        or document is None
        or "error" in document
        or document.get("ok") is False
    ):
        raise _failure(response, document, "token endpoint", now)
    return document, response.request


async def _post(
    egress: EgressPolicy,
    provider: OAuthProvider,
    client: ClientCredentials,
    url: str,
    body: str,
    what: str,
) -> httpx.Response:
    """POST a form with client authentication; transport failures become `OAuthError`.

    A URL (or redirect) the egress policy cannot read is `invalid_config`; `Blocked`
    and `DnsFailure` from the policy propagate unchanged.
    """
    try:
        url = egress.check_url(url).text
    except InvalidTarget as exc:
        raise OAuthError("invalid_config", f"the {what} URL is not valid: {exc.reason}") from None
    # A public client (no secret) can only identify itself.
    method = provider.token_auth_method if client.client_secret else "none"
    auth = ClientAuth(client.client_id, client.client_secret, method)
    try:
        uri, headers, content = auth.prepare("POST", url, dict(_HEADERS), body)
    except UnicodeEncodeError:
        # Authlib encodes HTTP Basic credentials as Latin-1: say so, never with the secret.
        raise OAuthError(
            "invalid_config",
            "the client id or secret has characters HTTP Basic authentication cannot carry"
            " (Latin-1 only); set token_auth_method to client_secret_post",
        ) from None
    try:
        async with http_client(egress, verify=_trust()) as http:
            return await request(http, "POST", uri, headers=headers, content=content.encode())
    except TimeoutError:
        raise OAuthError("transient", f"the {what} did not answer within the time limit") from None
    except httpx.TimeoutException:
        raise OAuthError("transient", f"the {what} did not answer in time") from None
    except httpx.TooManyRedirects:
        raise OAuthError("invalid_config", f"the {what} redirects too often") from None
    except ResponseTooLarge:
        raise OAuthError("invalid_config", f"the {what}'s answer is too large") from None
    except httpx.DecodingError:  # `UnreadableBody` among them
        raise OAuthError(
            "invalid_config",
            f"the {what}'s answer cannot be read: in a content coding the broker does not decode"
            " (it reads gzip and deflate), or broken in it",
        ) from None
    except (httpx.InvalidURL, InvalidTarget):
        raise OAuthError("invalid_config", f"the {what} redirected to a URL that is not valid") from None
    except httpx.TransportError as exc:
        # httpx's messages name the host and the OS error, never the request body.
        raise OAuthError("transient", f"cannot reach the {what} ({type(exc).__name__})") from None


def _document(response: httpx.Response) -> dict[str, Any] | None:
    """The answer as a JSON object (or, from old servers, form data); None when it is neither."""
    try:
        document = json.loads(response.content)
    except ValueError:
        if "x-www-form-urlencoded" not in response.headers.get("content-type", ""):
            return None
        try:
            return dict(parse_qsl(response.content.decode(), keep_blank_values=True))
        except ValueError:
            return None
    return document if isinstance(document, dict) else None


def _token_set(
    document: dict[str, Any],
    now: datetime,
    default_lifetime: timedelta,
    kept_refresh: str | None,
    *,
    sent: Sequence[str] = (),
) -> TokenSet:
    """The tokens of a successful answer; `sent` are the secrets the request carried."""
    access = document.get("access_token")
    if not isinstance(access, str) or not access:
        raise OAuthError("invalid_config", "the token endpoint's answer has no access_token")
    refresh_token = document.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        refresh_token = kept_refresh
    token_type = _bearer(document.get("token_type"))
    expires_at, source = infer_expiry(access, document.get("expires_in"), now, default_lifetime)
    return TokenSet(
        access_token=access,
        refresh_token=refresh_token,
        expires_at=expires_at,
        scopes=_granted_scopes(document.get("scope"), [*sent, access, refresh_token or ""]),
        token_type=token_type,
        expiry_source=source,
        issued_at=now,
    )


_TOKEN_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,32}")


def _bearer(value: object) -> str:
    """The answer's `token_type` when it is Bearer (any case; "Bearer" when absent, as some
    providers send none). A client must not use a token of a type it does not understand
    (RFC 6749, 7.1), and the broker sends tokens only as `Authorization: Bearer` (RFC 6750):
    a DPoP- or MAC-bound token sent that way would fail at every call, or be refused by design."""
    if value is None or value == "":
        return "Bearer"
    if isinstance(value, str) and value.lower() == "bearer":
        return value
    shown = repr(value) if isinstance(value, str) and _TOKEN_TYPE.fullmatch(value) else "an unknown type"
    raise OAuthError(
        "invalid_config",
        f"the token endpoint issued a token of type {shown}; the broker can use only Bearer tokens",
    )


def _granted_scopes(value: object, secrets: Sequence[str]) -> tuple[str, ...]:
    """The scopes a token answer says were granted, as far as they can be kept in plain config.

    A scope that is no RFC 6749 scope token, or that holds four characters of a secret the request
    carried or the answer issued (a hostile or careless provider may echo them), is dropped; at most
    `MAX_GRANTED_SCOPES` are kept.
    """
    # RFC 6749 separates granted scopes with spaces; GitHub and Slack answer with commas.
    if isinstance(value, str):
        found = [s for s in re.split(r"[\s,]+", value[:100_000]) if s]
    elif isinstance(value, list):
        found = [s for s in value if isinstance(s, str) and s]
    else:
        return ()
    scrubber = Scrubber(secrets)
    kept = [s for s in found if _SCOPE.fullmatch(s) and scrubber.fragments(s) == s]
    return tuple(dict.fromkeys(kept))[:MAX_GRANTED_SCOPES]


def _failure(
    response: httpx.Response, document: dict[str, Any] | None, what: str, now: datetime
) -> OAuthError:
    """The `OAuthError` an unsuccessful answer means."""
    status = response.status_code
    raw = document.get("error") if document is not None else None
    code = raw if isinstance(raw, str) and _ERROR_CODE.fullmatch(raw) else None
    if code is not None and _echoes_a_secret(code, response.request):
        code = None
    retry_after = _retry_after(response.headers.get("retry-after"), now)
    kind: ErrorKind
    if status >= 500 or status in _TRANSIENT_STATUS or code in _BUSY:
        kind = "transient"
    elif code in _MISCONFIGURED:
        kind = "invalid_config"
    elif code in _REAUTHORIZE or status in (400, 401):
        # RFC 6749 section 5.2 errors come as 400 (401 for client authentication); one without a
        # readable code still means this grant will not work again.
        kind = "invalid_grant"
    else:
        kind = "invalid_config"
    if code is None and 200 <= status < 300:
        message = f"the {what}'s answer (HTTP {status}) is not a token response"
    else:
        message = f"the {what} answered HTTP {status}" + (f" {code}" if code else "")
    return OAuthError(
        kind,
        message,
        error=code,
        status=status,
        retry_after=retry_after,
        description=_description(document, response.request),
    )


def _sent_secrets(sent: httpx.Request) -> list[str]:
    """The secrets a request carried: its secret form fields and its Basic credentials, both forms."""
    form = parse_qsl(sent.content.decode("utf-8", "replace"), keep_blank_values=True)
    secrets = [value for name, value in form if name in _SECRET_FIELDS]
    scheme, _, credentials = sent.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic" and credentials:
        secrets.append(credentials)
        with contextlib.suppress(ValueError):
            # RFC 6749 section 2.3.1: id and secret are form-encoded, then joined and base64-encoded.
            secrets.append(unquote_plus(base64.b64decode(credentials).decode("latin-1").partition(":")[2]))
    return secrets


def _echoes_a_secret(code: str, sent: httpx.Request) -> bool:
    """Whether an error "code" repeats a secret the request carried (form field or Basic header),
    whole or any four characters of it (`abcd...wxyz`).

    Such a code is no code: repeated in messages, audit and logs, it would leak what it echoes.
    The codes this module knows are words of the protocol, kept whatever a secret holds.
    """
    if code in _REAUTHORIZE or code in _MISCONFIGURED or code in _BUSY:
        return False
    return Scrubber(_sent_secrets(sent)).fragments(code) != code


def _description(document: dict[str, Any] | None, sent: httpx.Request) -> str:
    """The provider's error_description on one line, cut to `DESCRIPTION_LENGTH`, every form of
    what the request carried masked (a provider may quote the refresh token it refused)."""
    raw = document.get("error_description") if document is not None else None
    if not isinstance(raw, str) or not raw:
        return ""
    # Scrubbed before it is cut, so a secret cut in two by the limit is masked whole; bounded
    # first, as the provider decides how long it is.
    line = _WHITESPACE.sub(" ", raw[: 8 * DESCRIPTION_LENGTH]).strip()
    # fragments: a provider may quote a secret shortened (`abcd...wxyz`), not only whole.
    return Scrubber(_sent_secrets(sent)).fragments(line)[:DESCRIPTION_LENGTH]


def _retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())
