"""What every tester shares: its input, its way to fail, and the result helpers.

A tester is an async function `(target, egress) -> TestResult`. It reaches the
network only through `egress` (the policy); it may raise `TestFailure` to end
with a category, or return `passed(...)`. Every credential it composes from a
secret (a Basic or bearer header, an SMTP AUTH payload) it builds with
`target.sent`, which remembers it. The runner (`broker.testers.run_test`) adds
latency and time, maps policy and timeout errors, and scrubs every secret and
every composed form from the message and details in one place, so testers need
not remember to.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.egress import EgressPolicy
from broker.model import TestCategory, TestResult, TestStage
from broker.sensitive import SecretFields
from broker.testers.sent import SentCredentials


@dataclass(frozen=True)
class Target:
    """A validated connection to test: config with defaults applied, its secrets, and what was sent."""

    type: str
    provider: str
    config: Mapping[str, Any]
    secrets: SecretFields
    sent: SentCredentials = field(default_factory=SentCredentials, repr=False, compare=False)

    def secret(self, name: str) -> str:
        """One secret value, or "" when not set. Testers call this; nothing else does."""
        return self.secrets.reveal().get(name, "")


Tester = Callable[[Target, EgressPolicy], Awaitable[TestResult]]


class TestFailure(Exception):
    """Raised by a tester to end the test with a failure category at a stage."""

    __test__ = False

    def __init__(
        self,
        category: TestCategory,
        stage: TestStage,
        message: str,
        details: Mapping[str, str] | None = None,
        verified: tuple[str, ...] = (),
        not_verified: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.result = TestResult(
            success=False,
            category=category,
            stage=stage,
            message=message,
            details=dict(details or {}),
            verified=verified,
            not_verified=not_verified,
        )


def passed(
    message: str,
    stage: TestStage = TestStage.SAMPLE_OPERATION,
    details: Mapping[str, str] | None = None,
    verified: tuple[str, ...] = (),
    not_verified: tuple[str, ...] = (),
) -> TestResult:
    """A successful result that reached `stage`."""
    return TestResult(
        success=True,
        category=TestCategory.OK,
        stage=stage,
        message=message,
        details=dict(details or {}),
        verified=verified,
        not_verified=not_verified,
    )
