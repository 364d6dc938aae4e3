"""The Resolve cache: bounded, least recently used out first, compact entries, and the answer it
makes possible (the non-secret part serialised once per record version) parses as before.

The change-feed rules (generation, `changes_unseen`) are in test_change_feed.py.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from google.protobuf import struct_pb2, timestamp_pb2

from broker import crypto, metrics
from broker._proto import broker_pb2 as pb
from broker.api import convert, resolve_public_part
from broker.api.resolve import answer
from broker.crypto import Kek, Keyring
from broker.model import (
    ConnectionRecord,
    ConnectionStatus,
    Grant,
    GrantMode,
    Lease,
    LeaseState,
    TestCategory,
    TestResult,
    TestStage,
    TestStatus,
)
from broker.sensitive import SecretFields
from broker.service.cache import FOREVER, MISSING, GrantTerms, ResolveCache
from broker.service.resolve import Released
from broker.store._codec import CONNECTIONS, GRANTS

T0 = datetime(2026, 1, 1, tzinfo=UTC)
KEYRING = Keyring(Kek(bytes(32)))


def http_record(n: int = 1, *, version: int = 1, base_url: str = "") -> ConnectionRecord:
    """A realistic HTTP connection as the store returns it: config, labels, a sealed token, a test
    result, every value a fresh object (through the store's row codec)."""
    tested = T0 + timedelta(seconds=n)
    record = ConnectionRecord(
        id=f"conn_{n:026d}",
        tenant="acme",
        name=f"payments-api-{n:06d}",
        type="http",
        provider="",
        config={
            "base_url": base_url or f"https://api.example.com/v1/payments-{n:06d}",
            "auth_type": "bearer",
            "timeout_seconds": 10,
        },
        secret_fields=("token",),
        labels={"team": "payments", "env": "prod"},
        status=ConnectionStatus.ACTIVE,
        version=version,
        secret_version=version,
        sealed=None,
        created_at=T0,
        updated_at=T0,
        created_by="spiffe://broker.local/tenant/acme/admin/ops",
        last_used_at=tested,
        last_tested_at=tested,
        test_status=TestStatus.SUCCESS,
        last_test=TestResult(
            True,
            TestCategory.OK,
            TestStage.SAMPLE_OPERATION,
            "GET /v1 answered 200",
            {"status": "200"},
            verified=("tls", "authentication"),
            latency_ms=87,
            tested_at=tested,
        ),
    )
    secrets = SecretFields({"token": "tok-" + os.urandom(24).hex()})
    record = replace(record, sealed=crypto.seal(KEYRING, secrets.to_bytes(), record.binding))
    return CONNECTIONS.from_row(dict(zip(CONNECTIONS.columns, CONNECTIONS.params(record), strict=True)))


ALWAYS = GrantTerms(FOREVER, GrantMode.RESOLVE)


def cache(entries: int = 100) -> ResolveCache:
    return ResolveCache(public_part=resolve_public_part, max_entries=entries)


def grant(
    connection_id: str,
    principal: str = "etl",
    expires_at: datetime | None = None,
    mode: GrantMode = GrantMode.RESOLVE,
) -> Grant:
    """A grant as the store returns it."""
    admin = "spiffe://broker.local/tenant/acme/admin/ops"
    made = Grant("acme", connection_id, principal, T0, admin, expires_at, mode)
    return GRANTS.from_row(dict(zip(GRANTS.columns, GRANTS.params(made), strict=True)))


def evictions() -> float:
    return metrics.REGISTRY.get_sample_value("broker_resolve_cache_evictions_total") or 0.0


def test_the_least_recently_used_connection_goes_first_with_its_name_and_grants() -> None:
    c = cache(entries=3)
    a, b, d, e = (http_record(n) for n in (1, 2, 3, 4))
    for record in (a, b, d):
        c.put_connection(record, c.generation)
        c.put_grant("acme", record.id, "etl", grant(record.id), c.generation)
    assert c.connection("acme", a.id) is not None  # a hit: a is now the most recently used
    before = evictions()
    c.put_connection(e, c.generation)
    assert len(c) == 3 and evictions() == before + 1
    assert c.connection("acme", b.id) is None  # b was least recently used
    assert c.connection_id_by_name("acme", b.name) is None
    assert all(c.connection("acme", r.id) is not None for r in (a, d, e))
    c.put_connection(b, c.generation)  # back, without the grant it had: read again from the store
    assert c.grant("acme", b.id, "etl") is MISSING
    assert c.connection("acme", d.id) is not None and c.grant("acme", d.id, "etl") == ALWAYS
    assert metrics.REGISTRY.get_sample_value("broker_resolve_cache_entries") == 3


def test_a_grant_is_kept_only_on_a_cached_connection() -> None:
    c = cache()
    record = http_record()
    c.put_grant("acme", record.id, "etl", grant(record.id), c.generation)
    assert c.grant("acme", record.id, "etl") is MISSING  # nothing to hang it on: not kept
    c.put_connection(record, c.generation)
    ends = T0 + timedelta(hours=1)
    c.put_grant("acme", record.id, "etl", grant(record.id, expires_at=ends), c.generation)
    c.put_grant("acme", record.id, "other", None, c.generation)
    assert c.grant("acme", record.id, "etl") == GrantTerms(ends, GrantMode.RESOLVE)
    assert c.grant("acme", record.id, "other") is None  # known absent
    c.invalidate_grant("acme", record.id, "etl")
    assert c.grant("acme", record.id, "etl") is MISSING and c.connection("acme", record.id) is not None
    c.invalidate_connection("acme", record.id)
    c.put_connection(record, c.generation)
    assert c.grant("acme", record.id, "other") is MISSING  # went with its connection


def test_several_principals_each_keep_their_own_cached_grant() -> None:
    c = cache()
    record = http_record()
    c.put_connection(record, c.generation)
    ends = T0 + timedelta(days=1)
    proxy = grant(record.id, "c", mode=GrantMode.PROXY)
    for principal, value in (("a", None), ("b", grant(record.id, "b", ends)), ("c", proxy)):
        c.put_grant("acme", record.id, principal, value, c.generation)
    b_terms, c_terms = GrantTerms(ends, GrantMode.RESOLVE), GrantTerms(FOREVER, GrantMode.PROXY)
    assert [c.grant("acme", record.id, p) for p in "abc"] == [None, b_terms, c_terms]
    c.invalidate_grant("acme", record.id, "a")  # the first one: the others stay
    assert [c.grant("acme", record.id, p) for p in "abc"] == [MISSING, b_terms, c_terms]
    c.put_grant("acme", record.id, "b", None, c.generation)  # revoked and read again
    c.invalidate_grant("acme", record.id, "c")
    assert [c.grant("acme", record.id, p) for p in "abc"] == [MISSING, None, MISSING]


def test_another_tenants_connection_id_is_a_miss() -> None:
    c = cache()
    record = http_record()
    c.put_connection(record, c.generation)
    c.put_grant("acme", record.id, "etl", grant(record.id), c.generation)
    assert c.connection("other", record.id) is None
    assert c.grant("other", record.id, "etl") is MISSING
    assert c.connection_id_by_name("other", record.name) is None
    c.invalidate_connection("other", record.id)  # names nothing of acme's
    assert c.connection("acme", record.id) is not None


def test_an_updated_connection_is_never_answered_with_the_old_bytes() -> None:
    c = cache()
    old = http_record(version=1, base_url="https://old.example.com")
    new = http_record(version=2, base_url="https://new.example.com")
    new = replace(new, id=old.id, name=old.name, sealed=old.sealed)
    generation = c.generation  # a reader starts loading `old` ...
    c.invalidate_connection("acme", old.id)  # ... while the update commits
    c.put_connection(old, generation)
    assert c.connection("acme", old.id) is None  # the stale read is not kept
    entry = c.put_connection(new, c.generation)
    assert c.connection("acme", old.id) is entry
    parsed = pb.ResolveResponse.FromString(entry.public)
    assert parsed.config["base_url"] == "https://new.example.com" and parsed.secret_version == 2


def test_the_answer_parses_as_the_full_response_field_by_field() -> None:
    record = replace(http_record(), provider="graph")  # every field of the message set
    expires_at = T0 + timedelta(minutes=30)
    superseded_at = T0 - timedelta(minutes=5)
    secrets = SecretFields({"token": "tok-1", "extra": "x"})
    lease = Lease(
        tenant="acme",
        id="lease_1",
        connection_id=record.id,
        principal="spiffe://broker.local/tenant/acme/executor/etl",
        username="brk_0123456789abcdef",
        state=LeaseState.ACTIVE,
        created_at=T0,
        expires_at=expires_at,
        max_expires_at=expires_at + timedelta(hours=1),
    )
    released = Released(
        resolve_public_part(record),
        secrets,
        expires_at=expires_at,
        cache_ttl_seconds=42,
        superseded_at=superseded_at,
        lease=lease,
    )
    config = struct_pb2.Struct()
    config.update(record.config)
    plain_config = struct_pb2.Struct()
    plain_config.CopyFrom(config)
    # A lease's user replaces the stored one in the answer's config.
    config.update({"username": lease.username})
    expected = pb.ResolveResponse(
        connection_id=record.id,
        name=record.name,
        type=record.type,
        provider="graph",
        config=config,
        secrets={"token": "tok-1", "extra": "x"},
        expires_at=timestamp_pb2.Timestamp(seconds=int(expires_at.timestamp())),
        cache_ttl_seconds=42,
        secret_version=record.secret_version,
        superseded_at=timestamp_pb2.Timestamp(seconds=int(superseded_at.timestamp())),
        lease=convert.lease(lease),
    )
    parsed = pb.ResolveResponse.FromString(answer(released))
    assert parsed == expected
    # A field added to ResolveResponse later must be added here (and to the answer) too.
    covered = {field.name for field, _ in expected.ListFields()}
    assert covered == {field.name for field in pb.ResolveResponse.DESCRIPTOR.fields}

    plain = replace(released, expires_at=None, superseded_at=None, cache_ttl_seconds=60, lease=None)
    parsed = pb.ResolveResponse.FromString(answer(plain))
    assert not parsed.HasField("expires_at") and not parsed.HasField("superseded_at")
    assert not parsed.HasField("lease")
    assert parsed.cache_ttl_seconds == 60 and parsed.config == plain_config


def test_a_cached_http_connection_costs_at_most_2_kb() -> None:
    """Python heap per cached connection with one grant, over 2,000 of them (tracemalloc)."""
    n = 2_000
    c = cache(entries=n)
    principal = "spiffe://broker.local/tenant/acme/executor/etl"
    http_record(0)  # imports and first-use caches outside the measurement
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(n):
            # As on a miss: the store's record is read, cached, then dropped; only the entry stays.
            record = http_record(i)
            c.put_connection(record, c.generation)
            c.put_grant("acme", record.id, principal, grant(record.id, principal), c.generation)
        del record
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert len(c) == n
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    per_connection = grown / n
    print(f"{per_connection:.0f} bytes per cached connection")
    assert per_connection <= 2048, per_connection
