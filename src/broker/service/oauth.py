"""OAuth2 authorization flows: authorization code with PKCE, begun for a connection or a draft.

A pending authorization completes with what its Begin sent (redirect URI, scopes), or not at all
when a setting it depends on (`AUTHORIZATION_FIELDS`) changed on the connection since. The state
is random, single-use, bound to the caller and tenant, and sealed with the PKCE verifier, which
never leaves the broker. Keeping the tokens fresh afterwards is `service.tokens`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import structlog

from broker import catalog, crypto, oauth
from broker.crypto import DecryptionFailed, Keyring
from broker.egress import Blocked, DnsFailure, EgressPolicy
from broker.errors import (
    AlreadyExists,
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    SecretUnavailable,
)
from broker.model import (
    ConnectionRecord,
    Outcome,
    PendingAuthorization,
)
from broker.sensitive import SecretFields
from broker.service.audit import AuditLog
from broker.service.context import Call
from broker.service.lookup import live_connection
from broker.service.sealing import DECRYPT_FAILED, open_secrets, open_secrets_audited, state_binding
from broker.service.tokens import CLIENT_CREDENTIALS, TokenRefresher, oauth_client
from broker.store import ConnectionStore, OAuthStateStore

log = structlog.get_logger("broker.oauth")

_STATE_ERROR = "unknown, expired or already used; start the authorization again"
# The connection settings an authorization depends on: what Begin sent the user to, and what the code
# exchange must send with the code. A pending authorization remembers them; Complete refuses when
# they changed (the code would reach another token endpoint, or buy a token for another audience).
AUTHORIZATION_FIELDS = (
    "client_id",
    "authorize_url",
    "token_url",
    "token_auth_method",
    "resource",
    "authorize_params",
    "issuer",
    "grant_type",
)


@dataclass(frozen=True)
class DraftAuthorization:
    """A new oauth2 connection to create when the flow completes."""

    name: str
    provider: str
    config: dict[str, Any]
    secrets: SecretFields
    labels: dict[str, str]


CreateConnection = Callable[[Call, DraftAuthorization, oauth.TokenSet], Awaitable[ConnectionRecord]]


def _state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


# Generous bounds on what a caller hands over: a redirect URI as long as any URL the catalog keeps,
# an authorization code longer than any provider issues (Microsoft's run to ~1.5 kB).
MAX_REDIRECT_URI = 2_048
MAX_CODE = 8_192
_NOT_IN_A_URL = re.compile(r"[\x00-\x20\x7f]")


def _check_redirect_uri(uri: str) -> None:
    if len(uri) > MAX_REDIRECT_URI:
        raise InvalidArgument.field("redirect_uri", f"must be at most {MAX_REDIRECT_URI} characters")
    if _NOT_IN_A_URL.search(uri):
        # urlsplit would quietly drop a CR or LF; the provider would be sent the URI as given.
        raise InvalidArgument.field("redirect_uri", "must not contain spaces or control characters")
    try:
        parts = urlsplit(uri)
    except ValueError:  # an unclosed IPv6 bracket, for one
        raise InvalidArgument.field("redirect_uri", "is not a valid URL") from None
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if (
        parts.scheme not in ("https", "http")
        or not parts.hostname
        or (parts.scheme == "http" and not loopback)
    ):
        raise InvalidArgument.field("redirect_uri", "must be an https URL, or http on a loopback address")
    if parts.username or parts.password or parts.fragment:
        raise InvalidArgument.field("redirect_uri", "must not carry credentials or a fragment")


def _authorization_settings(provider_name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """What of a connection an authorization is bound to (`AUTHORIZATION_FIELDS` and the provider)."""
    return {"provider": provider_name, **{name: config.get(name) for name in AUTHORIZATION_FIELDS}}


def _exchange_failed(exc: Exception, detail: str) -> str:
    """What a failed code exchange means to the person who just signed in, and what to do."""
    if isinstance(exc, oauth.OAuthError) and exc.kind == "invalid_config":
        # invalid_client and its kin: the code may well be good, the client is not.
        return (
            f"the provider refused the token request ({detail}): check the connection's client_id,"
            " client_secret, token_auth_method and token_url, then start the authorization again"
        )
    if isinstance(exc, oauth.OAuthError) and exc.kind == "invalid_grant":
        return f"the provider did not accept the authorization code ({detail}); start the authorization again"
    return f"the token endpoint could not be used ({detail}); start the authorization again"


async def revoke_upstream(keyring: Keyring, egress: EgressPolicy, record: ConnectionRecord) -> str:
    """Ask the provider to revoke the connection's tokens; returns the outcome for the audit record.

    No state of its own: `ConnectionService.revoke` calls it, so the two services need not know
    each other both ways.
    """
    if record.type != "oauth2" or record.sealed is None:
        return ""
    try:
        secrets = open_secrets(keyring, record).reveal()
    except SecretUnavailable:
        # Nothing is sent anywhere; the outcome lands in the revoke's audit event.
        return f"failed: {DECRYPT_FAILED}"
    token, hint = secrets.get("refresh_token"), "refresh_token"
    if not token:
        token, hint = secrets.get("access_token"), "access_token"
    if not token:
        return "no_token"
    try:
        provider = oauth.provider_for(record.provider, record.config)
        await oauth.revoke(egress, provider, oauth_client(record.config, secrets), token, hint)
    except (oauth.OAuthError, Blocked, DnsFailure) as exc:
        reason = exc.error or exc.kind if isinstance(exc, oauth.OAuthError) else type(exc).__name__
        log.warning("oauth_upstream_revoke_failed", connection_id=record.id, reason=reason)
        return f"failed: {reason}"
    return "revoked"


class OAuthService:
    """The authorization flows: Begin sends a person to the provider, Complete stores the tokens
    (on the connection, or on a new one for a flow begun from a draft)."""

    def __init__(
        self,
        connections: ConnectionStore,
        oauth_states: OAuthStateStore,
        keyring: Keyring,
        audit: AuditLog,
        egress: EgressPolicy,
        clock: Callable[[], datetime],
        tokens: TokenRefresher,
        *,
        create_connection: CreateConnection | None = None,
    ) -> None:
        self._connections = connections
        self._oauth_states = oauth_states
        self._keyring = keyring
        self._audit = audit
        self._egress = egress
        self._clock = clock
        # Stores the tokens a re-authorization obtained, as a refresh would.
        self._tokens = tokens
        self._settings = tokens.settings
        # Creates the connection a flow begun from a draft ends in (`ConnectionService`).
        self._create_connection = create_connection

    # -------------------------------------------------------- authorization

    async def begin(
        self,
        call: Call,
        redirect_uri: str,
        scopes: list[str],
        *,
        connection_id: str = "",
        draft: DraftAuthorization | None = None,
    ) -> tuple[str, str, datetime]:
        """Start a flow: (authorization URL, state, expiry). The verifier stays sealed here."""
        _check_redirect_uri(redirect_uri)
        if scopes:
            scopes = catalog.validate_field("oauth2", "scopes", scopes, path="scopes")
        payload: dict[str, Any] = {"redirect_uri": redirect_uri}
        if draft is not None:
            await self._check_name_free(call, draft.name)
            provider_name, config, secrets = draft.provider, draft.config, draft.secrets.reveal()
            payload["draft"] = {
                "name": draft.name,
                "provider": draft.provider,
                "config": draft.config,
                "secrets": secrets,
                "labels": draft.labels,
            }
        else:
            record = await live_connection(
                self._connections, call.tenant, connection_id, field="connection_id"
            )
            if record.type != "oauth2":
                raise FailedPrecondition(f"connection {record.id} is not an oauth2 connection")
            provider_name, config = record.provider, record.config
            event = call.audit_event(self._clock(), "oauth.begin", record.id)
            secrets = (await open_secrets_audited(self._keyring, record, self._audit, event)).reveal()
        if config.get("grant_type") == CLIENT_CREDENTIALS:
            if draft is not None:
                raise InvalidArgument.field(
                    "draft.config.grant_type", "is client_credentials: such a connection needs no sign-in"
                )
            raise FailedPrecondition(
                f"connection {connection_id} uses the client_credentials grant: it gets its tokens without"
                " anyone signing in"
            )
        state = oauth.new_state()
        verifier, challenge = oauth.new_pkce()
        try:
            provider = oauth.provider_for(provider_name, config)
            wanted = scopes or list(provider.default_scopes)  # the config's, when it sets them
            url = oauth.authorization_url(
                provider, oauth_client(config, secrets).client_id, redirect_uri, wanted, state, challenge
            )
        except oauth.OAuthError as exc:
            # The connection's (or the provider table's) endpoints, not the request, are wrong.
            raise FailedPrecondition(f"cannot start an authorization: {exc}") from None
        payload["verifier"] = verifier
        payload["settings"] = _authorization_settings(provider_name, config)
        # Stored on the connection when the flow completes: a re-authorization asks for them again.
        payload["scopes"] = wanted
        now = self._clock()
        state_hash = _state_hash(state)
        sealed = crypto.seal(
            self._keyring, json.dumps(payload).encode(), state_binding(call.tenant, state_hash)
        )
        pending = PendingAuthorization(
            state_hash=state_hash,
            tenant=call.tenant,
            actor=call.actor,
            connection_id=connection_id,
            created_at=now,
            expires_at=now + self._settings.state_ttl,
            sealed=sealed,
        )
        event = call.audit_event(now, "oauth.begin", connection_id, details={"provider": provider.name})
        await self._oauth_states.put_oauth_state(pending, event)
        return url, state, pending.expires_at

    async def complete(self, call: Call, state: str, code: str, iss: str = "") -> ConnectionRecord:
        """Exchange the code (with the sealed verifier) and store the tokens on the connection.

        `iss` is the redirect's RFC 9207 issuer: when the connection names its `issuer`, they must
        be equal, checked before the code goes anywhere.
        """
        if not state:
            raise InvalidArgument.field("state", "is required")
        if not code:
            raise InvalidArgument.field("code", "is required")
        if len(code) > MAX_CODE:
            raise InvalidArgument.field("code", f"must be at most {MAX_CODE} characters")
        now = self._clock()
        pending = await self._oauth_states.take_oauth_state(_state_hash(state), call.tenant, call.actor)
        reason = ""
        if pending is None:
            reason = "unknown_state"
        elif pending.expires_at <= now:
            reason = "state_expired"
        if pending is None or reason:
            await self._audit.append(call.audit_event(now, "oauth.complete", "", Outcome.FAILED, reason))
            raise InvalidArgument.field("state", _STATE_ERROR)
        try:
            # A flow begun by an older broker (any format) still completes: a pending
            # authorization has no destination, so every format binds the same.
            payload = json.loads(
                crypto.open(
                    self._keyring,
                    pending.sealed,
                    state_binding(call.tenant, pending.state_hash),
                    formats=crypto.FORMATS,
                )
            )
        except DecryptionFailed:
            raise InvalidArgument.field("state", _STATE_ERROR) from None
        draft = payload.get("draft")
        asked = payload.get("scopes")  # absent from flows begun before the broker stored them
        record: ConnectionRecord | None = None
        if draft is not None:
            # Taken since Begin: refused before the code buys tokens nobody could keep or revoke.
            try:
                await self._check_name_free(call, draft["name"])
            except AlreadyExists:
                await self._audit.append(
                    call.audit_event(now, "oauth.complete", "", Outcome.FAILED, "name_taken")
                )
                raise
            provider_name, config, secrets = draft["provider"], draft["config"], draft["secrets"]
            if asked:
                config = {**config, "scopes": asked}
        else:
            record = await live_connection(
                self._connections, call.tenant, pending.connection_id, field="state"
            )
            # Absent from flows begun before the broker kept them: those complete as they always did.
            began = payload.get("settings")
            if began is not None:
                current = _authorization_settings(record.provider, record.config)
                changed = sorted(name for name in current if current[name] != began.get(name))
                if changed:
                    await self._audit.append(
                        call.audit_event(
                            now, "oauth.complete", record.id, Outcome.FAILED, "connection_changed"
                        )
                    )
                    raise FailedPrecondition(
                        f"connection {record.id} changed since the authorization began"
                        f" ({', '.join(changed)}); the code was not used: start the authorization again"
                    )
            if asked:
                record = replace(record, config={**record.config, "scopes": asked})
            provider_name, config = record.provider, record.config
            event = call.audit_event(now, "oauth.complete", record.id)
            secrets = (await open_secrets_audited(self._keyring, record, self._audit, event)).reveal()
        expected = str(config.get("issuer") or "")
        if expected and iss != expected:
            # RFC 9207 section 2.4: a response naming another server (or none, from a server that
            # names itself) may be a mix-up; its code must not reach this token endpoint.
            reason = "iss_mismatch" if iss else "iss_missing"
            await self._audit.append(
                call.audit_event(now, "oauth.complete", pending.connection_id, Outcome.FAILED, reason)
            )
            problem = "does not match" if iss else "is missing: it must match"
            raise InvalidArgument.field(
                "iss",
                f"{problem} the connection's issuer; the response may come from another authorization"
                " server (RFC 9207); start the authorization again",
            )
        provider = oauth.provider_for(provider_name, config)
        try:
            tokens = await oauth.exchange_code(
                self._egress,
                provider,
                oauth_client(config, secrets),
                code,
                payload["redirect_uri"],
                payload["verifier"],
                now=now,
                default_lifetime=self._settings.default_lifetime,
            )
        except (oauth.OAuthError, Blocked, DnsFailure) as exc:
            detail = exc.error or exc.kind if isinstance(exc, oauth.OAuthError) else type(exc).__name__
            await self._audit.append(
                call.audit_event(now, "oauth.complete", pending.connection_id, Outcome.FAILED, str(detail))
            )
            raise FailedPrecondition(_exchange_failed(exc, str(detail))) from None
        if record is None:
            if self._create_connection is None:
                raise FailedPrecondition("creating oauth2 connections is not configured on this broker")
            new = DraftAuthorization(
                draft["name"], provider_name, config, SecretFields(secrets), dict(draft.get("labels") or {})
            )
            try:
                return await self._create_connection(call, new, tokens)
            except BrokerError:
                # The name was taken during the exchange, say: the tokens belong to no connection.
                await self._give_back(provider, oauth_client(config, secrets), tokens)
                raise
        try:
            stored = await self._tokens.store_tokens(
                record, secrets, tokens, "oauth.authorize", call.actor, call.request_id
            )
        except FailedPrecondition:
            # The connection changed under the exchange (its resource, say): nobody keeps the tokens.
            await self._give_back(provider, oauth_client(config, secrets), tokens)
            raise
        if record.reauth_required_at is not None:
            log.info("oauth_connection_recovered", connection_id=record.id)
        return stored

    async def _give_back(
        self, provider: oauth.OAuthProvider, client: oauth.ClientCredentials, tokens: oauth.TokenSet
    ) -> None:
        """Revoke tokens nobody will hold (RFC 7009), as far as the provider lets us; never raises."""
        for token, hint in ((tokens.refresh_token, "refresh_token"), (tokens.access_token, "access_token")):
            if not token:
                continue
            try:
                await oauth.revoke(self._egress, provider, client, token, hint)
            except (oauth.OAuthError, Blocked, DnsFailure) as exc:
                reason = exc.error or exc.kind if isinstance(exc, oauth.OAuthError) else type(exc).__name__
                log.warning("oauth_unused_tokens_not_revoked", reason=reason)
                return

    async def _check_name_free(self, call: Call, name: str) -> None:
        if await self._connections.find_connection_by_name(call.tenant, name) is not None:
            raise AlreadyExists(f"a connection named '{name}' already exists")
