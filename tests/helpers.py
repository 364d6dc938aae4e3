"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
import os
import re
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker._proto import broker_pb2 as pb
from broker.crypto import Binding, Kek, Keyring
from broker.crypto.envelope import dek_aad, secret_aad
from broker.model import AuditCheckpoint, AuditSeal
from broker.service.sealing import open_secrets, seal
from broker.store._codec import CONNECTIONS, to_json

EXECUTOR = "spiffe://broker.local/tenant/default/executor/demo"
EXECUTOR2 = "spiffe://broker.local/tenant/default/executor/other"
EXECUTOR_B = "spiffe://broker.local/tenant/tenant-b/executor/demo"


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def db_request(name: str = "prod-db", password: str = "hunter2", **labels: str) -> pb.CreateConnectionRequest:
    return pb.CreateConnectionRequest(
        name=name,
        type="database",
        config=struct({"driver": "postgresql", "host": "db.internal", "database": "app", "username": "app"}),
        secrets={"password": password},
        labels=labels,
    )


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """Await a call that must fail, and return its error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations carried by an INVALID_ARGUMENT error."""
    status = rpc_status.from_call(error)
    assert status is not None, "INVALID_ARGUMENT without status details"
    found: dict[str, str] = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        found.update({v.field: v.description for v in bad.field_violations})
    return found


class Recorder:
    """A `ChangeSink` that remembers what it was told, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def connection_changed(self, tenant: str, connection_id: str) -> None:
        self.calls.append(("connection", tenant, connection_id))

    def grant_changed(self, tenant: str, connection_id: str, principal: str) -> None:
        self.calls.append(("grant", tenant, connection_id, principal))

    def changes_unseen(self) -> None:
        self.calls.append(("unseen",))

    def changes_seen(self) -> None:
        self.calls.append(("seen",))

    def principal_blocked(self, tenant: str, principal: str, until: float) -> None:
        self.calls.append(("blocked", tenant, principal, str(until)))


async def eventually(condition: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until `condition` held; fails after `within`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, f"not within {within} s: {what}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


class ShiftedClock:
    """The real time plus an offset a test moves forward: ages tokens without waiting."""

    def __init__(self) -> None:
        self.offset = datetime.timedelta(0)

    def __call__(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += datetime.timedelta(seconds=seconds)


def free_port() -> int:
    """A loopback port nothing listens on right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _NoKeys:
    """`AnchorKeys` for store tests that hold no master key: every seal is unverifiable, every
    checkpoint passes and is left unsigned."""

    def seal(self, seal: AuditSeal) -> bool | None:
        return None

    def checkpoint(self, checkpoint: AuditCheckpoint) -> str:
        return ""

    def sign_checkpoint(self, checkpoint: AuditCheckpoint) -> AuditCheckpoint:
        return checkpoint


no_seals = _NoKeys()


class _TrustingKeys(_NoKeys):
    """`AnchorKeys` for store tests of pruning, which deletes only what a verified seal covers:
    every seal verifies (`seal_for_pruning` writes them without a key)."""

    def seal(self, seal: AuditSeal) -> bool | None:
        return True


trusted_seals = _TrustingKeys()


async def seal_for_pruning(store: Any, event_id: int | None = None) -> None:
    """A seal of event `event_id` (default: the tail) that `trusted_seals` takes as verified."""
    anchors = await store.audit_anchors([event_id] if event_id is not None else [])
    last_id = anchors.tail_id if event_id is None else event_id
    last_hash = anchors.tail_hash if event_id is None else anchors.hashes[event_id]
    await store.add_audit_seal(
        AuditSeal(last_id, last_hash, "test", "-", datetime.datetime.now(datetime.UTC))
    )


def set_stored_config(path: Path, connection_id: str, key: str, value: Any) -> None:
    """Change one config value of a connection straight in a SQLite store's file, as someone with
    write access to the database (but not the master key) would."""
    db = sqlite3.connect(path)
    with db:
        db.execute(
            "UPDATE connections SET config = json_set(config, ?, json(?)) WHERE id = ?",
            (f"$.{key}", json.dumps(value), connection_id),
        )
    db.close()


def set_stored_config_sealed(path: Path, connection_id: str, key: str, value: Any, keyring: Keyring) -> None:
    """Change one config value of a connection in a SQLite store's file and seal its secrets again
    for what the row then holds, as a broker that stored it so would have: for data an older
    broker kept that today's API refuses (`set_stored_config` is the tampering without the key)."""
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    db.row_factory = sqlite3.Row
    try:
        # The write lock first: a read that became a write while the running broker committed
        # would fail at once (WAL's SQLITE_BUSY_SNAPSHOT) instead of waiting its turn.
        db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT * FROM connections WHERE id = ?", (connection_id,)).fetchone()
        before = CONNECTIONS.from_row(row)
        after = dataclasses.replace(before, config={**before.config, key: value})
        sealed = seal(keyring, open_secrets(keyring, before), after)
        db.execute(
            "UPDATE connections SET config = ?, ciphertext = ?, wrapped_dek = ? WHERE id = ?",
            (to_json(after.config), sealed.ciphertext, sealed.wrapped_dek, connection_id),
        )
        db.execute("COMMIT")
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
        db.close()


def seal_as_format(
    raw_kek: bytes, plaintext: bytes, binding: Binding, version: int
) -> tuple[bytes, bytes, str]:
    """(ciphertext, wrapped_dek, kek_id) exactly as an older broker sealed them in envelope format
    `version`, with `binding` as that format bound it."""
    kek_id, dek = Kek(raw_kek).id, AESGCM.generate_key(256)
    prefix, nonce, wrap_nonce = bytes([version]), os.urandom(12), os.urandom(12)
    ciphertext = prefix + nonce + AESGCM(dek).encrypt(nonce, plaintext, secret_aad(binding, version))
    wrapped = (
        prefix + wrap_nonce + AESGCM(raw_kek).encrypt(wrap_nonce, dek, dek_aad(kek_id, binding, version))
    )
    return ciphertext, wrapped, kek_id


def base64_reveals(text: str, secret: str) -> bool:
    """Whether base64-decoding a run of `text` between masks, at any offset, in either alphabet,
    gives `secret` away (but for its first and last two characters, which masking whole base64
    groups may leave readable)."""
    middle = secret.encode()[2:-2]
    standard = text.replace("-", "+").replace("_", "/").replace("[redacted]", " ")
    for run in re.findall(r"[A-Za-z0-9+/]+", standard):
        for start in range(4):
            whole = run[start:][: (len(run) - start) // 4 * 4]
            if middle in base64.b64decode(whole):
                return True
    return False
