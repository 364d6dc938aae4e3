"""Connection testers, one module per kind, and the runner that applies the shared rules."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

import structlog

from broker.egress import Blocked, DnsFailure, EgressPolicy
from broker.egress.errors import InvalidTarget
from broker.model import McpTool, TestCategory, TestResult, TestStage
from broker.scrub import Scrubber
from broker.testers.base import Target, Tester, TestFailure
from broker.testers.mcp import scrub_tools

log = structlog.get_logger("broker.testers")

__all__ = [
    "Discover",
    "Target",
    "TestFailure",
    "Tester",
    "run_discovery",
    "run_test",
    "run_tester",
    "scrub_stored",
]

# Tool discovery: a tester that also returns the server's tools.
Discover = Callable[[Target, EgressPolicy], Awaitable[tuple[TestResult, list[McpTool]]]]


def _registry() -> Mapping[str, Tester]:
    """Testers by connection type. Imported lazily: some pull in large drivers."""
    from broker.testers import registry

    return registry.TESTERS


async def run_test(target: Target, egress: EgressPolicy) -> TestResult:
    """Test a connection with the tester registered for its type; always returns a result."""
    return await run_tester(_registry().get(target.type), target, egress)


async def run_tester(tester: Tester | None, target: Target, egress: EgressPolicy) -> TestResult:
    """Run `tester` within the total timeout, classify what escapes it, time and scrub the result."""
    started = time.perf_counter()
    result = await _outcome(tester, target, egress)
    return _finished(result, _scrubber(target), started)


async def run_discovery(
    discover: Discover, target: Target, egress: EgressPolicy
) -> tuple[TestResult, list[McpTool]]:
    """`run_tester` for tool discovery: the tools are scrubbed too, and the result says how many were."""
    started = time.perf_counter()
    found: list[McpTool] = []

    async def discovering(t: Target, e: EgressPolicy) -> TestResult:
        result, tools = await discover(t, e)
        found.extend(tools)
        return result

    result = await _outcome(discovering, target, egress)
    scrubber = _scrubber(target)
    tools, redacted = scrub_tools(found, scrubber)
    if redacted:
        # The server echoed a credential into its tools: worth knowing, whatever else it did.
        result = dataclasses.replace(result, details={**result.details, "tools_redacted": str(redacted)})
    return _finished(result, scrubber, started), tools


def scrub_stored(
    target: Target, result: TestResult | None, tools: list[McpTool]
) -> tuple[TestResult | None, list[McpTool]]:
    """A stored test result and stored tools, scrubbed as today's runner would have.

    For text kept by a broker older than `broker.testers.sent`: which credentials its tester
    composed was not recorded, so every one it could have built from a secret (HTTP Basic and
    SMTP AUTH with the configured user name) is masked along with each secret.
    """
    sent = target.sent
    username = str(target.config.get("username", ""))
    for value in target.secrets.reveal().values():
        sent.basic(username, value)
        sent.smtp_auth(username, value)
    scrubber = _scrubber(target)
    return None if result is None else _scrubbed(result, scrubber), scrub_tools(tools, scrubber)[0]


def _scrubber(target: Target) -> Scrubber:
    """Every secret of the target, and every credential the tester composed from them."""
    return Scrubber(target.secrets.reveal().values(), target.sent.forms)


def _scrubbed(result: TestResult, scrubber: Scrubber) -> TestResult:
    """The result's message and details scrubbed, then cut to 500 characters each."""
    # Cut after scrubbing: a cut form would no longer be recognised.
    return dataclasses.replace(
        result,
        message=scrubber.cut_text(result.message)[:500],
        details={k: scrubber.cut_text(v)[:500] for k, v in result.details.items()},
    )


def _finished(result: TestResult, scrubber: Scrubber, started: float) -> TestResult:
    return dataclasses.replace(
        _scrubbed(result, scrubber),
        latency_ms=round((time.perf_counter() - started) * 1000),
        tested_at=datetime.now(UTC),
    )


async def _outcome(tester: Tester | None, target: Target, egress: EgressPolicy) -> TestResult:
    """What `tester` found, or the failure its exception means; never raises but for cancellation."""
    try:
        if tester is None:
            raise TestFailure(
                TestCategory.UNSUPPORTED,
                TestStage.RESOLVE_ADDRESS,
                f"testing {target.type} connections is not supported",
            )
        async with asyncio.timeout(egress.settings.total_timeout):
            result = await tester(target, egress)
    except TestFailure as failure:
        result = failure.result
    except InvalidTarget as invalid:
        result = TestFailure(TestCategory.INVALID_CONFIG, TestStage.RESOLVE_ADDRESS, invalid.reason).result
    except Blocked as blocked:
        result = TestFailure(TestCategory.BLOCKED_BY_POLICY, TestStage.RESOLVE_ADDRESS, blocked.reason).result
    except DnsFailure as failure:
        result = TestFailure(TestCategory.DNS_FAILURE, TestStage.RESOLVE_ADDRESS, str(failure)).result
    except TimeoutError:
        result = TestFailure(
            TestCategory.TIMEOUT, TestStage.CONNECT, f"no answer within {egress.settings.total_timeout:g} s"
        ).result
    except Exception as exc:
        # A tester bug or an unclassified driver error: report its type, never a traceback.
        log.warning("tester_error", type=target.type, error_type=type(exc).__name__)
        result = TestFailure(
            TestCategory.PROTOCOL_ERROR, TestStage.CONNECT, f"{type(exc).__name__}: {exc}"
        ).result
    return result
