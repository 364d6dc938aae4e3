"""Randomised and mutated requests to every RPC over real mTLS: never INTERNAL, never UNKNOWN.

Two kinds of input, from one seeded `random.Random` (BROKER_FUZZ_SEED and BROKER_FUZZ_SECONDS
explore further than the suite's short run):
valid protos whose fields hold random and hostile values (NaN, huge numbers, unknown enum
values, long and odd strings, forged tokens, known ids), and bytes on the wire that are no
message at all (the same protos mutated, or plain random bytes) through a raw channel.
The broker must answer every call with a deliberate status, keep answering afterwards, and
keep its memory bounded. The run is bounded in time, so it costs a few seconds in the suite.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from broker._proto import broker_pb2 as pb
from broker.egress.policy import EgressSettings
from broker.model import AuditFilter, GrantFilter
from broker.service import paging
from tests.conftest import Running
from tests.helpers import EXECUTOR, EXECUTOR2, db_request, field_violations, rpc_error, struct
from tests.postgres_db import fresh_database

SEED = int(os.environ.get("BROKER_FUZZ_SEED", "20261206"))
SECONDS_PER_SERVICE = float(os.environ.get("BROKER_FUZZ_SECONDS", "1.0"))
WORKERS = 8
CALL_TIMEOUT = 5.0
# The broker runs in this process; growth past this over a fuzz round is a leak, not noise.
MAX_RSS_GROWTH = 96 * 1024 * 1024
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
F = descriptor.FieldDescriptor

NUMBERS = [0, 1, -1, 2, 7, 100, 1000, 1001, 2**31 - 1, -(2**31), 2**53, 2**63 - 1, -(2**63)]
DOUBLES = [0.0, -0.0, 1.5, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf, 5432.0, 2.0**64]
# fmt: off
# Config keys the catalog knows (and some it does not), so Structs reach the validator's rules.
NAMES = [
    "host", "port", "url", "base_url", "driver", "database", "username", "client_id", "scopes",
    "headers", "auth_type", "password", "token", "api_key", "ssl", "x", "a.b", "_", "k" * 64, "",
]
# Strings that mean something somewhere: types, providers, URLs the egress policy must judge,
# principals, ids, and text that breaks naive code (NUL, bidi override, CRLF, SQL, emoji).
WORDS = [
    "database", "http", "smtp", "webhook", "api_key", "oauth2", "mcp", "ssh", "aws", "gcp",
    "azure", "custom", "github", "google", "postgresql", "mysql", "bearer", "basic", "none",
    "localhost", "127.0.0.1", "::1", "db.internal", "https://127.0.0.1:1/", "http://[::1",
    "https://h.invalid/x?y=1", "ftp://x", "//x", "http://", "0251.0376.0251.0376",
    EXECUTOR, EXECUTOR2, "spiffe://broker.local/tenant/default/admin/cli",
    "spiffe://evil/tenant/x/executor/y", "conn_00000000000000000000000000", "a" * 300,
    "\x00", "\u202e", "\U0001f600" * 50, "' OR 1=1 --", "%", "_", "\\", "\r\nX: y", "\ufeff", "..", "/",
]
# fmt: on


def _draft(
    type_: str, config: dict[str, Any], secrets: dict[str, str], provider: str = ""
) -> pb.ConnectionDraft:
    return pb.ConnectionDraft(
        name="draft", type=type_, provider=provider, config=struct(config), secrets=secrets
    )


HTTP_DRAFT = ("http", {"base_url": "https://fuzz.invalid/api"}, {"token": "fuzz-token"})
MCP_DRAFT = ("mcp", {"url": "https://fuzz.invalid/mcp"}, {"token": "fuzz-token"})
OAUTH_DRAFT = ("oauth2", {"client_id": "fuzz"}, {"client_secret": "fuzz-secret"}, "github")
# Valid requests by message name, given a known id or name; the fuzzer spoils a field or two.
TEMPLATES: dict[str, Callable[[str], Message]] = {
    "CreateConnectionRequest": lambda known: db_request(name=f"made-{known[-6:]}", team="fuzz"),
    "UpdateConnectionRequest": lambda known: pb.UpdateConnectionRequest(
        id=known,
        config=struct({"port": 5433}),
        secrets={"password": "new"},
        labels=pb.Labels(values={"a": "b"}),
    ),
    "TestConnectionRequest": lambda known: pb.TestConnectionRequest(draft=_draft(*HTTP_DRAFT)),
    "DiscoverMcpToolsRequest": lambda known: pb.DiscoverMcpToolsRequest(draft=_draft(*MCP_DRAFT)),
    "BeginAuthorizationRequest": lambda known: pb.BeginAuthorizationRequest(
        draft=_draft(*OAUTH_DRAFT), redirect_uri="http://127.0.0.1/cb", scopes=["repo"], labels={"a": "b"}
    ),
    "GrantAccessRequest": lambda known: pb.GrantAccessRequest(connection_id=known, principal=EXECUTOR2),
    "ListConnectionsRequest": lambda known: pb.ListConnectionsRequest(
        type="database", labels={"team": "fuzz"}
    ),
    "ListAuditEventsRequest": lambda known: pb.ListAuditEventsRequest(connection_id=known, page_size=5),
    "ResolveRequest": lambda known: pb.ResolveRequest(name=known, purpose="fuzz", known_secret_version=1),
}


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Fuzzer:
    """Random messages of any broker request type, with values that tend to hit edges."""

    def __init__(self, rng: random.Random, known: list[str]) -> None:
        self.rng = rng
        self.known = known  # ids and names of real connections, so some calls reach deep paths

    def text(self) -> str:
        rng = self.rng
        roll = rng.random()
        if roll < 0.25:
            return rng.choice(self.known)
        if roll < 0.55:
            return rng.choice(WORDS)
        if roll < 0.65:
            return paging.encode_token(
                rng.choice(["connections", "grants", "audit", "security"]),
                rng.choice([*NUMBERS, "x", ["a", "b"], True, 1.5]),
                rng.choice([GrantFilter(), AuditFilter(), GrantFilter(principal=rng.choice(WORDS))]),
            )
        if roll < 0.75:
            return "".join(chr(rng.randrange(0x20, 0xD7FF)) for _ in range(rng.randrange(1, 40)))
        if roll < 0.8:
            return rng.choice(WORDS) * rng.randrange(100, 1000)
        return "".join(
            rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_.:/@ ") for _ in range(rng.randrange(0, 20))
        )

    def number(self) -> float:
        return self.rng.choice(DOUBLES) if self.rng.random() < 0.5 else self.rng.uniform(-1e6, 1e6)

    def value(self, depth: int) -> Any:
        rng = self.rng
        roll = rng.randrange(7 if depth < 4 else 5)
        if roll == 0:
            return None
        if roll == 1:
            return rng.random() < 0.5
        if roll == 2:
            return self.number()
        if roll in (3, 4):
            return self.text()
        if roll == 5:
            return [self.value(depth + 1) for _ in range(rng.randrange(0, 6))]
        return self.mapping(depth + 1)

    def mapping(self, depth: int = 0) -> dict[str, Any]:
        count = self.rng.choice([0, 1, 2, 4, 8, 70])
        return {
            self.rng.choice(NAMES) if self.rng.random() < 0.7 else self.text(): self.value(depth)
            for _ in range(count)
        }

    def scalar(self, field: descriptor.FieldDescriptor) -> Any:
        rng = self.rng
        if field.type == F.TYPE_STRING:
            return self.text()
        if field.type == F.TYPE_BYTES:
            return rng.randbytes(rng.randrange(0, 64))
        if field.type == F.TYPE_BOOL:
            return rng.random() < 0.5
        if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            return self.number()
        if field.type == F.TYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
            return rng.choice([*values, 99, -5])
        limit = 2**31 if field.type in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32) else 2**63
        unsigned = field.type in (F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_FIXED32, F.TYPE_FIXED64)
        low, high = (0, 2 * limit - 1) if unsigned else (-limit, limit - 1)
        value = rng.choice([*NUMBERS, rng.randrange(-5000, 5000)])
        return min(max(value, low), high)

    def fill(self, message: Message, depth: int = 0) -> Message:
        rng = self.rng
        for field in message.DESCRIPTOR.fields:
            if rng.random() < 0.4:
                continue
            target = getattr(message, field.name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                for _ in range(rng.choice([0, 1, 3, 10, 70, 300])):
                    key = self.text()
                    if value_field.message_type is None:
                        target[key] = self.scalar(value_field)
                continue
            if field.label == F.LABEL_REPEATED:
                for _ in range(rng.choice([0, 1, 2, 5, 300, 3000])):
                    if field.message_type is None:
                        target.append(self.scalar(field))
                    elif depth < 3:
                        self.sub(target.add(), depth + 1)
                continue
            if field.message_type is None:
                setattr(message, field.name, self.scalar(field))
            elif depth < 3:
                self.sub(target, depth + 1)
        return message

    def sub(self, message: Message, depth: int) -> None:
        if isinstance(message, struct_pb2.Struct):
            message.update(self.mapping())
        elif isinstance(message, timestamp_pb2.Timestamp):
            message.seconds = self.rng.choice([0, -1, 1_700_000_000, 253_402_300_800, -62_135_596_801, 2**62])
            message.nanos = self.rng.choice([0, 999_999_999, 1_000_000_000, -1, 2**31 - 1])
        else:
            self.fill(message, depth)
            if not message.ListFields():
                message.SetInParent()

    def request(self, cls: type[Message]) -> Message:
        """A random request; often a valid one with a few fields made hostile, to reach deep paths."""
        make = TEMPLATES.get(cls.DESCRIPTOR.name)
        if make is None or self.rng.random() < 0.4:
            return self.fill(cls())
        message = make(self.rng.choice(self.known))
        chosen = {self.rng.choice(list(message.DESCRIPTOR.fields)).name}
        hostile = self.fill(cls())
        for field in message.DESCRIPTOR.fields:
            if field.name in chosen:
                message.ClearField(field.name)
            else:
                hostile.ClearField(field.name)
        message.MergeFrom(hostile)
        for config in (
            getattr(message, "config", None),
            getattr(getattr(message, "draft", None), "config", None),
        ):
            if isinstance(config, struct_pb2.Struct) and self.rng.random() < 0.5:
                config.update({self.rng.choice(NAMES): self.value(0)})
        return message

    def mutate(self, raw: bytes) -> bytes:
        rng = self.rng
        data = bytearray(raw or rng.randbytes(8))
        roll = rng.randrange(5)
        if roll == 0:
            return rng.randbytes(rng.randrange(1, 256))
        if roll == 1:
            return bytes(data[: rng.randrange(0, len(data))])  # truncated mid-field
        for _ in range(rng.randrange(1, 8)):
            position = rng.randrange(len(data))
            if roll == 2:
                data[position] = rng.randrange(256)
            elif roll == 3:
                data[position:position] = rng.choice(
                    [b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x80" * 11, b"\x00"]
                )
            else:
                data[position] ^= 1 << rng.randrange(8)
        return bytes(data)


def methods(service: str) -> list[tuple[str, descriptor.MethodDescriptor]]:
    found = pb.DESCRIPTOR.services_by_name[service]
    return [(f"/{found.full_name}/{m.name}", m) for m in found.methods]


async def fuzz_service(
    running: Running, service: str, who: str, port: int, fuzzer: Fuzzer
) -> collections.Counter[str]:
    """Random calls to every method of `service` for a while: codes by method; none INTERNAL/UNKNOWN."""
    channel = running.channel(running.identities[who], port)
    calls: list[tuple[str, type[Message], Callable[[bytes], Any], bool]] = []
    for path, method in methods(service):
        cls = message_factory.GetMessageClass(method.input_type)
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            calls.append((path, cls, stream, True))
        else:
            unary = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            calls.append((path, cls, unary, False))
    codes: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    deadline = time.monotonic() + SECONDS_PER_SERVICE

    async def one(path: str, cls: type[Message], call: Callable[[bytes], Any], streaming: bool) -> None:
        raw = fuzzer.request(cls).SerializeToString()
        body = raw if fuzzer.rng.random() < 0.6 else fuzzer.mutate(raw)
        try:
            if streaming:
                received = 0
                async for _ in call(body, timeout=CALL_TIMEOUT):
                    received += 1
                    if received > 50:
                        break
            else:
                await call(body, timeout=CALL_TIMEOUT)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code in NEVER:
                failures.append(f"{path}: {code.name} {error.details()!r} for {body[:200]!r}")
        codes[f"{path.rpartition('/')[2]} {code.name}"] += 1

    async def worker(offset: int) -> None:
        index = offset
        while time.monotonic() < deadline:
            # Every method in turn, so none is starved by slow neighbours.
            await one(*calls[index % len(calls)])
            index += WORKERS

    await asyncio.gather(*(worker(i) for i in range(WORKERS)))
    assert not failures, f"seed {SEED}: {len(failures)} calls ended INTERNAL/UNKNOWN:\n" + "\n".join(
        failures[:20]
    )
    called = {key.split()[0] for key in codes}
    assert called == {m.name for _, m in methods(service)}, "a method was never called"
    return codes


@pytest.fixture(params=["sqlite", "postgresql"])
async def store_settings(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Both stores: PostgreSQL refuses text SQLite takes (a NUL), so each finds its own faults."""
    if request.param == "sqlite":
        yield {}
        return
    async with fresh_database() as dsn:  # skipped without BROKER_TEST_POSTGRES_DSN
        yield {"storage_path": None, "storage_url": dsn, "storage_pool_max": 4}


async def test_fuzz_every_rpc_gets_a_deliberate_answer(
    make_broker: Callable[..., Any], store_settings: dict[str, Any]
) -> None:
    running: Running = await make_broker(
        **store_settings,
        # Outbound tests fail fast at the policy instead of waiting on random addresses.
        egress=EgressSettings(
            allow_private=False, allow_hosts=("fuzz.invalid",), connect_timeout=0.5, total_timeout=1.0
        ),
        tests_per_minute=1_000_000,
        admin_writes_per_minute=1_000_000,
        resolve_per_second=1_000_000.0,
        resolve_burst=1_000_000,
    )
    try:
        admin = running.admin()
        known: list[str] = []
        for index in range(3):
            created = await admin.CreateConnection(db_request(name=f"fuzz-{index}", password=f"pw-{index}"))
            await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
            await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR2))
            known += [created.id, created.name]
        fuzzer = Fuzzer(random.Random(SEED), known)

        await fuzz_service(running, "ResolveService", "executor", running.broker.resolve_port, fuzzer)
        rss_before = rss_bytes()
        codes = await fuzz_service(running, "AdminService", "admin", running.broker.admin_port, fuzzer)
        codes += await fuzz_service(
            running, "ResolveService", "executor", running.broker.resolve_port, fuzzer
        )
        growth = rss_bytes() - rss_before
        assert growth < MAX_RSS_GROWTH, f"RSS grew {growth / 2**20:.0f} MiB over the fuzz round"
        assert sum(codes.values()) > 100, codes

        # Still answering, correctly: a read on the admin port, a release on the Resolve port.
        types = await running.admin().ListConnectionTypes(pb.ListConnectionTypesRequest())
        assert types.types
        # (The fuzz may have deleted, revoked or purged the connections it knew: make a new one.)
        after = await admin.CreateConnection(db_request(name="after-fuzz", password="pw-after"))
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=after.id, principal=EXECUTOR2))
        resolved = await running.resolver("executor2").Resolve(pb.ResolveRequest(name="after-fuzz"))
        assert resolved.secrets["password"] == "pw-after"
    finally:
        await running.close()
        await running.broker.stop(grace=0)


# ----------------------------------------------------------------- what the fuzz found


async def test_a_stream_the_caller_abandons_does_not_crash_the_broker(running: Running) -> None:
    # The guard asked the finished call's context for its peer when the abandoned stream was
    # closed later: a segfault of the whole broker, first seen in the fuzz run above.
    admin = running.admin()
    for index in range(30):
        await admin.CreateConnection(db_request(name=f"c{index}"))
    for _ in range(30):
        call = admin.ExportAuditEvents(pb.ExportAuditEventsRequest())
        async for _event in call:
            break
        call.cancel()
    await asyncio.sleep(0.2)
    assert (await admin.ListConnectionTypes(pb.ListConnectionTypesRequest())).types


async def test_control_characters_in_ids_filters_and_reasons_name_the_field(running: Running) -> None:
    # PostgreSQL cannot take a NUL as a parameter: each of these was INTERNAL there.
    admin = running.admin()
    created = await admin.CreateConnection(db_request())
    calls = {
        "id": admin.GetConnection(pb.GetConnectionRequest(id="conn_\x00")),
        "connection_id": admin.ListGrants(pb.ListGrantsRequest(connection_id="\x00")),
        "principal": admin.RevokeAccess(pb.RevokeAccessRequest(connection_id=created.id, principal="a\x00")),
        "actor": admin.ListAuditEvents(pb.ListAuditEventsRequest(actor="\x00")),
        "rule": admin.ListSecurityEvents(pb.ListSecurityEventsRequest(rule="\n")),
        "name_prefix": admin.ListConnections(pb.ListConnectionsRequest(name_prefix="\x00")),
        "reason": admin.RevokeConnection(pb.RevokeConnectionRequest(id=created.id, reason="a\x00b")),
    }
    for field, call in calls.items():
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.code())
        assert field_violations(error) == {field: "must not contain control characters"}
    assert (await admin.GetConnection(pb.GetConnectionRequest(id=created.id))).etag == created.etag
