"""OAuth2 tokens kept fresh: single-flight refresh, expiry, and the background refresher.

Tokens live in the connection's sealed secrets (`access_token`, `refresh_token`, next to
`client_secret`); `expires_at`, the scopes asked for (`scopes`) and those granted
(`granted_scopes`) are plain config. The rules that keep a connection alive:

- one refresh at a time per connection in this process (concurrent callers share it), one
  process at a time across replicas (`Coordination.refresh_lock`; the waiters then re-read the row
  and use the holder's token), and a compare-and-swap on the row version so a writer that
  lost a race never overwrites a newer token;
- a rotated refresh token is stored durably before any caller sees the new access token;
- expiry is never unknown (`expires_in`, else the JWT `exp`, else a default lifetime);
- `invalid_grant` marks an authorization-code connection expired (re-authorize); a client
  credentials connection has nothing to re-authorize, so its refusals, like `invalid_client` or
  `invalid_scope` for any connection, are FAILED_PRECONDITION naming the error and leave the
  connection as it is; transient failures are retried; while the current token is valid it is
  still served, and a caller holding it waits `refresh_wait` at most for a refresh under way.

The authorization flows that obtain the first tokens are `service.oauth`; this module needs
nothing of them, so every service that uses a token (Resolve, proxy, tests of linked MCP
connections) is built before them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from broker import metrics, oauth
from broker.crypto import Keyring
from broker.egress import Blocked, DnsFailure, EgressPolicy
from broker.errors import Aborted, FailedPrecondition, Unavailable
from broker.model import AuditEvent, ConnectionRecord, ConnectionStatus, Outcome, ReauthReason
from broker.scrub import Scrubber
from broker.sensitive import SecretFields
from broker.service.audit import AuditLog
from broker.service.context import system_event
from broker.service.fingerprint import fingerprint
from broker.service.sealing import open_secrets, open_secrets_audited, seal
from broker.store import ConnectionStore, Coordination, OAuthStateStore

log = structlog.get_logger("broker.oauth")

SYSTEM_ACTOR = "broker:oauth"
CLIENT_CREDENTIALS = "client_credentials"
# Why a connection whose provider issued no refresh token needs signing in again once its token lapsed.
NO_REFRESH_TOKEN = "no_refresh_token"  # noqa: S105 (a reason, not a credential)


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


def oauth_client(config: Mapping[str, Any], secrets: Mapping[str, str]) -> oauth.ClientCredentials:
    """The client id from the config and the client secret, if any, from the secrets."""
    return oauth.ClientCredentials(str(config.get("client_id", "")), secrets.get("client_secret", ""))


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


def _needs_reauthorization(record: ConnectionRecord) -> FailedPrecondition:
    why = record.reauth_reason
    cause = " (no refresh token)" if why is not None and why.reason == NO_REFRESH_TOKEN else ""
    return FailedPrecondition(f"connection {record.id} needs re-authorization{cause}")


class TokenRefresher:
    """Fresh tokens for oauth2 connections, refreshed once however many callers and replicas ask."""

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
        on_refresh_failure: Callable[[ConnectionRecord, str], None] | None = None,
    ) -> None:
        self._connections = connections
        # Only to drop pending authorizations past their expiry in the background pass.
        self._oauth_states = oauth_states
        self._coordination = coordination
        self._keyring = keyring
        self._audit = audit
        self._egress = egress
        self._clock = clock
        self.settings = settings
        self._inflight: dict[tuple[str, str], asyncio.Task[ConnectionRecord]] = {}
        self._background: asyncio.Task[None] | None = None
        # The security monitor's oauth_refresh_failures rule.
        self._on_refresh_failure = on_refresh_failure

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

    def _still_valid(self, record: ConnectionRecord, secrets: Mapping[str, str]) -> bool:
        """There is an access token, and it has not lapsed (or says no end)."""
        expires = record.token_expires_at
        return bool(secrets.get("access_token")) and (expires is None or expires > self._clock())

    async def fresh(
        self, record: ConnectionRecord, secrets: SecretFields
    ) -> tuple[ConnectionRecord, SecretFields]:
        """The record and secrets with a token good for at least the refresh margin."""
        if record.reauth_required_at is not None:
            raise _needs_reauthorization(record)
        values = secrets.reveal()
        if not self._needs_token(record, values):
            return record, secrets
        cc = record.config.get("grant_type") == CLIENT_CREDENTIALS
        if not cc and not values.get("refresh_token") and self._still_valid(record, values):
            return record, secrets  # cannot refresh; still valid (lapsed: the refresh marks it expired)
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
            raise _needs_reauthorization(refreshed)
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
            raise _needs_reauthorization(refreshed)
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
        cc = record.config.get("grant_type") == CLIENT_CREDENTIALS
        if not cc and not secrets.get("refresh_token"):
            # The provider issued no refresh token (OpenID Connect without offline_access, say): a
            # token that lapsed, or that an API refused, leaves only signing in again.
            if not refused and self._still_valid(record, secrets):
                return record  # served until it lapses
            return await self._mark_expired(record, ReauthReason(NO_REFRESH_TOKEN), NO_REFRESH_TOKEN)
        provider = oauth.provider_for(record.provider, record.config)
        client = oauth_client(record.config, secrets)
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
                    # Kept for the admin summary: the provider's code, and its description scrubbed
                    # once more of every secret the connection holds (the request did not carry
                    # the access token, but the provider issued it and may quote it).
                    description = Scrubber(secrets.values()).fragments(exc.description)
                    why = ReauthReason("refresh_refused", exc.error or "", description)
                    return await self._mark_expired(record, why, exc.error or exc.kind)
                failure = exc.error or exc.kind
                if exc.kind != "transient":
                    refused = True
                    break
                continue
            except (Blocked, DnsFailure) as exc:
                failure = type(exc).__name__
                break
            metrics.OAUTH_REFRESHES.labels("refreshed").inc()
            return await self.store_tokens(record, secrets, tokens, "oauth.refresh", SYSTEM_ACTOR, "")
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
        self, record: ConnectionRecord, why: ReauthReason, reason: str
    ) -> ConnectionRecord:
        """The connection needs re-authorization, for `why` (kept on the row for the admin summary)."""
        now = self._clock()
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

    async def store_tokens(
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
                if latest.config.get("resource") != record.config.get("resource"):
                    # Our tokens were asked for the resource indicators the connection listed then
                    # (RFC 8707); the change that won lists others and dropped the tokens it held
                    # (`ConnectionService.update`). Putting ours on top would let an MCP connection
                    # linked to it (`service.linked`) send them to a server they were not asked for.
                    if action == "oauth.refresh":  # a client credentials token: the next use asks anew
                        raise Unavailable(
                            f"the resource of connection {record.id} changed while its token was being"
                            " refreshed; retry"
                        ) from None
                    raise FailedPrecondition(
                        f"the resource of connection {record.id} changed while it was being authorized;"
                        " start the authorization again"
                    ) from None
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

    async def refresh_due(self, batch: int = 100) -> int:
        """Refresh up to `batch` tokens expiring within twice the margin, those still valid first;
        returns how many were attempted.

        Lapsed tokens come after: a connection whose refresh keeps failing keeps its lapsed token,
        and however many such connections there are (of any tenant), they must not take the turns
        of tokens that can still be renewed before anyone waits for them.
        """
        now = self._clock()
        horizon = now + 2 * self.settings.refresh_margin
        due = await self._connections.list_expiring_tokens(horizon, limit=batch, after=now)
        if len(due) < batch:
            due += await self._connections.list_expiring_tokens(now, limit=batch - len(due))
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
