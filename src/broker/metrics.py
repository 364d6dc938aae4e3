"""Prometheus metrics: one registry, served on its own port (`[metrics] listen`).

No label ever holds a secret or an unbounded value: no connection names, ids or
principals. Labels are methods, status codes, connection types, outcomes and
reasons from fixed sets.

Under `broker serve --workers N` each worker runs in prometheus-client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by the supervisor in `broker.workers`, which serves the one
endpoint): counters and histograms are summed over the workers, dead ones included; each gauge
says below how the live workers' values combine (`multiprocess_mode`, ignored in one process).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

RPCS = Counter(
    "broker_rpcs",
    "RPCs handled, by service, method and status code.",
    ["service", "method", "code"],
    registry=REGISTRY,
)
MALFORMED_REQUESTS = Counter(
    "broker_malformed_requests",
    "Requests whose body did not decode as the method's message, by service and method.",
    ["service", "method"],
    registry=REGISTRY,
)
RPC_SECONDS = Histogram(
    "broker_rpc_duration_seconds",
    "RPC latency, by service and method.",
    ["service", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
RESOLVES = Counter(
    "broker_resolves",
    "Resolve outcomes: allowed, or denied/failed by reason.",
    ["outcome", "reason"],
    registry=REGISTRY,
)
PROXY_CALLS = Counter(
    "broker_proxy_calls",
    "Calls made through the proxy: allowed, or denied/failed by reason.",
    ["outcome", "reason"],
    registry=REGISTRY,
)
RESOLVE_CACHE = Counter(
    "broker_resolve_cache_lookups",
    "Resolve cache lookups, by result (hit or miss).",
    ["result"],
    registry=REGISTRY,
)
RESOLVE_CACHE_EVICTIONS = Counter(
    "broker_resolve_cache_evictions",
    "Connections the Resolve cache forgot to stay within resolve.cache_entries (least recently used first).",
    registry=REGISTRY,
)
RESOLVE_CACHE_ENTRIES = Gauge(
    "broker_resolve_cache_entries",
    "Connections held by the Resolve cache (with several workers: the sum of their caches).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
CONNECTION_TESTS = Counter(
    "broker_connection_tests",
    "Connection tests, by type and category.",
    ["type", "category"],
    registry=REGISTRY,
)
OAUTH_REFRESHES = Counter(
    "broker_oauth_refreshes",
    "OAuth2 token refreshes, by outcome (refreshed, expired, failed, served_stale).",
    ["outcome"],
    registry=REGISTRY,
)
AUDIT_WRITE_SECONDS = Histogram(
    "broker_audit_write_duration_seconds",
    "Time to durably write one group-committed batch of audit events.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
    registry=REGISTRY,
)
AUDIT_BATCH_SIZE = Histogram(
    "broker_audit_batch_size",
    "Audit events per group-committed batch.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "broker_rate_limited", "Calls refused by a rate limit, by class of call.", ["kind"], registry=REGISTRY
)
DENIALS_NOT_AUDITED = Counter(
    "broker_denials_not_audited",
    "Refused calls only counted into a per-window audit summary, not audited one by one, by reason.",
    ["reason"],
    registry=REGISTRY,
)
SECURITY_EVENTS = Counter(
    "broker_security_events",
    "Security events raised by the monitor, by rule.",
    ["rule"],
    registry=REGISTRY,
)
SECURITY_ALERTS = Counter(
    "broker_security_alert_deliveries",
    "Security events POSTed to the alert webhook, by outcome (delivered, failed, dropped).",
    ["outcome"],
    registry=REGISTRY,
)
# Master keys: ids are short hashes of the keys (safe to show) and few (one per rotation).
KEK_WRAPS = Gauge(
    "broker_kek_wraps",
    "AES-GCM encryptions made under each master key (persisted; the random-nonce limit is 2^32).",
    ["kek_id"],
    registry=REGISTRY,
    multiprocess_mode="livemax",  # a persisted total that only grows: the freshest is the largest
)
DEKS_BY_KEK = Gauge(
    "broker_deks_by_kek",
    "Stored data keys wrapped by each master key: connections, pending OAuth flows, the key-check canary.",
    ["kek_id"],
    registry=REGISTRY,
    multiprocess_mode="livemostrecent",  # read from the shared store: the newest reading
)
KEK_ACTIVE = Gauge(
    "broker_kek_active",
    "1 for the master key that wraps new data keys, 0 for the others in the keyring.",
    ["kek_id"],
    registry=REGISTRY,
    multiprocess_mode="livemostrecent",
)
CONNECTIONS = Gauge(
    "broker_connections",
    "Stored connections by type and status (all tenants), refreshed with the store health probe.",
    ["type", "status"],
    registry=REGISTRY,
    multiprocess_mode="livemostrecent",  # read from the shared store: the newest reading
)
LEASE_OPERATIONS = Counter(
    "broker_lease_operations",
    "Lease operations (create, renew, revoke, orphan_drop), by result: ok or a failure reason.",
    ["operation", "result"],
    registry=REGISTRY,
)
LEASE_CREATE_SECONDS = Histogram(
    "broker_lease_create_duration_seconds",
    "Time to create a lease's database user (connect, statements), successful ones.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
LEASE_REVOCATIONS_PENDING = Gauge(
    "broker_lease_revocations_pending",
    "Leases owed a drop now (expired or revoked, user not dropped yet), in every tenant.",
    registry=REGISTRY,
    multiprocess_mode="livemostrecent",  # read from the shared store: the newest reading
)
LEASE_REVOCATION_FAILURES = Counter(
    "broker_lease_revocation_failures",
    "Failed attempts to drop a lease's database user, by reason (each is retried).",
    ["reason"],
    registry=REGISTRY,
)
CHANGE_LISTENER_CONNECTED = Gauge(
    "broker_change_listener_connected",
    "1 while this replica sees other replicas' changes (PostgreSQL LISTEN) and so uses its Resolve "
    "cache; 0 while it cannot, when every Resolve reads the database. Always 1 on SQLite.",
    registry=REGISTRY,
    multiprocess_mode="livemin",  # with several workers: 0 while any one of them cannot
)
_counted: set[tuple[str, str]] = set()


def set_connection_counts(counts: Mapping[tuple[str, str], int]) -> None:
    """Publish the stored connections by (type, status); a pair no longer counted reads 0.

    Zeroed rather than removed: multiprocess mode cannot remove a label set from the files.
    """
    for pair in _counted - counts.keys():
        CONNECTIONS.labels(*pair).set(0)
    for (type_, status), n in counts.items():
        CONNECTIONS.labels(type_, status).set(n)
    _counted.update(counts.keys())
