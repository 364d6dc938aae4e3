"""Domain values shared by the service, store and API layers. No I/O, no grpc.

Times are timezone-aware UTC datetimes. Secret values never live on these records:
a `ConnectionRecord` carries only the sealed envelope and the *names* of its
secret fields.
"""

from __future__ import annotations

import enum
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from broker.catalog import MAX_JSON_DEPTH, destination_digest
from broker.crypto.envelope import Binding, Sealed


class Role(enum.StrEnum):
    ADMIN = "admin"
    EXECUTOR = "executor"


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller: parsed from the URI SAN of its client certificate."""

    trust_domain: str
    tenant: str
    role: Role
    name: str
    # Built once: a principal is parsed once per certificate (`api.identity`), and its id is the
    # actor of every call, a key of the monitor's state and of every audit event.
    spiffe_id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        spiffe_id = f"spiffe://{self.trust_domain}/tenant/{self.tenant}/{self.role.value}/{self.name}"
        object.__setattr__(self, "spiffe_id", sys.intern(spiffe_id))  # frozen: set once, here

    def __str__(self) -> str:
        return self.spiffe_id


class ConnectionStatus(enum.StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    DELETED = "deleted"
    # An OAuth2 connection the provider refused to refresh: it needs re-authorization.
    EXPIRED = "expired"
    # Stopped by the security monitor until an admin reinstates it.
    SUSPENDED = "suspended"


class TestStatus(enum.StrEnum):
    __test__ = False  # not a pytest test class

    UNTESTED = "untested"
    SUCCESS = "success"
    FAILED = "failed"


class TestCategory(enum.StrEnum):
    """Why a connection test ended as it did."""

    __test__ = False

    OK = "ok"
    TIMEOUT = "timeout"
    DNS_FAILURE = "dns_failure"
    CONNECTION_REFUSED = "connection_refused"
    TLS_ERROR = "tls_error"
    AUTH_FAILED = "auth_failed"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    PROTOCOL_ERROR = "protocol_error"
    BLOCKED_BY_POLICY = "blocked_by_policy"
    INVALID_CONFIG = "invalid_config"
    UNEXPECTED_RESPONSE = "unexpected_response"
    UNSUPPORTED = "unsupported"


class TestStage(enum.StrEnum):
    """How far a connection test got."""

    __test__ = False

    RESOLVE_ADDRESS = "resolve_address"
    CONNECT = "connect"
    TLS = "tls"
    AUTHENTICATE = "authenticate"
    SAMPLE_OPERATION = "sample_operation"


@dataclass(frozen=True, slots=True)
class TestResult:
    """A connection test's outcome. `message` and `details` are scrubbed of secrets before storing."""

    __test__ = False

    success: bool
    category: TestCategory
    stage: TestStage
    message: str
    details: dict[str, str] = field(default_factory=dict)
    verified: tuple[str, ...] = ()
    not_verified: tuple[str, ...] = ()
    latency_ms: int = 0
    tested_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ReauthReason:
    """Why a connection needs re-authorization (it shows as EXPIRED; since `reauth_required_at`).

    `reason` is the broker's token (`refresh_refused`: the provider refused the refresh token),
    `error` the provider's error code when it sent a well-formed one, `description` its
    error_description, scrubbed of every secret the connection holds or the request carried and
    cut short. Comes back to admins: nothing else from the provider is kept.
    """

    reason: str
    error: str = ""
    description: str = ""


def json_depth(value: Any) -> int:
    """How deep objects and arrays nest in `value` (JSON; 0 for a scalar), counted no further
    than one past `MAX_JSON_DEPTH`."""
    deepest, level = 0, [value]
    while deepest <= MAX_JSON_DEPTH:
        containers = [node for node in level if isinstance(node, dict | list)]
        if not containers:
            break
        deepest += 1
        level = [item for node in containers for item in (node.values() if isinstance(node, dict) else node)]
    return deepest


@dataclass(frozen=True, slots=True)
class McpTool:
    """A tool an MCP server offers; `definition_hash` changes when anything about it changes.

    Beside name, description and input schema, what the server says of the tool, as the MCP
    spec spells it: `title` ("" when not given), `annotations` (the hints `title`, `readOnlyHint`,
    `destructiveHint`, `idempotentHint`, `openWorldHint`, only those the server set),
    `output_schema`, and `execution` (`taskSupport`); None when the server sent none.
    """

    name: str
    description: str
    input_schema: dict[str, Any]
    definition_hash: str
    title: str = ""
    annotations: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    execution: dict[str, Any] | None = None

    @property
    def task_support(self) -> str:
        """`execution.taskSupport` as the server said it; "" when it did not (MCP: "forbidden")."""
        value = (self.execution or {}).get("taskSupport")
        return value if isinstance(value, str) else ""

    @property
    def not_callable(self) -> str:
        """Why the broker will not call this tool; "" when it may."""
        if self.task_support == "required":
            return (
                "the server runs this tool only as an MCP task (execution.taskSupport is"
                ' "required"), and the broker does not run MCP tasks'
            )
        return ""


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """A stored connection as the store holds it: config in clear, secrets sealed.

    `version` increments on every change and is the etag. `secret_version`
    increments whenever the secrets are re-sealed (it is bound into the AAD).
    `sealed` is None only after a purge destroyed the wrapped data key.
    """

    id: str
    tenant: str
    name: str
    type: str
    provider: str
    config: dict[str, Any]
    secret_fields: tuple[str, ...]
    labels: dict[str, str]
    status: ConnectionStatus
    version: int
    secret_version: int
    sealed: Sealed | None
    created_at: datetime
    updated_at: datetime
    created_by: str
    deleted_at: datetime | None = None
    purged_at: datetime | None = None
    last_used_at: datetime | None = None
    last_tested_at: datetime | None = None
    test_status: TestStatus = TestStatus.UNTESTED
    last_test: TestResult | None = None
    # Set when an OAuth2 refresh was refused (invalid_grant); cleared by re-authorization.
    reauth_required_at: datetime | None = None
    # Why, when `reauth_required_at` is set (None on rows expired before the reason was kept).
    reauth_reason: ReauthReason | None = None
    # Set by the security monitor; cleared only by ReinstateConnection.
    suspended_at: datetime | None = None
    # What the sealed secrets are bound to: this row, its secret version and where the
    # secrets may be sent (`catalog.destination_digest`). Derived once per record, so a
    # cached record costs Resolve nothing.
    binding: Binding = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        digest = destination_digest(self.type, self.provider, self.config)
        binding = Binding(self.tenant, self.id, self.secret_version, digest)
        object.__setattr__(self, "binding", binding)  # frozen: set once, here

    @property
    def destination(self) -> bytes:
        """The digest of where the secrets may be sent."""
        return self.binding.destination

    @property
    def etag(self) -> str:
        return f"v{self.version}"

    @property
    def live(self) -> bool:
        """Not soft-deleted (it may still be revoked)."""
        return self.deleted_at is None

    @property
    def dynamic(self) -> bool:
        """A dynamic database connection: Resolve makes a fresh database user (a lease) with the
        stored administrator's credentials, which are never released."""
        return self.type == "database" and self.config.get("dynamic") is True

    @property
    def presented_status(self) -> ConnectionStatus:
        """What admins see: deleted, revoked, suspended, expired (needs re-authorization), else active."""
        if self.deleted_at is not None:
            return ConnectionStatus.DELETED
        if self.status is ConnectionStatus.REVOKED:
            return ConnectionStatus.REVOKED
        if self.suspended_at is not None:
            return ConnectionStatus.SUSPENDED
        if self.reauth_required_at is not None:
            return ConnectionStatus.EXPIRED
        return ConnectionStatus.ACTIVE

    @property
    def token_expires_at(self) -> datetime | None:
        """When the released secret stops working: an OAuth2 access token's `expires_at`."""
        return self._oauth2_time("expires_at")

    @property
    def token_issued_at(self) -> datetime | None:
        """When the broker obtained the OAuth2 access token (`issued_at`), if recorded."""
        return self._oauth2_time("issued_at")

    def _oauth2_time(self, key: str) -> datetime | None:
        value = self.config.get(key) if self.type == "oauth2" else None
        if not isinstance(value, str):
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo is not None else None


class GrantMode(enum.StrEnum):
    RESOLVE = "resolve"  # the secret is released to the executor (Resolve)
    PROXY = "proxy"  # the broker makes calls with it for the executor; Resolve is refused


# Request paths a proxy grant's path prefixes never match: dot segments (also with `;params`,
# which Tomcat and Spring strip before resolving them: `/a/..;/b` is `/b` there, and with the `;`
# percent-encoded, which they decode first), and encoded dots, slashes, backslashes or percent
# signs encoding those (`%252e`: a server or a proxy in front of it that decodes twice), which an
# upstream may resolve to a path outside the prefix. So are other spellings older or lenient
# decoders read as a dot or a slash: IIS's `%u002e`, overlong UTF-8 (`%c0%ae`; `%c0`, `%c1` and
# `%e0%80` begin no valid UTF-8), the full-width dot and solidus (`%ef%bc%8e`, `%ef%bc%8f`: U+FF0E
# and U+FF0F, which Unicode normalisation makes `.` and `/`), and encoded control characters (`%00`
# ends a path in C-based servers, `%09` is dropped by some), each also double-encoded.
_AMBIGUOUS_PATH = re.compile(
    r"(^|/)\.{1,2}((;|%3b)[^/]*)?(/|$)|\\"
    r"|%(25)?(2e|2f|5c|u|c0|c1|e0%(25)?80|ef%(25)?bc%(25)?8[ef]|[01][0-9a-f]|7f)"
    r"|%25(25|3b)",
    re.IGNORECASE,
)


def ambiguous_path(path: str) -> bool:
    """True for a path that may mean another path to the upstream (see `_AMBIGUOUS_PATH`)."""
    return _AMBIGUOUS_PATH.search(path) is not None


def plain_path(path: str, most: int) -> bool:
    """An absolute path of at most `most` printable ASCII characters, with no space, query,
    fragment or anything `ambiguous_path` refuses: what proxied calls and grant scopes take."""
    return (
        path.startswith("/")
        and len(path) <= most
        and path.isascii()
        and path.isprintable()
        and not any(c in path for c in " ?#")
        and not ambiguous_path(path)
    )


@dataclass(frozen=True, slots=True)
class GrantScope:
    """What a proxy grant allows; an empty tuple allows any. Checked before any key is unwrapped.

    `methods` (upper case) and `path_prefixes` apply to HTTP calls: a prefix matches the path
    itself and what lies below it ("/repos" matches "/repos" and "/repos/x", not "/reposx").
    `tools` names the MCP tools that may be called.
    """

    methods: tuple[str, ...] = ()
    path_prefixes: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.methods or self.path_prefixes or self.tools)

    def allows_request(self, method: str, path: str) -> bool:
        if self.methods and method.upper() not in self.methods:
            return False
        if not self.path_prefixes:
            return True
        if ambiguous_path(path):
            return False
        return any(
            path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/")
            for prefix in self.path_prefixes
        )

    def allows_tool(self, name: str) -> bool:
        return not self.tools or name in self.tools


UNSCOPED = GrantScope()


@dataclass(frozen=True, slots=True)
class Grant:
    """Lets one executor principal (a SPIFFE id) use one connection until `expires_at`: by
    Resolve (the secret is released) or, in PROXY mode, only through calls the broker makes."""

    tenant: str
    connection_id: str
    principal: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    mode: GrantMode = GrantMode.RESOLVE
    scope: GrantScope = UNSCOPED

    def active_at(self, now: datetime) -> bool:
        return self.expires_at is None or now < self.expires_at


class Outcome(enum.StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One line of the audit trail. Never holds a secret value. `id` is set by the store."""

    time: datetime
    tenant: str
    actor: str
    action: str
    outcome: Outcome
    connection_id: str = ""
    reason: str = ""
    request_id: str = ""
    peer: str = ""
    details: dict[str, str] = field(default_factory=dict)
    id: int = 0
    # The hash chain, set by the store when the event is appended.
    hash: str = ""
    prev_hash: str = ""


@dataclass(frozen=True, slots=True)
class PendingAuthorization:
    """An authorization-code flow between Begin and Complete, keyed by a hash of its state.

    `sealed` holds the PKCE verifier and, for a new connection, the draft (with its
    client secret); it is bound to `"oauth-state:" + state_hash` like a connection's secrets.
    """

    state_hash: str
    tenant: str
    actor: str
    connection_id: str
    created_at: datetime
    expires_at: datetime
    sealed: Sealed


class LeaseState(enum.StrEnum):
    """Where a lease (a database user made for one executor) is in its life."""

    CREATING = "creating"  # the row is written first; the user may or may not exist yet
    ACTIVE = "active"  # the user exists and was handed to the executor
    REVOKING = "revoking"  # the user must be dropped: queued, retried until it is
    REVOKED = "revoked"  # the user was dropped (or never created)


@dataclass(frozen=True, slots=True)
class Lease:
    """A database user the broker created for one executor on a dynamic connection. The row
    is the revocation queue too: `next_attempt_at` says when a drop is due again after a
    failure, `claimed_until` which replica works on it now. Never holds the password."""

    tenant: str
    id: str
    connection_id: str
    principal: str  # the executor the credentials went to
    username: str
    state: LeaseState
    created_at: datetime
    expires_at: datetime  # when the user stops being valid (moved by renewals)
    max_expires_at: datetime  # the most a renewal may reach
    run_id: str = ""
    revoke_reason: str = ""  # expired, revoked, grant_revoked, connection_revoked, ...
    attempts: int = 0  # failed drops so far
    last_error: str = ""  # the reason token of the last failed drop (never server text)
    next_attempt_at: datetime | None = None
    claimed_until: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LeaseFilter:
    """Which leases a listing or a bulk revocation means; unset fields match everything."""

    connection_id: str = ""
    principal: str = ""
    run_id: str = ""
    username_prefix: str = ""
    state: LeaseState | None = None
    lease_id: str = ""
    live: bool = False  # only leases still being created or active (whose user may exist)


@dataclass(frozen=True, slots=True)
class ConnectionFilter:
    """What `ListConnections` narrows by. `status=None` means active and revoked."""

    type: str = ""
    provider: str = ""
    status: ConnectionStatus | None = None
    labels: dict[str, str] = field(default_factory=dict)
    name_prefix: str = ""


@dataclass(frozen=True, slots=True)
class GrantFilter:
    connection_id: str = ""
    principal: str = ""


@dataclass(frozen=True, slots=True)
class AuditFilter:
    connection_id: str = ""
    actor: str = ""
    action: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class AuditChainReport:
    """The result of walking the audit hash chain: ids and a generic problem, never contents.

    Seals (`AuditSeal`) met on the way are checked too: `seals_checked` matched,
    `seals_unverifiable` were made under a master key no longer configured, and
    `unsealed_events` are the newest events no seal covers yet. `newest_seal` is the seal of
    the highest id (None without one), for the judgement of its age (`service/auditseal.py`).
    """

    ok: bool
    events_checked: int
    first_broken_id: int = 0
    problem: str = ""
    seals_checked: int = 0
    seals_unverifiable: int = 0
    unsealed_events: int = 0
    newest_seal: AuditSeal | None = None


@dataclass(frozen=True, slots=True)
class AuditSeal:
    """A MAC over the audit chain's tail (`last_id`, `last_hash`) under a key derived from the
    master key `kek_id`: whoever rewrites the chain without that key cannot make it match.

    `format` 2 MACs `sealed_at` too, so the newest seal's age can be trusted; format 1 seals
    (before seals were re-signed every interval) MAC the tail only."""

    last_id: int
    last_hash: str
    kek_id: str
    mac: str
    sealed_at: datetime
    format: int = 2


@dataclass(frozen=True, slots=True)
class AuditCheckpoint:
    """What a pruning run leaves of the events it deleted: the id and hash of the last one, how
    many, and the time of the newest. `kek_id` and `mac` sign all of it under a key derived from
    a master key (None on checkpoints from before they were signed); `id` is the row's."""

    id: int
    last_id: int
    last_hash: str
    pruned_count: int
    created_at: datetime
    newest_pruned_at: datetime | None = None
    kek_id: str | None = None
    mac: str | None = None


@dataclass(frozen=True, slots=True)
class AuditAnchors:
    """What the audit chain is anchored to, read together: its tail, the newest seal, the newest
    checkpoint, and the hashes the chain now holds at the ids asked for and at the newest seal's
    (an id whose event is gone has none)."""

    tail_id: int
    tail_hash: str
    seal: AuditSeal | None
    checkpoint: AuditCheckpoint | None
    hashes: dict[int, str]


class AnchorKeys(Protocol):
    """How the store judges the audit chain's anchors and signs checkpoints, with keys it never
    holds (`service/auditseal.Anchors`)."""

    def seal(self, seal: AuditSeal) -> bool | None:
        """True (its MAC verifies), False (it does not), None (its key is not configured)."""

    def checkpoint(self, checkpoint: AuditCheckpoint) -> str:
        """The problem with a checkpoint the chain continues from; "" when there is none."""

    def sign_checkpoint(self, checkpoint: AuditCheckpoint) -> AuditCheckpoint:
        """`checkpoint` with its signature (`kek_id`, `mac`)."""


_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_ID = re.compile(r"^[a-z]{1,12}_[0-9a-z]{26}$")


def shown_id(value: str) -> str:
    """`value` if it has the shape of one of our ids, else a placeholder.

    Errors name the id they could not find; input that is not an id (a pasted
    secret, say) is not echoed back.
    """
    return value if _ID.fullmatch(value) else "(not a valid id)"


def new_id(prefix: str, now_ms: int | None = None) -> str:
    """A sortable unique id: prefix, 48-bit millisecond time and 80 random bits (ULID layout)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return prefix + "_" + "".join(reversed(chars))


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """Something the security monitor noticed, and what it did. Never holds a secret value.

    `rule` is one of failed_tests, denied_burst, volume_spike, new_principal_peer,
    oauth_refresh_failures, wrong_role_burst, decrypt_failed, mcp_tool_changed (or
    rate_limited); `action` is alerted, connection_suspended or principal_blocked. `id` is
    set by the store.
    """

    time: datetime
    tenant: str
    rule: str
    severity: str
    action: str
    principal: str = ""
    connection_id: str = ""
    peer: str = ""
    details: dict[str, str] = field(default_factory=dict)
    id: int = 0


@dataclass(frozen=True, slots=True)
class SecurityEventFilter:
    rule: str = ""
    connection_id: str = ""
    principal: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class SeenFact:
    """A fact the monitor remembers: `kind` "principal" (subject a connection id, object a
    principal) or "peer" (subject a principal, object a peer host)."""

    tenant: str
    kind: str
    subject: str
    object: str
    first_seen: datetime
