"""Security events POSTed to an alert webhook, in the background.

`[monitor] alert_webhook = "tenant/connection_id"` names a stored `webhook` connection
(broker-wide: it receives every tenant's events, so it belongs to the operators).
Each event is sent as its own request through the egress policy, signed exactly as
the webhook tester signs (`broker.testers.webhook`: `X-Broker-Timestamp` and
`X-Broker-Signature` over `<timestamp>.<raw body>` for auth_type hmac, a bearer
token for bearer):

    {"type": "broker.security_event", "sent_at": "<RFC 3339 UTC>",
     "event": {"id", "time", "tenant", "rule", "severity", "action", "principal",
               "connection_id", "peer", "details"}}

Nothing waits for a delivery: events queue (bounded; overflow is dropped and counted)
and one task sends them. Failures are logged and counted, never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from broker import metrics
from broker.crypto import Keyring
from broker.egress import EgressPolicy
from broker.egress.http import http_client
from broker.model import ConnectionStatus, SecurityEvent
from broker.service.sealing import open_secrets
from broker.store import ConnectionStore
from broker.testers import webhook

log = structlog.get_logger("broker.alerts")

MAX_QUEUE = 1000


def _stamp(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def alert_body(event: SecurityEvent, sent_at: datetime) -> bytes:
    """The JSON body of one alert."""
    document = {
        "type": "broker.security_event",
        "sent_at": _stamp(sent_at),
        "event": {
            "id": event.id,
            "time": _stamp(event.time),
            "tenant": event.tenant,
            "rule": event.rule,
            "severity": event.severity,
            "action": event.action,
            "principal": event.principal,
            "connection_id": event.connection_id,
            "peer": event.peer,
            "details": event.details,
        },
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def parse_target(setting: str) -> tuple[str, str]:
    """`tenant/connection_id` -> (tenant, connection_id); ValueError when malformed."""
    tenant, sep, connection_id = setting.partition("/")
    if not sep or not tenant or not connection_id or "/" in connection_id:
        raise ValueError("must be tenant/connection_id")
    return tenant, connection_id


class AlertSender:
    """Queues security events and POSTs them, one by one, to the alert webhook."""

    def __init__(
        self,
        connections: ConnectionStore,
        keyring: Keyring,
        egress: EgressPolicy,
        target: tuple[str, str],
        clock: Callable[[], datetime],
        max_queue: int = MAX_QUEUE,
    ) -> None:
        self._connections = connections
        self._keyring = keyring
        self._egress = egress
        self._target = target
        self._clock = clock
        self._queue: asyncio.Queue[SecurityEvent] = asyncio.Queue(max_queue)
        self._task: asyncio.Task[None] | None = None

    def send(self, event: SecurityEvent) -> None:
        """Queue an event for delivery; never blocks."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            metrics.SECURITY_ALERTS.labels("dropped").inc()
            log.warning("security_alert_dropped", rule=event.rule, reason="queue_full")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self, grace: float = 5.0) -> None:
        """Give queued alerts a moment to go out, then stop."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), grace)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self.deliver(event)
            finally:
                self._queue.task_done()

    async def deliver(self, event: SecurityEvent) -> bool:
        """POST one event; True when the receiver answered 2xx. Logs and counts, never raises."""
        try:
            status = await self._post(event)
        except Exception as exc:
            metrics.SECURITY_ALERTS.labels("failed").inc()
            log.warning("security_alert_failed", rule=event.rule, error_type=type(exc).__name__)
            return False
        if not 200 <= status < 300:
            metrics.SECURITY_ALERTS.labels("failed").inc()
            log.warning("security_alert_failed", rule=event.rule, status=status)
            return False
        metrics.SECURITY_ALERTS.labels("delivered").inc()
        return True

    async def _post(self, event: SecurityEvent) -> int:
        tenant, connection_id = self._target
        record = await self._connections.get_connection(tenant, connection_id)
        if (
            record is None
            or record.type != "webhook"
            or record.presented_status is not ConnectionStatus.ACTIVE
        ):
            raise LookupError("the alert webhook connection is missing, not a webhook, or not active")
        secrets = open_secrets(self._keyring, record).reveal()
        config = record.config
        body = alert_body(event, self._clock())
        headers = {
            **(config.get("headers") or {}),
            "User-Agent": "secrets-broker-monitor",
            "Content-Type": "application/json",
        }
        kind = config.get("auth_type", "none")
        if kind == "bearer":
            headers["Authorization"] = f"Bearer {secrets['auth_secret']}"
        elif kind == "hmac":
            # Wall time, not the broker's clock: the receiver checks it against its own.
            timestamp = int(time.time())
            headers[webhook.TIMESTAMP_HEADER] = str(timestamp)
            headers[webhook.SIGNATURE_HEADER] = webhook.sign(secrets["auth_secret"], timestamp, body)
        method = config.get("method") or "POST"
        async with (
            http_client(self._egress) as client,
            # Streamed and never read: only the status matters, whatever the receiver sends.
            client.stream(
                method, self._egress.check_url(config["url"]).text, content=body, headers=headers
            ) as response,
        ):
            return response.status_code
