"""`wrap_handler`: the one way every interceptor (drain gate, call guard, rate limit) wraps a method."""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from broker.api.handlers import Stream, Unary, wrap_handler

API = Path(__file__).resolve().parents[2] / "src" / "broker" / "api"


class Tagging:
    """Wraps each behaviour so its results say they went through the wrapper."""

    def unary(self, behaviour: Unary) -> Unary:
        async def tagged(request: Any, context: Any) -> Any:
            return ("wrapped", await behaviour(request, context))

        return tagged

    def stream(self, behaviour: Stream) -> Stream:
        async def tagged(request: Any, context: Any) -> AsyncIterator[Any]:
            async for response in behaviour(request, context):
                yield ("wrapped", response)

        return tagged


async def echo(request: Any, context: Any) -> Any:
    return request


async def echo_twice(request: Any, context: Any) -> AsyncIterator[Any]:
    yield request
    yield request


async def test_unary_and_stream_handlers_keep_their_serializers_around_the_wrapped_behaviour() -> None:
    unary = grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=bytes.decode, response_serializer=str.encode
    )
    wrapped = wrap_handler(unary, Tagging())
    assert await wrapped.unary_unary("hi", None) == ("wrapped", "hi")
    assert (wrapped.request_deserializer, wrapped.response_serializer) == (bytes.decode, str.encode)

    stream = grpc.unary_stream_rpc_method_handler(echo_twice, response_serializer=str.encode)
    wrapped = wrap_handler(stream, Tagging(), lambda own: bytes.hex if own is None else own)
    assert [r async for r in wrapped.unary_stream("hi", None)] == [("wrapped", "hi")] * 2
    assert wrapped.unary_unary is None and wrapped.request_deserializer is bytes.hex


def test_a_kind_nobody_wraps_is_not_served_unwrapped() -> None:
    async def chat(requests: Any, context: Any) -> AsyncIterator[Any]:
        yield b""

    assert wrap_handler(grpc.stream_stream_rpc_method_handler(chat), Tagging()) is None
    assert wrap_handler(None, Tagging()) is None


def test_every_interceptor_wraps_through_the_helper() -> None:
    for name in ("drain.py", "interceptors.py"):
        tree = ast.parse((API / name).read_text())
        calls = {
            node.func.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        }
        names = {
            node.func.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        }
        assert "wrap_handler" in names, name
        assert not {c for c in calls if c.endswith("_rpc_method_handler")}, f"{name} builds handlers itself"
