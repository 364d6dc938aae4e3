"""The audit chain's canonical form (format v1) and keyed fingerprints: known answers, so neither drifts."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime

import pytest

from broker.crypto import Kek, Keyring
from broker.model import AuditEvent, Outcome
from broker.sensitive import SecretFields
from broker.service.fingerprint import Fingerprinter, all_fingerprints, fingerprint, matches
from broker.store import _chain as chain

EVENT = AuditEvent(
    time=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
    tenant="acme",
    actor="spiffe://broker.local/tenant/acme/executor/ünï",
    action="connection.resolve",
    outcome=Outcome.ALLOWED,
    connection_id="conn_1",
    request_id="req-1",
    peer="ipv4:127.0.0.1:5000",
    details={"purpose": "nightly ✓", "b": "2"},
    id=42,
    prev_hash=chain.GENESIS,
)
CANONICAL = (
    '{"action":"connection.resolve","actor":"spiffe://broker.local/tenant/acme/executor/ünï",'
    '"connection_id":"conn_1","details":{"b":"2","purpose":"nightly ✓"},"id":42,"outcome":"allowed",'
    '"peer":"ipv4:127.0.0.1:5000","prev_hash":"0000000000000000000000000000000000000000000000000000000000000000",'
    '"reason":"","request_id":"req-1","tenant":"acme","time_us":1714979289123456,"v":1}'
)
HASH = "a1646349397d2ed2dcc01451c4c97cc161051ffcf86359b0d50bfad517fad7fd"


def test_canonical_form_v1_known_answer() -> None:
    assert chain.canonical_bytes(EVENT) == CANONICAL.encode("utf-8")
    assert chain.event_hash(EVENT) == HASH == hashlib.sha256(CANONICAL.encode("utf-8")).hexdigest()
    assert chain.GENESIS == "0" * 64 and chain.FORMAT_VERSION == 1


def test_hash_covers_every_field_and_the_link() -> None:
    # The stored hash and the fields the store fills in do not change the hashed form...
    assert chain.event_hash(dataclasses.replace(EVENT, hash="anything")) == HASH
    # ...every other field does.
    changes: dict[str, object] = {
        "time": datetime(2024, 5, 6, 7, 8, 9, 123457, tzinfo=UTC),
        "tenant": "acme2",
        "actor": "x",
        "action": "x",
        "outcome": Outcome.DENIED,
        "connection_id": "conn_2",
        "reason": "x",
        "request_id": "x",
        "peer": "x",
        "details": {"purpose": "nightly ✓", "b": "3"},
        "id": 43,
        "prev_hash": "1" * 64,
    }
    for name, value in changes.items():
        assert chain.event_hash(dataclasses.replace(EVENT, **{name: value})) != HASH, name


def _linked(n: int) -> list[AuditEvent]:
    events, prev = [], chain.GENESIS
    for i in range(1, n + 1):
        event = dataclasses.replace(EVENT, id=i, prev_hash=prev, details={"i": str(i)})
        event = dataclasses.replace(event, hash=chain.event_hash(event))
        events.append(event)
        prev = event.hash
    return events


def test_chain_walk_reports_the_first_break_only() -> None:
    events = _linked(5)
    walk = chain.ChainWalk(chain.GENESIS)
    assert all(walk.check(e) for e in events) and walk.ok and walk.checked == 5

    edited = [*events[:2], dataclasses.replace(events[2], reason="edited"), *events[3:]]
    walk = chain.ChainWalk(chain.GENESIS)
    assert [walk.check(e) for e in edited] == [True, True, False, False, False]
    assert (walk.broken_id, walk.problem, walk.checked) == (3, chain.PROBLEM_HASH, 3)

    walk = chain.ChainWalk(chain.GENESIS)
    for e in [*events[:2], *events[3:]]:  # event 3 deleted
        walk.check(e)
    assert (walk.broken_id, walk.problem) == (4, chain.PROBLEM_LINK)

    walk = chain.ChainWalk(chain.GENESIS)
    walk.check(dataclasses.replace(events[0], hash=""))
    assert (walk.broken_id, walk.problem) == (1, chain.PROBLEM_MISSING)


KEY = Kek(bytes(range(32)))
FP_KNOWN = "fp1:b9505f9f7985c3ea:a1f1bf5d7bd24d888341e09919c88f6676d4f026cee226d292f2dfa8e97e78c7"


def test_fingerprint_known_answer_and_check() -> None:
    fp = fingerprint(KEY, "refresh-token-value")
    assert fp == FP_KNOWN and "refresh-token-value" not in fp
    keyring = Keyring(Kek(bytes(32)), [KEY])  # rotated since: the fingerprint names its key
    assert matches(keyring, "refresh-token-value", fp)
    assert not matches(keyring, "another value", fp)
    with pytest.raises(ValueError, match="not a fingerprint"):
        matches(keyring, "x", "sha256:abc")
    with pytest.raises(ValueError, match="not configured"):
        matches(Keyring(Kek(bytes(32))), "refresh-token-value", fp)


def test_derived_keys_are_per_purpose_and_not_the_master_key() -> None:
    a, b = KEY.derive(b"broker audit fingerprint v1"), KEY.derive(b"something else")
    assert (
        len(a) == 32 and a != b and a != bytes(range(32)) and a == KEY.derive(b"broker audit fingerprint v1")
    )


def test_audit_retention_setting_defaults_to_a_year_and_has_a_floor() -> None:
    from broker.config import Settings
    from broker.errors import ConfigError

    env = {
        "BROKER_TLS_CERT": "c",
        "BROKER_TLS_KEY": "k",
        "BROKER_TLS_CLIENT_CA": "ca",
        "BROKER_STORAGE_PATH": "db",
    }
    assert Settings.load(None, env).audit_retention_days == 365
    assert Settings.load(None, {**env, "BROKER_AUDIT_RETENTION_DAYS": "90"}).audit_retention_days == 90
    for bad in ("89", "100.5", "forever"):
        with pytest.raises(ConfigError, match="BROKER_AUDIT_RETENTION_DAYS"):
            Settings.load(None, {**env, "BROKER_AUDIT_RETENTION_DAYS": bad})


def test_resolve_fingerprints_match_the_checkable_form_and_follow_the_active_key() -> None:
    keyring = Keyring(KEY)
    released = Fingerprinter(keyring)
    secrets = SecretFields({"password": "pw-1", "api_key": "k-2"})
    assert released.released(secrets) == {
        "fp.password": fingerprint(KEY, "pw-1"),
        "fp.api_key": fingerprint(KEY, "k-2"),
    }
    rotated = Kek(bytes(range(1, 33)))
    keyring.activate(rotated)
    after = released.released(secrets)["fp.password"]
    assert after == fingerprint(rotated, "pw-1") and matches(keyring, "pw-1", after)
    assert all_fingerprints(keyring, "pw-1") == {fingerprint(KEY, "pw-1"), after}
