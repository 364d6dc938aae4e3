"""The broker's error tree. Each class names the gRPC status it maps to.

    BrokerError                      INTERNAL (never raised directly)
    ├── InvalidArgument              INVALID_ARGUMENT, with field violations
    ├── NotFound                     NOT_FOUND
    ├── AlreadyExists                ALREADY_EXISTS
    ├── FailedPrecondition           FAILED_PRECONDITION
    │   └── ConnectionTestFailed     ... with the TestResult in the details
    ├── PermissionDenied             PERMISSION_DENIED
    ├── Unauthenticated              UNAUTHENTICATED
    ├── Aborted                      ABORTED (a stale etag)
    ├── ResourceExhausted            RESOURCE_EXHAUSTED
    ├── Unavailable                  UNAVAILABLE
    ├── DeadlineExceeded             DEADLINE_EXCEEDED (an outbound call outlived the caller's deadline)
    ├── SecretUnavailable            DATA_LOSS (a stored secret cannot be opened)
    └── NotImplementedYet            UNIMPLEMENTED (a feature the broker names but lacks)

The gRPC layer translates these in one interceptor (`broker.api.interceptors`);
nothing below `api/` imports grpc, so the status is named by a string here.
Messages are written for the person reading them and never contain secret values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.model import TestResult


class BrokerError(Exception):
    """Base of every error the broker reports to a caller."""

    status: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: a dotted path (`config.port`, `secrets.password`) and what is wrong."""

    field: str
    description: str


# What an INVALID_ARGUMENT carries to the caller is bounded: the message and the BadRequest
# details travel in the trailers, and gRPC refuses metadata over 8 KiB (the caller then sees
# RESOURCE_EXHAUSTED instead of the problem). These bounds keep both under about 5 KiB.
MAX_SHOWN_VIOLATIONS = 10
MAX_FIELD_CHARS = 100
MAX_DESCRIPTION_CHARS = 200
MAX_MESSAGE_CHARS = 1000


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InvalidArgument(BrokerError):
    """The request is malformed; `violations` names each field at fault.

    Repeated violations (same field, same description) are kept once. `shown` is what a
    caller receives: the first few violations, clipped, then one "and N more".
    """

    status = "INVALID_ARGUMENT"

    def __init__(self, violations: Iterable[FieldViolation] | FieldViolation) -> None:
        if isinstance(violations, FieldViolation):
            violations = [violations]
        self.violations = tuple(dict.fromkeys(violations))
        if not self.violations:
            raise ValueError("InvalidArgument needs at least one violation")
        shown = [
            FieldViolation(_clip(v.field, MAX_FIELD_CHARS), _clip(v.description, MAX_DESCRIPTION_CHARS))
            for v in self.violations[:MAX_SHOWN_VIOLATIONS]
        ]
        hidden = len(self.violations) - len(shown)
        if hidden:
            shown.append(FieldViolation("", f"and {hidden} more"))
        self.shown = tuple(shown)
        message = "; ".join(f"{v.field}: {v.description}" if v.field else v.description for v in shown)
        super().__init__(_clip(message, MAX_MESSAGE_CHARS))

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        """Shorthand for a single bad field."""
        return cls(FieldViolation(field, description))


class NotFound(BrokerError):
    status = "NOT_FOUND"


class AlreadyExists(BrokerError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(BrokerError):
    status = "FAILED_PRECONDITION"


class ConnectionTestFailed(FailedPrecondition):
    """`test_before_save` was set and the test failed; nothing was written."""

    def __init__(self, result: TestResult) -> None:
        super().__init__(f"the connection test failed ({result.category.value}): {result.message}")
        self.result = result


class PermissionDenied(BrokerError):
    status = "PERMISSION_DENIED"


class Unauthenticated(BrokerError):
    status = "UNAUTHENTICATED"


class Aborted(BrokerError):
    status = "ABORTED"


class ResourceExhausted(BrokerError):
    """Over a rate limit; `retry_after` seconds until a call would be accepted."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(BrokerError):
    status = "UNAVAILABLE"


class DeadlineExceeded(BrokerError):
    status = "DEADLINE_EXCEEDED"


class SecretUnavailable(BrokerError):
    """A stored secret cannot be opened: tampered with, purged, or its master key is gone.

    DATA_LOSS, not INTERNAL: the stored row is unusable (audited as decrypt_failed),
    which is no bug of the broker's and no reason for a client to retry.
    """

    status = "DATA_LOSS"


class NotImplementedYet(BrokerError):
    status = "UNIMPLEMENTED"


class ConfigError(Exception):
    """A setting is missing or invalid; raised at start-up, names the setting."""
