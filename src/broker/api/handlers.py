"""One way to wrap a gRPC method handler, shared by every interceptor of the broker's chain.

An interceptor says how it wraps a unary call and a server-streaming call (a `Wrapper`);
`wrap_handler` rebuilds the method's handler around them, keeping its serializers. The
drain gate caches the wrapped chain per method, so this runs once per method, not per call:
what a wrapper returns is the only code an interceptor adds to a call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc

Unary = Callable[[Any, Any], Awaitable[Any]]
Stream = Callable[[Any, Any], AsyncIterator[Any]]
Deserializer = Callable[[bytes], Any]


class Wrapper(Protocol):
    """What an interceptor puts around a method's behaviour, `(request, context)` in both cases."""

    def unary(self, behaviour: Unary) -> Unary:
        """The unary-unary behaviour, wrapped."""

    def stream(self, behaviour: Stream) -> Stream:
        """The unary-stream behaviour, wrapped."""


def wrap_handler(
    handler: Any,
    wrapper: Wrapper,
    request_deserializer: Callable[[Deserializer | None], Deserializer | None] | None = None,
) -> Any:
    """`handler` with its behaviour wrapped by `wrapper`; `request_deserializer` replaces its own.

    None for no handler and for the kinds nobody wraps (client or bidirectional streaming,
    which the broker does not have): such a method is UNIMPLEMENTED, never served around an
    interceptor.
    """
    if handler is None:
        return None
    deserializer = handler.request_deserializer
    if request_deserializer is not None:
        deserializer = request_deserializer(deserializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrapper.unary(handler.unary_unary),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrapper.stream(handler.unary_stream),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return None
