"""The rate-limit interceptor: classifies each RPC and takes a token before the servicer runs.

It sits after `CallInterceptor` in the chain, so the caller is already authenticated and a
refusal is mapped to RESOURCE_EXHAUSTED (with a RetryInfo hint) in the one error mapping.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from broker.api.interceptors import current_call
from broker.service.ratelimit import RateLimits

# Method name -> class of call. Reads are not limited.
CLASSES = {
    "Resolve": "resolve",
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
        if handler is None or kind is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        limits = self._limits

        async def limited(request: Any, context: Any) -> Any:
            await limits.enforce(current_call(), kind)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            limited,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
