"""The executor SDK moves to renewed certificate files by itself: a short-lived certificate that
expired is refused on every call, so a long-running client must not hold on to it."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from broker._proto import broker_pb2 as pb
from broker.client import ResolveClient, SyncResolveClient
from tests.conftest import Identity, Running, client_cert
from tests.helpers import EXECUTOR, db_request

pytestmark = pytest.mark.integration

LIFETIME = dt.timedelta(seconds=3)


def write_identity(folder: Path, running: Running, identity: Identity) -> None:
    (folder / "ca.pem").write_bytes(running.pki.ca)
    (folder / "cert.pem").write_bytes(identity.cert)
    (folder / "key.pem").write_bytes(identity.key)


def short_lived(running: Running) -> tuple[Identity, dt.datetime]:
    not_after = (dt.datetime.now(dt.UTC) + LIFETIME).replace(microsecond=0)
    san = x509.UniformResourceIdentifier(EXECUTOR)
    return client_cert(running.pki.ca, running.pki.ca_key, san, not_after), not_after


def sdk_options(running: Running, folder: Path) -> dict[str, Any]:
    """An SDK client's arguments: TLS files in `folder`, no cache."""
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    return {"target": f"127.0.0.1:{running.broker.resolve_port}", **files, "cache": False}


async def granted(running: Running) -> str:
    created = await running.admin().CreateConnection(db_request(name="renewing", password="pw"))
    await running.admin().GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    return str(created.id)


async def past(moment: dt.datetime) -> None:
    await asyncio.sleep((moment - dt.datetime.now(dt.UTC)).total_seconds() + 1.2)


async def test_the_async_client_moves_to_a_renewed_certificate(running: Running, tmp_path: Path) -> None:
    connection_id = await granted(running)
    identity, not_after = short_lived(running)
    write_identity(tmp_path, running, identity)
    async with ResolveClient(**sdk_options(running, tmp_path)) as client:
        assert (await client.resolve(connection_id)).secrets == {"password": "pw"}
        # The certificate is renewed on disk (a key of its own), then the old one runs out.
        write_identity(tmp_path, running, running.pki.principal(EXECUTOR))
        await past(not_after)
        assert (await client.resolve(connection_id)).secrets == {"password": "pw"}
        assert (await client.resolve(name="renewing")).connection_id == connection_id


async def test_the_sync_client_moves_to_a_renewed_certificate(running: Running, tmp_path: Path) -> None:
    connection_id = await granted(running)
    identity, not_after = short_lived(running)
    write_identity(tmp_path, running, identity)
    client = SyncResolveClient(**sdk_options(running, tmp_path))
    try:
        first = await asyncio.to_thread(client.resolve, connection_id)
        assert first.secrets == {"password": "pw"}
        write_identity(tmp_path, running, running.pki.principal(EXECUTOR))
        await past(not_after)
        second = await asyncio.to_thread(client.resolve, connection_id)
        assert second.secrets == {"password": "pw"}
    finally:
        await asyncio.to_thread(client.close)


async def test_without_renewed_files_the_expired_certificate_is_refused(
    running: Running, tmp_path: Path
) -> None:
    """What the renewal saves a client from: its next call after the certificate's end."""
    connection_id = await granted(running)
    identity, not_after = short_lived(running)
    write_identity(tmp_path, running, identity)
    async with ResolveClient(**sdk_options(running, tmp_path)) as client:
        await client.resolve(connection_id)
        await past(not_after)
        with pytest.raises(grpc.RpcError) as refused:
            await client.resolve(connection_id)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
