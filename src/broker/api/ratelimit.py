"""The rate-limit interceptor: classifies each RPC and takes a token before the servicer runs.

It sits after `CallInterceptor` in the chain, so the caller is already authenticated and a
refusal is mapped to RESOURCE_EXHAUSTED (with a RetryInfo hint) in the one error mapping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from broker.api.handlers import Stream, Unary, wrap_handler
from broker.api.interceptors import current_call
from broker.service.ratelimit import RateLimits

# Method name -> class of call. Reads are not limited.
CLASSES = {
    "Resolve": "resolve",
    "ProxyHttp": "proxy",
    "ProxyHttpStream": "proxy",
    "CallMcpTool": "proxy",
    "TestConnection": "test",
    "DiscoverMcpTools": "test",
    "RefreshMcpTools": "test",
    **{
        name: "admin_write"
        for name in (
            "CreateConnection",
            "UpdateConnection",
            "DeleteConnection",
            "RestoreConnection",
            "PurgeConnection",
            "RevokeConnection",
            "ReinstateConnection",
            "GrantAccess",
            "RevokeAccess",
            "BeginAuthorization",
            "CompleteAuthorization",
        )
    },
}


class RateLimitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, limits: RateLimits) -> None:
        self._limits = limits

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        kind = CLASSES.get(details.method.rpartition("/")[2])
        if handler is None or kind is None:
            return handler
        return wrap_handler(handler, _Limited(self._limits, kind))


@dataclass(frozen=True)
class _Limited:
    """Takes a token of `kind` for the caller before the method runs (a stream: before it starts)."""

    limits: RateLimits
    kind: str

    def unary(self, behaviour: Unary) -> Unary:
        limits, kind = self.limits, self.kind  # closure cells: no attribute lookups per call

        async def limited(request: Any, context: Any) -> Any:
            await limits.enforce(current_call(), kind)
            return await behaviour(request, context)

        return limited

    def stream(self, behaviour: Stream) -> Stream:
        limits, kind = self.limits, self.kind

        async def limited(request: Any, context: Any) -> AsyncIterator[Any]:
            await limits.enforce(current_call(), kind)
            async for response in behaviour(request, context):
                yield response

        return limited
