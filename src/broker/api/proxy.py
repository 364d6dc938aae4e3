"""ProxyService: calls the broker makes with a connection's credential for an executor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.api import convert
from broker.api.interceptors import current_call
from broker.service import ProxyService, UpstreamRequest


class ProxyServicer(broker_pb2_grpc.ProxyServiceServicer):
    def __init__(self, proxy: ProxyService) -> None:
        self._proxy = proxy

    async def ProxyHttp(self, request: pb.ProxyHttpRequest, context: Any) -> pb.ProxyHttpResponse:
        # The caller's deadline bounds the upstream call too (None: no deadline was set).
        answer = await self._proxy.http(
            current_call(),
            _upstream(request),
            connection_id=request.connection_id,
            name=request.name,
            purpose=request.purpose,
            time_left=context.time_remaining(),
        )
        headers = [pb.HttpHeader(name=name, value=value) for name, value in answer.headers]
        return pb.ProxyHttpResponse(status=answer.status, headers=headers, body=answer.body)

    async def ProxyHttpStream(
        self, request: pb.ProxyHttpRequest, context: Any
    ) -> AsyncIterator[pb.ProxyHttpChunk]:
        chunks = self._proxy.http_stream(
            current_call(),
            _upstream(request),
            connection_id=request.connection_id,
            name=request.name,
            purpose=request.purpose,
            time_left=context.time_remaining(),
        )
        async for part in chunks:
            if isinstance(part, bytes):
                yield pb.ProxyHttpChunk(data=part)
            else:
                headers = [pb.HttpHeader(name=name, value=value) for name, value in part.headers]
                yield pb.ProxyHttpChunk(head=pb.ProxyHttpResponse(status=part.status, headers=headers))

    async def CallMcpTool(self, request: pb.CallMcpToolRequest, context: Any) -> pb.CallMcpToolResponse:
        arguments = convert.from_struct(request.arguments, "arguments")
        result = await self._proxy.call_tool(
            current_call(),
            request.tool,
            arguments,
            connection_id=request.connection_id,
            name=request.name,
            purpose=request.purpose,
            time_left=context.time_remaining(),
        )
        response = pb.CallMcpToolResponse(
            content=[convert.struct(item) for item in result.content if isinstance(item, dict)],
            is_error=result.is_error,
        )
        if isinstance(result.structured, dict):
            response.structured_content.update(result.structured)
        return response

    async def ListGrantedMcpTools(self, request: pb.ListGrantedMcpToolsRequest, context: Any) -> Any:
        tools = await self._proxy.granted_tools(
            current_call(), connection_id=request.connection_id, name=request.name
        )
        return pb.ListGrantedMcpToolsResponse(tools=[convert.mcp_tool(t) for t in tools])


def _upstream(request: pb.ProxyHttpRequest) -> UpstreamRequest:
    headers = tuple((h.name, h.value) for h in request.headers)
    return UpstreamRequest(request.method, request.path, request.query, headers, request.body)
