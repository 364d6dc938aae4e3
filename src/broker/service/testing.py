"""Testing connections and discovering MCP tools, always through the egress policy.

What a server sends back (results, tool definitions) is scrubbed by the testers' runner
before anything here stores, audits or returns it.

Every test is audited (category and stage, never the message's details) and
rate-limited per principal (in the API layer, with every other class of call). A
stored connection's latest result is kept on its row without changing its etag:
testing is not editing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from broker import metrics
from broker.crypto import Keyring
from broker.egress import EgressPolicy
from broker.errors import ConnectionTestFailed, FailedPrecondition
from broker.model import ConnectionRecord, McpTool, Outcome, TestResult, TestStatus
from broker.service.audit import AuditLog
from broker.service.context import Call
from broker.service.linked import bearer, is_linked, linked_connection, still_linked
from broker.service.lookup import existing_connection, live_connection
from broker.service.monitor import Monitor
from broker.service.sealing import open_secrets_audited
from broker.service.tokens import TokenRefresher
from broker.store import ConnectionStore
from broker.testers import Discover, Target, run_discovery, run_test


@dataclass(frozen=True)
class ToolChanges:
    """What a refresh found, compared with what was stored."""

    result: TestResult
    tools: list[McpTool]
    added: list[str]
    removed: list[str]
    changed: list[str]


def _outcome(result: TestResult) -> Outcome:
    return Outcome.SUCCEEDED if result.success else Outcome.FAILED


def _summary(result: TestResult) -> dict[str, str]:
    return {
        "category": result.category.value,
        "stage": result.stage.value,
        "latency_ms": str(result.latency_ms),
    }


class TestingService:
    __test__ = False

    def __init__(
        self,
        connections: ConnectionStore,
        keyring: Keyring,
        audit: AuditLog,
        egress: EgressPolicy,
        clock: Callable[[], datetime],
        stale_after: timedelta = timedelta(days=7),
        discover: Discover | None = None,
        monitor: Monitor | None = None,
        tokens: TokenRefresher | None = None,
    ) -> None:
        self._monitor = monitor
        # The token of the oauth2 connection an MCP connection is linked to, refreshed when due.
        self._tokens = tokens
        self._connections = connections
        self._keyring = keyring
        self._audit = audit
        self._egress = egress
        self._clock = clock
        self._stale_after = stale_after
        self._discover = discover

    def is_stale(self, record: ConnectionRecord) -> bool:
        """Last tested successfully longer ago than the staleness window."""
        return (
            record.test_status is TestStatus.SUCCESS
            and record.last_tested_at is not None
            and self._clock() - record.last_tested_at > self._stale_after
        )

    async def _stored_target(
        self, call: Call, connection_id: str, action: str
    ) -> tuple[ConnectionRecord, Target]:
        """The stored connection and what to test; a secret that does not open is audited as `action`."""
        record = await live_connection(self._connections, call.tenant, connection_id)
        event = call.audit_event(self._clock(), action, record.id)
        secrets = await open_secrets_audited(self._keyring, record, self._audit, event)
        return record, Target(record.type, record.provider, record.config, secrets)

    async def _with_token(self, call: Call, target: Target) -> Target:
        """An MCP connection linked to an oauth2 connection (`service.linked`) with that
        connection's access token, refreshed first when due; any other target as it is."""
        if not is_linked(target.type, target.config):
            return target
        if self._tokens is None:
            raise FailedPrecondition("OAuth2 tokens are not kept on this broker")
        record = await linked_connection(self._connections, call.tenant, target.config)
        event = call.audit_event(self._clock(), "oauth.use", record.id)
        secrets = await open_secrets_audited(self._keyring, record, self._audit, event)
        record, secrets = await self._tokens.fresh(record, secrets)
        still_linked(record, target.config)
        return Target(target.type, target.provider, target.config, bearer(secrets))

    async def _run(self, call: Call, target: Target) -> TestResult:
        target = await self._with_token(call, target)
        result = await run_test(target, self._egress)
        metrics.CONNECTION_TESTS.labels(target.type, result.category.value).inc()
        return result

    async def test_stored(self, call: Call, connection_id: str) -> TestResult:
        """Test a stored connection and keep the result on it."""
        record, target = await self._stored_target(call, connection_id, "connection.test")
        result = await self._run(call, target)
        event = call.audit_event(
            self._clock(),
            "connection.test",
            record.id,
            _outcome(result),
            result.category.value,
            _summary(result),
        )
        await self._connections.record_test_result(call.tenant, record.id, result, event)
        if self._monitor is not None:
            await self._monitor.test_finished(call, record.id, result.success, result.category.value)
        return result

    async def test_draft(self, call: Call, target: Target) -> TestResult:
        """Test a connection that is not stored (nothing is written but the audit event)."""
        result = await self._run(call, target)
        details = {**_summary(result), "type": target.type, "draft": "true"}
        await self._audit.append(
            call.audit_event(
                self._clock(), "connection.test", "", _outcome(result), result.category.value, details
            )
        )
        return result

    async def test_before_save(self, call: Call, target: Target) -> TestResult:
        """Test a connection about to be saved; raise `ConnectionTestFailed` (nothing saved) on failure."""
        result = await self.test_draft(call, target)
        if not result.success:
            raise ConnectionTestFailed(result)
        return result

    # -------------------------------------------------------------- MCP tools

    async def _discover_tools(self, call: Call, target: Target) -> tuple[TestResult, list[McpTool]]:
        if target.type != "mcp" or self._discover is None:
            raise FailedPrecondition("tool discovery needs an mcp connection")
        target = await self._with_token(call, target)
        # The runner gives discovery the same timeout, classification and scrubbing as a test.
        return await run_discovery(self._discover, target, self._egress)

    async def discover(
        self, call: Call, target: Target, connection_id: str = ""
    ) -> tuple[TestResult, list[McpTool]]:
        """List a server's tools without storing them."""
        result, tools = await self._discover_tools(call, target)
        details = {**_summary(result), "tool_count": str(len(tools))}
        await self._audit.append(
            call.audit_event(
                self._clock(), "mcp.discover", connection_id, _outcome(result), result.category.value, details
            )
        )
        return result, tools

    async def discover_stored(self, call: Call, connection_id: str) -> tuple[TestResult, list[McpTool]]:
        _, target = await self._stored_target(call, connection_id, "mcp.discover")
        return await self.discover(call, target, connection_id)

    async def refresh_tools(self, call: Call, connection_id: str) -> ToolChanges:
        """Discover, store, and report added, removed and changed tools; a change is audited."""
        record, target = await self._stored_target(call, connection_id, "mcp.refresh")
        result, tools = await self._discover_tools(call, target)
        before, _ = await self._connections.list_mcp_tools(call.tenant, record.id)
        if not result.success:
            event = call.audit_event(
                self._clock(),
                "mcp.refresh",
                record.id,
                Outcome.FAILED,
                result.category.value,
                _summary(result),
            )
            await self._audit.append(event)
            return ToolChanges(result, before, [], [], [])
        old = {t.name: t.definition_hash for t in before}
        new = {t.name: t.definition_hash for t in tools}
        added = sorted(new.keys() - old.keys())
        removed = sorted(old.keys() - new.keys())
        changed = sorted(n for n in new.keys() & old.keys() if new[n] != old[n])
        details = {"tool_count": str(len(tools))}
        for key, names in (("added", added), ("removed", removed), ("changed", changed)):
            if names:
                details[key] = ",".join(names)[:1000]
        action = "mcp.tools_changed" if added or removed or changed else "mcp.refresh"
        event = call.audit_event(self._clock(), action, record.id, Outcome.SUCCEEDED, "", details)
        await self._connections.replace_mcp_tools(call.tenant, record.id, tools, self._clock(), event)
        return ToolChanges(result, sorted(tools, key=lambda t: t.name), added, removed, changed)

    async def list_tools(self, call: Call, connection_id: str) -> tuple[list[McpTool], datetime | None]:
        """The tools stored by the last refresh."""
        record = await existing_connection(self._connections, call.tenant, connection_id)
        return await self._connections.list_mcp_tools(call.tenant, record.id)
