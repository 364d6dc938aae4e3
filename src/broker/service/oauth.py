"""OAuth2 lifecycle: authorization code with PKCE, client credentials, single-flight refresh.

Tokens live in the connection's sealed secrets (`access_token`, `refresh_token`, next to
`client_secret`); `expires_at`, the scopes asked for (`scopes`) and those granted
(`granted_scopes`) are plain config. The rules that keep a connection alive:

- one refresh at a time per connection in this process (concurrent callers share it), one
  process at a time across replicas (`Coordination.refresh_lock`; the waiters then re-read the row
  and use the holder's token), and a compare-and-swap on the row version so a writer that
  lost a race never overwrites a newer token;
- a pending authorization completes with what its Begin sent (redirect URI, scopes), or not at all
  when a setting it depends on (`AUTHORIZATION_FIELDS`) changed on the connection since;
- a rotated refresh token is stored durably before any caller sees the new access token;
- expiry is never unknown (`expires_in`, else the JWT `exp`, else a default lifetime);
- `invalid_grant` marks an authorization-code connection expired (re-authorize); a client
  credentials connection has nothing to re-authorize, so its refusals, like `invalid_client` or
  `invalid_scope` for any connection, are FAILED_PRECONDITION naming the error and leave the
  connection as it is; transient failures are retried; while the current token is valid it is
  still served, and a caller holding it waits `refresh_wait` at most for a refresh under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import structlog

from broker import catalog, crypto, metrics, oauth
from broker.crypto import DecryptionFailed, Keyring
from broker.egress import Blocked, DnsFailure, EgressPolicy
from broker.errors import (
    Aborted,
    AlreadyExists,
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    SecretUnavailable,
    Unavailable,
)
from broker.model import (
    AuditEvent,
    ConnectionRecord,
    ConnectionStatus,
    Outcome,
    PendingAuthorization,
    ReauthReason,
)
from broker.scrub import Scrubber
from broker.sensitive import SecretFields
from broker.service.audit import AuditLog
from broker.service.context import Call, system_event
from broker.service.fingerprint import fingerprint
from broker.service.lookup import live_connection
from broker.service.sealing import DECRYPT_FAILED, open_secrets, open_secrets_audited, seal, state_binding
from broker.store import ConnectionStore, Coordination, OAuthStateStore

log = structlog.get_logger("broker.oauth")

SYSTEM_ACTOR = "broker:oauth"
CLIENT_CREDENTIALS = "client_credentials"
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
class OAuthSettings:
    refresh_margin: timedelta = timedelta(minutes=5)
    default_lifetime: timedelta = timedelta(hours=1)
    state_ttl: timedelta = timedelta(minutes=10)
    refresh_interval_seconds: float = 30.0
    # Pauses before the second and third attempt at a transiently failing token endpoint.
    retry_delays: tuple[float, ...] = (0.25, 1.0)
    # How long a caller holding a still-valid token waits for its refresh before being given the
    # valid one (the refresh goes on): a token endpoint may take the egress timeout, three times.
    refresh_wait: float = 2.0


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


def _client(config: Mapping[str, Any], secrets: Mapping[str, str]) -> oauth.ClientCredentials:
    return oauth.ClientCredentials(str(config.get("client_id", "")), secrets.get("client_secret", ""))


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
        await oauth.revoke(egress, provider, _client(record.config, secrets), token, hint)
    except (oauth.OAuthError, Blocked, DnsFailure) as exc:
        reason = exc.error or exc.kind if isinstance(exc, oauth.OAuthError) else type(exc).__name__
        log.warning("oauth_upstream_revoke_failed", connection_id=record.id, reason=reason)
        return f"failed: {reason}"
    return "revoked"


def token_config(config: Mapping[str, Any], tokens: oauth.TokenSet) -> dict[str, Any]:
    """Config with the token's issue and expiry times and granted scopes (non-secret metadata).

    The granted scopes go to `granted_scopes`, never over `scopes`: those are what the next
    authorization or client credentials request asks for, and a provider that granted less (an
    OpenID provider drops offline_access without prompt=consent) or names them differently must
    not shrink or rewrite the request for good.
    """
    updated = dict(config)
    updated["expires_at"] = tokens.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    updated["issued_at"] = tokens.issued_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    if tokens.scopes:
        updated["granted_scopes"] = list(tokens.scopes)
    else:
        # RFC 6749 5.1: no scope in the answer means the scopes requested.
        updated.pop("granted_scopes", None)
    return updated


def token_secrets(secrets: Mapping[str, str], tokens: oauth.TokenSet) -> dict[str, str]:
    """Secrets with the new access token and, when the provider rotated it, the new refresh token."""
    updated = {**secrets, "access_token": tokens.access_token}
    if tokens.refresh_token:
        updated["refresh_token"] = tokens.refresh_token
    return updated


class OAuthService:
    def __init__(
        self,
        connections: ConnectionStore,
        oauth_states: OAuthStateStore,
        coordination: Coordination,
        keyring: Keyring,
        audit: AuditLog,
        egress: EgressPolicy,
        clock: Callable[[], datetime],
        settings: OAuthSettings = OAuthSettings(),
        *,
        create_connection: CreateConnection | None = None,
        on_refresh_failure: Callable[[ConnectionRecord, str], None] | None = None,
    ) -> None:
        self._connections = connections
        self._oauth_states = oauth_states
        self._coordination = coordination
        self._keyring = keyring
        self._audit = audit
        self._egress = egress
        self._clock = clock
        self.settings = settings
        self._inflight: dict[tuple[str, str], asyncio.Task[ConnectionRecord]] = {}
        self._background: asyncio.Task[None] | None = None
        # Creates the connection a flow begun from a draft ends in (`ConnectionService`).
        self._create_connection = create_connection
        # The security monitor's oauth_refresh_failures rule.
        self._on_refresh_failure = on_refresh_failure

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
                provider, _client(config, secrets).client_id, redirect_uri, wanted, state, challenge
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
            expires_at=now + self.settings.state_ttl,
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
                _client(config, secrets),
                code,
                payload["redirect_uri"],
                payload["verifier"],
                now=now,
                default_lifetime=self.settings.default_lifetime,
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
                await self._give_back(provider, _client(config, secrets), tokens)
                raise
        stored = await self._store_tokens(
            record, secrets, tokens, "oauth.authorize", call.actor, call.request_id
        )
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

    # ---------------------------------------------------------- resolve path

    def _needs_token(self, record: ConnectionRecord, secrets: Mapping[str, str]) -> bool:
        expires = record.token_expires_at
        if not secrets.get("access_token"):
            return True
        if expires is None:
            return True
        margin = self.settings.refresh_margin
        issued = record.token_issued_at
        if issued is not None and issued < expires:
            # A token that lives no longer than the margin (Keycloak's default is 5 minutes,
            # as is ours) would otherwise be refreshed on every Resolve: refresh it when half
            # its life is gone instead.
            margin = min(margin, (expires - issued) / 2)
        return expires - self._clock() <= margin

    async def fresh(
        self, record: ConnectionRecord, secrets: SecretFields
    ) -> tuple[ConnectionRecord, SecretFields]:
        """The record and secrets with a token good for at least the refresh margin."""
        if record.reauth_required_at is not None:
            raise FailedPrecondition(f"connection {record.id} needs re-authorization")
        values = secrets.reveal()
        if not self._needs_token(record, values):
            return record, secrets
        cc = record.config.get("grant_type") == CLIENT_CREDENTIALS
        if not cc and not values.get("refresh_token"):
            expires = record.token_expires_at
            if values.get("access_token") and (expires is None or expires > self._clock()):
                return record, secrets  # cannot refresh; still valid
            raise FailedPrecondition(f"connection {record.id} needs re-authorization (no refresh token)")
        task = self._refresh_task(record.tenant, record.id)
        expires = record.token_expires_at
        if values.get("access_token") and expires is not None:
            valid_for = (expires - self._clock()).total_seconds()
            if valid_for > 0:
                done, _ = await asyncio.wait({task}, timeout=min(self.settings.refresh_wait, valid_for))
                if not done:
                    return record, secrets  # still valid; the refresh goes on and stores its token
        refreshed = await asyncio.shield(task)
        if refreshed.reauth_required_at is not None:
            raise FailedPrecondition(f"connection {record.id} needs re-authorization")
        return refreshed, open_secrets(self._keyring, refreshed)

    async def after_rejection(
        self, record: ConnectionRecord, rejected_token: str
    ) -> tuple[ConnectionRecord, SecretFields]:
        """A new token after an API answered 401 to `rejected_token`, however long it had left.

        Single-flight like `fresh`: a refresh under way (here, or on another replica, which
        stored a different token by the time the lock is ours) is awaited, not repeated.
        """
        refreshed = await self._single_flight(record.tenant, record.id, rejected_token)
        if refreshed.reauth_required_at is not None:
            raise FailedPrecondition(f"connection {record.id} needs re-authorization")
        return refreshed, open_secrets(self._keyring, refreshed)

    async def _single_flight(self, tenant: str, connection_id: str, rejected: str = "") -> ConnectionRecord:
        # Shielded: a caller that gives up must not cancel the refresh others are waiting for.
        return await asyncio.shield(self._refresh_task(tenant, connection_id, rejected))

    def _refresh_task(
        self, tenant: str, connection_id: str, rejected: str = ""
    ) -> asyncio.Task[ConnectionRecord]:
        """The refresh under way for the connection, started if there is none."""
        key = (tenant, connection_id)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._refresh_as_the_only_replica(tenant, connection_id, rejected))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._refresh_ended(key, done))
        return task

    def _refresh_ended(self, key: tuple[str, str], task: asyncio.Task[ConnectionRecord]) -> None:
        self._inflight.pop(key, None)
        # Retrieved here, as a refresh nobody waited for to the end may fail: its failure is
        # audited and logged by the refresh itself.
        if not task.cancelled():
            task.exception()

    async def _refresh_as_the_only_replica(
        self, tenant: str, connection_id: str, rejected: str = ""
    ) -> ConnectionRecord:
        # Other replicas wait here; `_refresh` re-reads the row under the lock and finds
        # the token the holder stored, so the token endpoint is called once, not per replica.
        async with self._coordination.refresh_lock(tenant, connection_id):
            return await self._refresh(tenant, connection_id, rejected)

    async def _refresh(self, tenant: str, connection_id: str, rejected: str = "") -> ConnectionRecord:
        """Refresh the stored token if it is due, or if it is still `rejected` (an API refused it)."""
        record = await self._connections.get_connection(tenant, connection_id)
        if record is None or not record.live or record.presented_status is not ConnectionStatus.ACTIVE:
            raise FailedPrecondition(f"connection {connection_id} cannot be refreshed in its current state")
        event = self._system_event(record, "oauth.refresh", Outcome.FAILED)
        secrets = (await open_secrets_audited(self._keyring, record, self._audit, event)).reveal()
        refused = bool(rejected) and secrets.get("access_token") == rejected
        if not refused and not self._needs_token(record, secrets):
            return record  # another refresh (here or in another process) got there first
        provider = oauth.provider_for(record.provider, record.config)
        client = _client(record.config, secrets)
        cc = record.config.get("grant_type") == CLIENT_CREDENTIALS
        failure, refused = "", False
        for delay in (0.0, *self.settings.retry_delays):
            await asyncio.sleep(delay)
            now = self._clock()
            try:
                if cc:
                    scopes = list(provider.default_scopes)
                    tokens = await oauth.client_credentials_token(
                        self._egress,
                        provider,
                        client,
                        scopes,
                        now=now,
                        default_lifetime=self.settings.default_lifetime,
                    )
                else:
                    tokens = await oauth.refresh(
                        self._egress,
                        provider,
                        client,
                        secrets["refresh_token"],
                        now=now,
                        default_lifetime=self.settings.default_lifetime,
                    )
            except oauth.OAuthError as exc:
                # A client credentials grant has no user grant to lose: signing in again is no cure,
                # whatever the provider calls its refusal.
                if exc.kind == "invalid_grant" and not cc:
                    return await self._mark_expired(record, exc, secrets)
                failure = exc.error or exc.kind
                if exc.kind != "transient":
                    refused = True
                    break
                continue
            except (Blocked, DnsFailure) as exc:
                failure = type(exc).__name__
                break
            metrics.OAUTH_REFRESHES.labels("refreshed").inc()
            return await self._store_tokens(record, secrets, tokens, "oauth.refresh", SYSTEM_ACTOR, "")
        return await self._refresh_failed(record, failure, refused=refused)

    async def _refresh_failed(
        self, record: ConnectionRecord, failure: str, *, refused: bool = False
    ) -> ConnectionRecord:
        """A refresh that could not complete: keep serving a still-valid token, else say why not.

        `refused`: the provider answered with an error that retrying will not change (the client,
        its secret or its scopes): FAILED_PRECONDITION naming the error; otherwise UNAVAILABLE.
        """
        now = self._clock()
        await self._audit.append(self._system_event(record, "oauth.refresh", Outcome.FAILED, failure))
        log.warning("oauth_refresh_failed", connection_id=record.id, reason=failure)
        if self._on_refresh_failure is not None:
            self._on_refresh_failure(record, failure)
        expires = record.token_expires_at
        if expires is not None and expires > now:
            metrics.OAUTH_REFRESHES.labels("served_stale").inc()
            return record
        metrics.OAUTH_REFRESHES.labels("failed").inc()
        if refused:
            raise FailedPrecondition(
                f"the provider refused to issue a token for connection {record.id} ({failure}); check its"
                " client_id, client_secret, token_auth_method and scopes"
            )
        raise Unavailable(
            f"the token of connection {record.id} expired and the provider could not refresh it"
        )

    def _system_event(
        self, record: ConnectionRecord, action: str, outcome: Outcome, reason: str = "", **details: str
    ) -> AuditEvent:
        now = self._clock()
        return system_event(now, SYSTEM_ACTOR, record.tenant, record.id, action, outcome, reason, details)

    async def _mark_expired(
        self, record: ConnectionRecord, refusal: oauth.OAuthError, secrets: Mapping[str, str]
    ) -> ConnectionRecord:
        """The provider refused the refresh token: the connection needs re-authorization.

        Why is kept on the row for the admin summary: the error code, and the description scrubbed
        once more of every secret the connection holds (the request did not carry the access token,
        but the provider issued it and may quote it).
        """
        now = self._clock()
        reason = refusal.error or refusal.kind
        why = ReauthReason(
            "refresh_refused", refusal.error or "", Scrubber(secrets.values()).fragments(refusal.description)
        )
        marked = replace(
            record, reauth_required_at=now, reauth_reason=why, version=record.version + 1, updated_at=now
        )
        event = self._system_event(record, "oauth.expired", Outcome.FAILED, reason)
        try:
            await self._connections.replace_connection(marked, record.version, event)
        except Aborted:
            latest = await self._connections.get_connection(record.tenant, record.id)
            return latest or record
        metrics.OAUTH_REFRESHES.labels("expired").inc()
        log.warning("oauth_connection_expired", connection_id=record.id, reason=reason)
        return marked

    async def _store_tokens(
        self,
        record: ConnectionRecord,
        old_secrets: Mapping[str, str],
        tokens: oauth.TokenSet,
        action: str,
        actor: str,
        request_id: str,
    ) -> ConnectionRecord:
        """Seal the new tokens onto the row with a compare-and-swap; never overwrite a newer token."""
        used_refresh_token = old_secrets.get("refresh_token")
        for _ in range(3):
            now = self._clock()
            secrets = SecretFields(token_secrets(old_secrets, tokens))
            updated = replace(
                record,
                config=token_config(record.config, tokens),
                secret_fields=secrets.names,
                secret_version=record.secret_version + 1,
                version=record.version + 1,
                updated_at=now,
                reauth_required_at=None,
                reauth_reason=None,
            )
            updated = replace(updated, sealed=seal(self._keyring, secrets, updated))
            details = {
                "expiry_source": tokens.expiry_source,
                "rotated": str(bool(tokens.refresh_token)).lower(),
            }
            if record.reauth_required_at is not None:
                details["recovered"] = "true"
            if action == "oauth.refresh" and used_refresh_token:
                # Which token was spent, without the token: a keyed fingerprint (service/fingerprint.py).
                details["refresh_token_fp"] = fingerprint(self._keyring.active, used_refresh_token)
            event = AuditEvent(
                time=now,
                tenant=record.tenant,
                actor=actor,
                action=action,
                outcome=Outcome.SUCCEEDED,
                connection_id=record.id,
                request_id=request_id,
                details=details,
            )
            try:
                await self._connections.replace_connection(updated, record.version, event)
                return updated
            except Aborted:
                latest = await self._connections.get_connection(record.tenant, record.id)
                if latest is None or latest.sealed is None:
                    raise
                latest_secrets = open_secrets(self._keyring, latest).reveal()
                if latest_secrets.get("refresh_token") != used_refresh_token and action == "oauth.refresh":
                    return latest  # someone else refreshed: theirs is newer, ours is dropped
                # Another kind of change won (labels, a rename): put our tokens on top of it.
                record, old_secrets = latest, latest_secrets
        raise Unavailable(f"connection {record.id} kept changing while its token was being stored; retry")

    # ------------------------------------------------------------ background

    def start(self) -> None:
        """Refresh tokens approaching expiry in the background, so most Resolves never wait."""
        self._background = asyncio.create_task(self._refresh_periodically())

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval_seconds)
            await self.refresh_due()

    async def refresh_due(self) -> int:
        """Refresh every token expiring within twice the margin; returns how many were attempted."""
        now = self._clock()
        due = await self._connections.list_expiring_tokens(now + 2 * self.settings.refresh_margin, limit=100)
        for tenant, connection_id in due:
            try:
                await self._single_flight(tenant, connection_id)
            except Exception as exc:  # one bad connection must not stop the others
                log.warning(
                    "oauth_background_refresh_failed", connection_id=connection_id, error=type(exc).__name__
                )
        await self._oauth_states.delete_expired_oauth_states(now)
        return len(due)

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
        for task in list(self._inflight.values()):
            with contextlib.suppress(Exception):
                await task
