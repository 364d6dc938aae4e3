"""The webhook tester against real receivers on loopback, and the signature helper receivers use."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker import catalog
from broker.egress import EgressPolicy, EgressSettings
from broker.model import TestCategory, TestResult, TestStage
from broker.sensitive import SecretFields
from broker.testers import Target, run_tester, webhook
from tests.httpservers import Answer, LocalServer, Route, Seen, serve

SECRET = "whsec-3b9f0c2e-signing-key"
LOOPBACK = EgressPolicy(EgressSettings(allow_loopback=True, total_timeout=10))

Servers = Callable[[Route], LocalServer]


@pytest.fixture
def servers() -> Iterator[Servers]:
    with contextlib.ExitStack() as stack:
        yield lambda route: stack.enter_context(serve(route))


def hook(url: str, secrets: dict[str, str] | None = None, **config: Any) -> Target:
    valid = catalog.validate("webhook", "", {"url": url, **config}, secrets or {})
    return Target(valid.type, valid.provider, valid.config, SecretFields(valid.secrets))


async def run(t: Target, egress: EgressPolicy = LOOPBACK) -> TestResult:
    return await run_tester(webhook.test_webhook, t, egress)


def verifying_receiver(secret: str) -> Route:
    """A receiver that checks the test header and the HMAC signature: 204 when valid, else 401."""

    def route(seen: Seen) -> Answer:
        valid = webhook.verify_signature(
            secret,
            seen.headers.get("x-broker-timestamp", ""),
            seen.body,
            seen.headers.get("x-broker-signature", ""),
        )
        if not valid or seen.headers.get("x-test") != "true":
            return Answer(401)
        return Answer(204)

    return route


async def test_hmac_signed_event_is_verified_by_the_receiver(servers: Servers) -> None:
    server = servers(verifying_receiver(SECRET))
    result = await run(hook(server.url + "/hooks/in", {"auth_secret": SECRET}, auth_type="hmac"))
    assert result.success, result
    assert result.category is TestCategory.OK
    assert result.details["status"] == "204"
    assert result.not_verified == ("receiver checks the signature",)
    (seen,) = server.requests
    assert (seen.method, seen.path) == ("POST", "/hooks/in")
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["x-test"] == "true"
    assert "authorization" not in seen.headers
    event = json.loads(seen.body)
    assert event["type"] == "broker.test"
    assert str(uuid.UUID(event["id"])) == event["id"] == result.details["event_id"]
    sent_at = datetime.fromisoformat(event["sent_at"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - sent_at) < timedelta(minutes=1)
    assert event["sent_at"].endswith("Z")


async def test_hmac_with_the_wrong_secret_is_auth_failed(servers: Servers) -> None:
    server = servers(verifying_receiver(SECRET))
    result = await run(hook(server.url, {"auth_secret": "whsec-not-the-right-one"}, auth_type="hmac"))
    assert not result.success
    assert result.category is TestCategory.AUTH_FAILED
    assert result.stage is TestStage.AUTHENTICATE
    assert len(server.requests) == 1


async def test_signature_covers_timestamp_and_exact_body(servers: Servers) -> None:
    server = servers(lambda seen: Answer(204))
    assert (await run(hook(server.url, {"auth_secret": SECRET}, auth_type="hmac"))).success
    (seen,) = server.requests
    stamp, signature, body = seen.headers["x-broker-timestamp"], seen.headers["x-broker-signature"], seen.body
    assert signature.startswith("sha256=") and signature == signature.lower()
    assert webhook.verify_signature(SECRET, stamp, body, signature)
    # The documented recipe, by hand: HMAC-SHA256 over b"<timestamp>." + raw body.
    by_hand = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert signature == "sha256=" + by_hand == webhook.sign(SECRET, int(stamp), body)
    tampered = body.replace(b"broker.test", b"broker.tEst")
    assert not webhook.verify_signature(SECRET, stamp, tampered, signature)
    assert not webhook.verify_signature(SECRET, str(int(stamp) + 1), body, signature)
    assert not webhook.verify_signature("whsec-other", stamp, body, signature)
    assert not webhook.verify_signature(SECRET, stamp, body, signature.upper())
    assert not webhook.verify_signature(SECRET, stamp, body, "")


def test_verify_signature_tolerance_and_bad_timestamps() -> None:
    body = b'{"type":"broker.test"}'
    signature = webhook.sign(SECRET, 1_000_000, body)
    assert webhook.verify_signature(SECRET, "1000000", body, signature, now=1_000_000 + 300)
    assert webhook.verify_signature(SECRET.encode(), 1_000_000, body, signature, now=1_000_000 - 300)
    assert not webhook.verify_signature(SECRET, "1000000", body, signature, now=1_000_000 + 301)
    assert not webhook.verify_signature(
        SECRET, "1000000", body, signature, tolerance_seconds=5, now=1_000_010
    )
    arabic_indic = "\u0661" + "\u0660" * 6  # int() would accept these digits; the header must not
    for stamp in ("", "-1000000", " 1000000", "1e6", "1000000.0", arabic_indic):
        assert not webhook.verify_signature(SECRET, stamp, body, signature, now=1_000_000), stamp
    assert not webhook.verify_signature(SECRET, "1000000", body, "sha256=é", now=1_000_000)
    assert webhook.verify_signature(
        SECRET, str(int(time.time())), body, webhook.sign(SECRET, int(time.time()), body)
    )


async def test_bearer_webhook(servers: Servers) -> None:
    def route(seen: Seen) -> Answer:
        return Answer(200 if seen.headers.get("authorization") == f"Bearer {SECRET}" else 401)

    server = servers(route)
    good = await run(hook(server.url, {"auth_secret": SECRET}, auth_type="bearer"))
    assert good.success, good
    assert good.not_verified == ("receiver checks the token",)
    assert "x-broker-signature" not in server.requests[0].headers
    bad = await run(hook(server.url, {"auth_secret": "whsec-wrong-token"}, auth_type="bearer"))
    assert bad.category is TestCategory.AUTH_FAILED


async def test_method_and_configured_headers(servers: Servers) -> None:
    server = servers(lambda seen: Answer(200))
    result = await run(hook(server.url, method="PUT", headers={"X-Source": "broker", "X-Test": "false"}))
    assert result.success, result
    (seen,) = server.requests
    assert seen.method == "PUT"
    assert seen.headers["x-source"] == "broker"
    assert seen.headers["x-test"] == "true"  # the test marker wins over a configured header


@pytest.mark.parametrize(
    ("status", "category"),
    [
        (403, TestCategory.PERMISSION_DENIED),
        (404, TestCategory.NOT_FOUND),
        (410, TestCategory.NOT_FOUND),
        (500, TestCategory.UNEXPECTED_RESPONSE),
        (429, TestCategory.UNEXPECTED_RESPONSE),
    ],
)
async def test_failure_statuses(servers: Servers, status: int, category: TestCategory) -> None:
    server = servers(lambda seen: Answer(status))
    result = await run(hook(server.url))
    assert result.category is category
    assert result.details["status"] == str(status)


async def test_redirect_is_not_followed(servers: Servers) -> None:
    server = servers(lambda seen: Answer(302, headers={"Location": "/moved"}))
    result = await run(hook(server.url + "/hook", {"auth_secret": SECRET}, auth_type="bearer"))
    assert result.category is TestCategory.UNEXPECTED_RESPONSE
    assert result.details["location"] == server.url + "/moved"
    assert [s.path for s in server.requests] == ["/hook"]


async def test_blocked_by_policy_sends_nothing(servers: Servers) -> None:
    server = servers(lambda seen: Answer(204))
    blocked = EgressPolicy(EgressSettings(allow_loopback=False))
    result = await run(hook(server.url, {"auth_secret": SECRET}, auth_type="hmac"), blocked)
    assert result.category is TestCategory.BLOCKED_BY_POLICY
    assert server.requests == []


async def test_secret_never_in_result(servers: Servers) -> None:
    server = servers(lambda seen: Answer(500, f"bad secret {SECRET}".encode(), {"X-Echo": SECRET}))
    for auth_type in ("bearer", "hmac"):
        result = await run(hook(server.url, {"auth_secret": SECRET}, auth_type=auth_type))
        assert not result.success
        assert SECRET not in repr(result)
