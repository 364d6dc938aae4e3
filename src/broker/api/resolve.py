"""ResolveService: the one place a secret value leaves the broker."""

from __future__ import annotations

from typing import Any

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.api import convert
from broker.api.interceptors import current_call
from broker.service.resolve import Resolver


class ResolveServicer(broker_pb2_grpc.ResolveServiceServicer):
    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def Resolve(self, request: pb.ResolveRequest, context: Any) -> pb.ResolveResponse:
        released = await self._resolver.resolve(
            current_call(),
            connection_id=request.connection_id,
            name=request.name,
            purpose=request.purpose,
            known_secret_version=request.known_secret_version,
        )
        record = released.record
        return pb.ResolveResponse(
            connection_id=record.id,
            name=record.name,
            type=record.type,
            provider=record.provider,
            config=convert.struct(record.config),
            secrets=released.secrets.reveal(),
            expires_at=convert.timestamp(released.expires_at),
            cache_ttl_seconds=released.cache_ttl_seconds,
            secret_version=record.secret_version,
            superseded_at=convert.timestamp(released.superseded_at),
        )
