"""ResolveService: the one place a secret value leaves the broker.

Resolve answers with bytes it serialised itself: the connection's non-secret part,
serialised once per cached record version (`resolve_public_part`), followed by
this call's part (secrets, expiry, TTL). Protobuf merges concatenated messages, so a
client parses one `ResolveResponse` with every field. The method is registered with a
pass-through response serializer (`add_to`) for that reason.
"""

from __future__ import annotations

from typing import Any

import grpc

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from broker.api import convert
from broker.api.interceptors import current_call
from broker.model import ConnectionRecord
from broker.service import LeaseService, Released, Resolver

SERVICE = "broker.v1.ResolveService"


def resolve_public_part(record: ConnectionRecord) -> bytes:
    """The record's non-secret `ResolveResponse` fields, serialised: what the Resolve cache keeps."""
    message = pb.ResolveResponse(
        connection_id=record.id,
        name=record.name,
        type=record.type,
        provider=record.provider,
        config=convert.struct(record.config),
        secret_version=record.secret_version,
    )
    return bytes(message.SerializeToString(deterministic=True))


def answer(released: Released) -> bytes:
    """The serialised `ResolveResponse`: the cached public part, then this call's part."""
    per_call = pb.ResolveResponse(
        secrets=released.secrets.reveal(),
        expires_at=convert.timestamp(released.expires_at),
        cache_ttl_seconds=released.cache_ttl_seconds,
        superseded_at=convert.timestamp(released.superseded_at),
    )
    lease = released.lease
    if lease is not None:
        per_call.lease.CopyFrom(convert.lease(lease))
        # Struct fields are a map: parsed after the public part's config, this entry replaces
        # the stored administrator's user name with the lease's.
        per_call.config.update({"username": lease.username})
    return released.public + per_call.SerializeToString()


class ResolveServicer(broker_pb2_grpc.ResolveServiceServicer):
    def __init__(self, resolver: Resolver, leases: LeaseService) -> None:
        self._resolver = resolver
        self._leases = leases

    async def Resolve(self, request: pb.ResolveRequest, context: Any) -> bytes:
        released = await self._resolver.resolve(
            current_call(),
            connection_id=request.connection_id,
            name=request.name,
            purpose=request.purpose,
            known_secret_version=request.known_secret_version,
            run_id=request.run_id,
        )
        return answer(released)

    async def RenewLease(self, request: pb.RenewLeaseRequest, context: Any) -> pb.Lease:
        lease = await self._leases.renew(current_call(), request.lease_id, request.increment_seconds)
        return convert.lease(lease)

    async def RevokeLease(self, request: pb.RevokeLeaseRequest, context: Any) -> pb.Lease:
        return convert.lease(await self._leases.revoke(current_call(), request.lease_id))

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serve Resolve on `server`: as the generated `add_ResolveServiceServicer_to_server`, except
        that the answer is already bytes."""
        handlers = {
            "Resolve": grpc.unary_unary_rpc_method_handler(
                self.Resolve,
                request_deserializer=pb.ResolveRequest.FromString,
                response_serializer=None,  # Resolve returns the serialised ResolveResponse
            ),
            **{
                name: grpc.unary_unary_rpc_method_handler(
                    method,
                    request_deserializer=request.FromString,
                    response_serializer=pb.Lease.SerializeToString,
                )
                for name, method, request in (
                    ("RenewLease", self.RenewLease, pb.RenewLeaseRequest),
                    ("RevokeLease", self.RevokeLease, pb.RevokeLeaseRequest),
                )
            },
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)
