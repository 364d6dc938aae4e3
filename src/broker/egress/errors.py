"""What the egress layer raises.

    Exception
     ├── Blocked              the policy refused the target; nothing was sent to it
     │    └── InvalidTarget   (also a ValueError) the host or URL is malformed or carries credentials
     ├── DnsFailure           the host name did not resolve (or resolving timed out)
     ├── ResponseTooLarge     a response body passed `max_response_bytes`
     └── httpx.DecodingError
          └── UnreadableBody  a response body in a content coding the broker does not decode

`UnreadableBody` is an httpx error so that code which treats httpx's errors as a failed
exchange treats it so too.

`InvalidTarget` is a `Blocked` so that code which only knows `Blocked` still refuses
it without connecting; callers that can tell "invalid config" apart catch it first.
"""

from __future__ import annotations

import httpx


class Blocked(Exception):
    """The target is not allowed by the egress policy; nothing was sent to it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidTarget(Blocked, ValueError):
    """The host or URL cannot be used as typed (malformed, credentials in it, wrong scheme)."""


class DnsFailure(Exception):
    """The host name did not resolve."""


class ResponseTooLarge(Exception):
    """A response body was longer than the cap; reading stopped there."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"response body exceeds {limit} bytes")
        self.limit = limit


class UnreadableBody(httpx.DecodingError):
    """A response body in a content coding the broker does not decode (or broken in it): it is
    never passed on undecoded, where nothing could look for a secret in it."""
