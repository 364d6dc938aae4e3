"""Webhook tester: send one test event to the configured URL, and the signature receivers check.

The test request is the connection's method (POST or PUT) to its URL with the configured
headers, then these (which win over configured ones):

    Content-Type: application/json
    X-Test: true
    body: {"type":"broker.test","id":"<uuid4>","sent_at":"<RFC 3339 UTC, e.g. 2030-01-02T03:04:05Z>"}

auth_type bearer adds `Authorization: Bearer <auth_secret>`. auth_type hmac adds

    X-Broker-Timestamp: <unix time in whole seconds, e.g. 1893553445>
    X-Broker-Signature: sha256=<lowercase hex HMAC-SHA256>

where the HMAC key is the UTF-8 bytes of `auth_secret` and the signed message is the ASCII
timestamp, a full stop, then the raw request body, byte for byte as received:

    signed = timestamp.encode() + b"." + raw_body

A receiver recomputes it over the body it read (before any JSON parsing), compares in
constant time, and refuses timestamps more than a few minutes from its clock, which stops
replays; `verify_signature` does exactly that.

Redirects are not followed: a webhook that answers 3xx is not accepting events. Answers:
2xx ok, 401 auth_failed, 403 permission_denied, 404 and 410 not_found, anything else
unexpected_response.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from datetime import UTC, datetime

from broker.egress import EgressPolicy
from broker.model import TestCategory, TestResult, TestStage
from broker.testers.base import Target, TestFailure, passed
from broker.testers.http import details_of, fetch, shown, status_failure

TIMESTAMP_HEADER = "X-Broker-Timestamp"
SIGNATURE_HEADER = "X-Broker-Signature"
TEST_HEADER = "X-Test"
_PREFIX = "sha256="
_DIGITS = re.compile(r"[0-9]{1,15}")


def signed_message(timestamp: int | str, body: bytes) -> bytes:
    """The exact bytes that are signed: `<timestamp>.<raw body>`."""
    return str(timestamp).encode("ascii") + b"." + body


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The X-Broker-Signature value for `body` sent at `timestamp`: `sha256=<hex>`."""
    key = secret.encode() if isinstance(secret, str) else secret
    return _PREFIX + hmac.new(key, signed_message(timestamp, body), hashlib.sha256).hexdigest()


def verify_signature(
    secret: str | bytes,
    timestamp: str | int,
    body: bytes,
    signature: str,
    tolerance_seconds: float = 300,
    now: float | None = None,
) -> bool:
    """Whether `signature` signs `body` at `timestamp`, and the timestamp is within tolerance of `now`.

    For receivers: pass the raw body and both headers as received. Constant-time comparison.
    """
    stamp = str(timestamp)
    if not _DIGITS.fullmatch(stamp):
        return False
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > tolerance_seconds:
        return False
    expected = sign(secret, stamp, body).encode("ascii")
    return hmac.compare_digest(expected, signature.encode("utf-8", "replace"))


def event_body(event_id: str, sent_at: datetime) -> bytes:
    """The JSON body of a test event."""
    stamp = sent_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    document = {"type": "broker.test", "id": event_id, "sent_at": stamp}
    return json.dumps(document, separators=(",", ":")).encode()


def _auth_headers(target: Target, body: bytes) -> dict[str, str]:
    kind = target.config.get("auth_type", "none")
    secret = target.secret("auth_secret")
    if kind == "bearer":
        return {"Authorization": target.sent.bearer(secret)}
    if kind == "hmac":
        timestamp = int(time.time())
        return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, timestamp, body)}
    return {}


async def test_webhook(target: Target, egress: EgressPolicy) -> TestResult:
    """`webhook`: send a test event with `X-Test: true`, signed or with a bearer token per auth_type."""
    url = target.config["url"]
    method = target.config.get("method") or "POST"
    event_id = str(uuid.uuid4())
    body = event_body(event_id, datetime.now(UTC))
    auth = _auth_headers(target, body)
    headers = {
        **(target.config.get("headers") or {}),
        "User-Agent": "secrets-broker-tester",
        "Content-Type": "application/json",
        TEST_HEADER: "true",
        **auth,
    }
    stage = TestStage.AUTHENTICATE if auth else TestStage.SAMPLE_OPERATION
    reply = await fetch(
        egress,
        method,
        url,
        headers,
        budget=egress.settings.total_timeout,
        stage=stage,
        content=body,
        follow_redirects=False,
    )
    details = details_of(reply, event_id=event_id)
    if not 200 <= reply.status < 300:
        # A 3xx from a webhook is a misconfiguration, not success: the event was not accepted.
        if 300 <= reply.status < 400:
            raise TestFailure(
                TestCategory.UNEXPECTED_RESPONSE,
                TestStage.SAMPLE_OPERATION,
                f"redirected (HTTP {reply.status}); webhooks must answer 2xx",
                details,
            )
        raise status_failure(reply, details)
    checks = {"hmac": ("receiver checks the signature",), "bearer": ("receiver checks the token",)}
    return passed(
        f"{shown(url)} accepted the test event (HTTP {reply.status})",
        details=details,
        verified=("url reachable", "test event accepted"),
        not_verified=checks.get(target.config.get("auth_type", "none"), ()),
    )
