"""Three `broker serve` processes on one fresh PostgreSQL database: the replicas agree.

What a user of a replicated broker would notice, checked through the public API only:

* a change made through one replica (new secret, revoked connection, revoked grant, deletion)
  reaches Resolve on the others within a second, although they had the old answer cached;
* however many Resolves ask the replicas at once for an OAuth2 token nobody holds yet, the
  token endpoint sees one request and everybody gets that token;
* every replica's audit events are in the one hash chain, which verifies on every replica;
* a per-minute limit (admin writes, connection tests) is one budget across replicas;
* a replica that lost its PostgreSQL connections (all of them terminated by the server) never
  serves a revoked or outdated answer from its cache, and recovers by itself.

The three processes start once for the module (in parallel, `tests.processes.Replicas`) on one
database made for it. Tests do not interfere: each uses its own connections, and since
`admin_writes_per_minute` is small here (for the rate-limit test), every few admin writes use a
fresh admin principal (`new_admin`), each with its own budget.

Skipped without BROKER_TEST_POSTGRES_DSN (CI sets it).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc
from tests import oauthserver
from tests.helpers import EXECUTOR, db_request, free_port, rpc_error, struct
from tests.postgres_db import fresh_database_blocking
from tests.processes import Replicas

pytestmark = pytest.mark.integration

REPLICAS = 3
PER_MINUTE = 6  # limits.admin_writes_per_minute and limits.tests_per_minute
SEEN_WITHIN = 1.0  # seconds for a change through one replica to reach Resolve on the others
RECOVERY = 10.0  # seconds for a replica cut off from PostgreSQL to be whole again
CUT = 1.0  # seconds a replica's change listener is kept from listening
OLD, MID, NEW, NEWER = "old-secret", "mid-secret", "new-secret", "newer-secret"
DENIED = grpc.StatusCode.PERMISSION_DENIED
GAUGE = "broker_change_listener_connected"

_admins = itertools.count()


def new_admin(purpose: str) -> str:
    """An admin principal nobody has used yet: a full `admin_writes_per_minute` budget of its own."""
    return f"spiffe://broker.local/tenant/default/admin/{purpose}-{next(_admins)}"


def settings(dsn: str) -> dict[str, dict[str, Any]]:
    return {
        "storage": {"url": dsn, "pool_min": 1, "pool_max": 4},
        "limits": {
            "resolve_per_second": 1_000_000,  # per replica; the polling loops must never meet it
            "resolve_burst": 1_000_000,
            "admin_writes_per_minute": PER_MINUTE,
            "tests_per_minute": PER_MINUTE,
        },
        # Tokens are fetched only when a Resolve asks: the background refresher stays out of the count.
        "oauth": {"refresh_interval_seconds": 3600},
        "egress": {"allow_loopback": True},  # the OAuth2 token endpoint and the tested "database"
        # Nothing the monitor does may change what Resolve answers here.
        "monitor": {
            "spike_min_count": 1_000_000,
            "denied_resolves": 0,
            "failed_tests": 0,
            "new_principal_peer": False,
        },
        "server": {"grace_seconds": 2, "drain_delay_seconds": 0},
    }


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database_blocking() as dsn:  # skips the module without BROKER_TEST_POSTGRES_DSN
        yield dsn


@pytest.fixture(scope="module")
def replicas(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    root: Path = tmp_path_factory.mktemp("replicas")
    cluster = Replicas(root, REPLICAS, settings(database), {"executor": EXECUTOR})
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


class Clients:
    """Stubs for any replica and principal; the channels live as long as the test (its event loop)."""

    def __init__(self, replicas: Replicas) -> None:
        self._replicas = replicas
        self._channels: dict[tuple[int, str, str], grpc.aio.Channel] = {}

    def _channel(self, index: int, principal: str, listener: str) -> grpc.aio.Channel:
        key = (index, principal, listener)
        if key not in self._channels:
            replica = self._replicas[index]
            addr = replica.admin_addr if listener == "admin" else replica.resolve_addr
            self._channels[key] = replica.channel(self._replicas.pki.identity(principal), addr)
        return self._channels[key]

    def admin(self, index: int, principal: str) -> broker_pb2_grpc.AdminServiceStub:
        return broker_pb2_grpc.AdminServiceStub(self._channel(index, principal, "admin"))

    def resolver(self, index: int, principal: str = EXECUTOR) -> broker_pb2_grpc.ResolveServiceStub:
        return broker_pb2_grpc.ResolveServiceStub(self._channel(index, principal, "resolve"))

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels.values()))


@pytest.fixture
async def clients(replicas: Replicas) -> AsyncIterator[Clients]:
    made = Clients(replicas)
    try:
        yield made
    finally:
        await made.close()
    replicas.assert_running()


# ------------------------------------------------------------------ helpers

Answer = tuple[str, str | None]  # ("OK", password) or (status code name, None)


async def create_granted(clients: Clients, name: str, password: str = OLD, on: int = 0) -> str:
    """A database connection that EXECUTOR may resolve (two admin writes, by a fresh admin)."""
    admin = clients.admin(on, new_admin("setup"))
    created = await admin.CreateConnection(db_request(name=name, password=password))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    return str(created.id)


async def answer(clients: Clients, index: int, connection_id: str, principal: str = EXECUTOR) -> Answer:
    """What Resolve on replica `index` says (to `principal`): the password, or the error's status code."""
    try:
        reply = await clients.resolver(index, principal).Resolve(
            pb.ResolveRequest(connection_id=connection_id), timeout=5
        )
    except grpc.aio.AioRpcError as exc:
        return (exc.code().name, None)
    return ("OK", reply.secrets["password"])


def ok(password: str) -> Answer:
    return ("OK", password)


async def until(
    clients: Clients,
    index: int,
    connection_id: str,
    wanted: Answer,
    before: Answer,
    since: float | None = None,
    limit: float = 3.0,
    principal: str = EXECUTOR,
) -> float:
    """Poll replica `index` until it answers `wanted`; the seconds that took (counted from `since`, a
    `time.monotonic()`, or now). Until then every answer must be `before` (anything else is a bug)."""
    began = time.monotonic() if since is None else since
    while True:
        got = await answer(clients, index, connection_id, principal)
        elapsed = time.monotonic() - began
        if got == wanted:
            return elapsed
        assert got == before, f"replica {index} answered {got}, expected {before} then {wanted}"
        if elapsed > limit:
            return elapsed  # the caller's assertion reports it
        await asyncio.sleep(0.01)


async def listener_gauge(url: str) -> float | None:
    """`broker_change_listener_connected` from a replica's /metrics; None when it is not exported."""
    async with httpx.AsyncClient(timeout=2) as http:
        text = (await http.get(url)).text
    for line in text.splitlines():
        if line.startswith((GAUGE + " ", GAUGE + "{")):
            return float(line.rsplit(" ", 1)[1])
    return None


async def all_events(admin: broker_pb2_grpc.AdminServiceStub, **query: Any) -> list[pb.AuditEvent]:
    events: list[pb.AuditEvent] = []
    token = ""
    while True:
        page = await admin.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=1000, page_token=token, **query)
        )
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


# ------------------------------------------------------------------ a. changes reach every replica


Change = Callable[[broker_pb2_grpc.AdminServiceStub, str], Awaitable[Any]]
CHANGES: dict[str, tuple[Change, Answer]] = {
    "update": (
        lambda admin, cid: admin.UpdateConnection(
            pb.UpdateConnectionRequest(id=cid, secrets={"password": NEW})
        ),
        ok(NEW),
    ),
    "revoke_connection": (
        lambda admin, cid: admin.RevokeConnection(pb.RevokeConnectionRequest(id=cid, reason="test")),
        (DENIED.name, None),
    ),
    "revoke_access": (
        lambda admin, cid: admin.RevokeAccess(pb.RevokeAccessRequest(connection_id=cid, principal=EXECUTOR)),
        (DENIED.name, None),
    ),
    "delete": (
        lambda admin, cid: admin.DeleteConnection(pb.DeleteConnectionRequest(id=cid)),
        (DENIED.name, None),
    ),
}


@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_change_through_one_replica_reaches_resolve_on_the_others_within_a_second(
    clients: Clients, change: str
) -> None:
    write, wanted = CHANGES[change]
    cid = await create_granted(clients, f"seen-{change}")
    # Every replica answers (and caches) the old value first.
    for index in range(REPLICAS):
        assert await answer(clients, index, cid) == ok(OLD)

    await write(clients.admin(0, new_admin("change")), cid)
    written = time.monotonic()
    # The replica that made the change knows at once...
    assert await answer(clients, 0, cid) == wanted
    # ...and the others within a second.
    took = await asyncio.gather(
        *(until(clients, index, cid, wanted, before=ok(OLD), since=written) for index in range(1, REPLICAS))
    )
    report = ", ".join(f"replica {i}: {t:.3f}s" for i, t in enumerate(took, start=1))
    print(f"{change} seen after: {report}")
    assert max(took) < SEEN_WITHIN, f"{change} through replica 0 not seen within {SEEN_WITHIN}s: {report}"
    for index in range(REPLICAS):  # and it stays seen
        assert await answer(clients, index, cid) == wanted


async def test_a_principal_cut_off_through_one_replica_is_refused_by_every_replica_within_a_second(
    clients: Clients,
) -> None:
    cut = "spiffe://broker.local/tenant/default/executor/compromised"
    cids = [await create_granted(clients, f"cut-{i}") for i in range(3)]  # EXECUTOR's, kept
    granting = clients.admin(2, new_admin("grant"))
    for cid in cids:
        await granting.GrantAccess(pb.GrantAccessRequest(connection_id=cid, principal=cut))
    for index in range(REPLICAS):  # every replica has the answer cached
        for cid in cids:
            assert await answer(clients, index, cid, cut) == ok(OLD)

    request = pb.RevokeAccessRequest(principal=cut, every_connection=True)
    reply = await clients.admin(1, new_admin("cut")).RevokeAccess(request)
    written = time.monotonic()
    assert reply.grants_removed == len(cids)
    for cid in cids:  # the replica that made the change knows at once...
        assert await answer(clients, 1, cid, cut) == (DENIED.name, None)
    took = await asyncio.gather(  # ...and the others within a second, on every connection
        *(
            until(clients, index, cid, (DENIED.name, None), before=ok(OLD), since=written, principal=cut)
            for index in (0, 2)
            for cid in cids
        )
    )
    assert max(took) < SEEN_WITHIN, f"cut off not seen everywhere within {SEEN_WITHIN}s: {took}"
    for index in range(REPLICAS):  # it stays seen, and the other executor keeps its grants
        for cid in cids:
            assert await answer(clients, index, cid, cut) == (DENIED.name, None)
            assert await answer(clients, index, cid) == ok(OLD)


# ------------------------------------------------------------------ b. one token request across replicas


async def test_concurrent_resolves_on_every_replica_share_one_token_request(clients: Clients) -> None:
    with oauthserver.running() as server:
        # A slow token endpoint: every replica's Resolves are waiting while the one request runs.
        server.delay = 0.5
        admin = clients.admin(0, new_admin("oauth"))
        config = {
            "client_id": server.client_id, "token_url": server.token_url,
            "grant_type": "client_credentials", "scopes": ["reports"],
        }  # fmt: skip
        created = await admin.CreateConnection(
            pb.CreateConnectionRequest(
                name="machine-token", type="oauth2", provider="custom", config=struct(config),
                secrets={"client_secret": server.client_secret},
            )
        )  # fmt: skip
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
        assert sum(server.token_requests.values()) == 0  # nothing fetched before a Resolve asks

        request = pb.ResolveRequest(connection_id=created.id)
        results = await asyncio.gather(
            *(clients.resolver(i % REPLICAS).Resolve(request, timeout=20) for i in range(100)),
            return_exceptions=True,
        )
        failures = [repr(r) for r in results if not isinstance(r, pb.ResolveResponse)]
        assert not failures, failures[:3]
        tokens = {r.secrets["access_token"] for r in results if isinstance(r, pb.ResolveResponse)}
        assert dict(server.token_requests) == {"client_credentials": 1}, server.token_requests
        assert len(tokens) == 1, f"{len(tokens)} different access tokens handed out"
        assert tokens <= server.valid_access_tokens()


# ------------------------------------------------------------------ c. one audit chain


async def test_every_replicas_audit_events_join_one_chain_that_verifies_everywhere(clients: Clients) -> None:
    cid = await create_granted(clients, "audited")
    per_replica = 10
    # All at once, so the replicas' appends to the chain really interleave.
    await asyncio.gather(
        *(
            clients.resolver(index).Resolve(pb.ResolveRequest(connection_id=cid, purpose=f"via-{index}"))
            for index in range(REPLICAS)
            for _ in range(per_replica)
        )
    )
    reader = new_admin("auditor")  # reads are not limited; one reader for every replica
    for index in range(REPLICAS):
        admin = clients.admin(index, reader)
        events = await all_events(admin, connection_id=cid, action="connection.resolve")
        allowed = [e for e in events if e.outcome == "allowed"]
        assert len(allowed) == REPLICAS * per_replica, f"replica {index} lists {len(allowed)}"
        by_replica = {f"via-{i}": 0 for i in range(REPLICAS)}
        for event in allowed:
            by_replica[event.details["purpose"]] += 1
        assert by_replica == dict.fromkeys(by_replica, per_replica)
        report = await admin.VerifyAuditLog(pb.VerifyAuditLogRequest())
        assert report.ok, f"replica {index}: {report}"
        assert report.events_checked >= REPLICAS * per_replica


# ------------------------------------------------------------------ d. shared per-minute limits


@pytest.mark.parametrize("kind", ["admin_writes", "tests"])
async def test_a_per_minute_limit_is_one_budget_across_replicas(clients: Clients, kind: str) -> None:
    principal = new_admin(f"limited-{kind}")
    closed = free_port()  # a connection test that fails fast: nothing listens there
    draft = pb.ConnectionDraft(
        name="unreachable", type="database",
        config=struct({"driver": "postgresql", "host": "127.0.0.1", "port": closed, "username": "app",
                       "database": "app"}),
        secrets={"password": "x"},
    )  # fmt: skip
    calls = itertools.count()

    async def call(index: int) -> Any:
        admin = clients.admin(index, principal)
        if kind == "admin_writes":
            return await admin.CreateConnection(db_request(name=f"limited-{next(calls)}"))
        return await admin.TestConnection(pb.TestConnectionRequest(draft=draft))

    # The whole minute's budget, spread over the replicas: every call gets through...
    for n in range(PER_MINUTE):
        await call(n % REPLICAS)
    # ...and then no replica has any left, for calls in series or at once.
    refused = [await rpc_error(call(index)) for index in range(REPLICAS)]
    refused += await asyncio.gather(*(rpc_error(call(index)) for index in range(REPLICAS)))
    codes = [error.code().name for error in refused]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED.name] * len(refused), codes


# ------------------------------------------------------------------ e. a replica cut off from PostgreSQL


async def terminate_backends(conn: asyncpg.Connection, pid: int, only: str = "") -> list[str]:
    """Terminate PostgreSQL backends of broker process `pid` (`only`: those matching this condition on
    pg_stat_activity), waiting until each is gone; their application names."""
    rows = await conn.fetch(
        "SELECT application_name, pg_terminate_backend(pid, 5000) AS gone FROM pg_stat_activity "
        f"WHERE application_name LIKE $1 {'AND ' + only if only else ''}",
        f"broker/{pid}/%",
    )
    assert all(row["gone"] for row in rows), rows
    return [str(row["application_name"]) for row in rows]


# The replica's change listener (see broker.store.postgres.engine._session_settings).
LISTENER_SESSION = "application_name LIKE 'broker/%/listen/%'"


async def keep_listener_down(conn: asyncpg.Connection, pid: int, stop: asyncio.Event) -> int:
    """Terminate `pid`'s change listener each time it reconnects, until `stop`; how many times."""
    total = 0
    while not stop.is_set():
        total += len(await terminate_backends(conn, pid, only=LISTENER_SESSION))
        await asyncio.sleep(0.002)
    return total


def stale(revoked: Answer, kept: Answer, current: Answer) -> list[Answer]:
    """A's answers that did not come from the database as it is now: the revoked connection
    released, or the kept one's old secret. UNAVAILABLE (a refusal to retry) is not stale."""
    unavailable = grpc.StatusCode.UNAVAILABLE.name
    bad = [revoked] if revoked[0] not in (DENIED.name, unavailable) else []
    return bad + ([kept] if kept != current and kept[0] != unavailable else [])


async def test_a_replica_that_lost_its_database_sessions_serves_nothing_stale_and_recovers(
    replicas: Replicas, clients: Clients, database: str
) -> None:
    a, b = 0, 1
    for replica in replicas:
        assert await listener_gauge(replica.metrics_url) == 1, f"{replica.name} is not listening"
    kept = await create_granted(clients, "kept")
    revoked = await create_granted(clients, "revoked")
    for cid in (kept, revoked):
        assert await answer(clients, a, cid) == ok(OLD)  # cached on A
    admin_b = clients.admin(b, new_admin("cutoff"))
    await admin_b.GetConnection(pb.GetConnectionRequest(id=kept))  # connected: the writes go out at once

    killer = await asyncpg.connect(database)
    try:
        names = await terminate_backends(killer, replicas[a].pid)
        assert len(names) >= 2, f"expected A's pool and listener sessions, found {names}"
        # From here on A's listener is cut off each time it comes back (its pool may reconnect).
        # B revokes at once, and updates (twice) once A has had time to fill its cache again. Whatever A
        # answers meanwhile must be what the database holds.
        stop = asyncio.Event()
        cutting = asyncio.create_task(keep_listener_down(killer, replicas[a].pid, stop))
        await admin_b.RevokeConnection(pb.RevokeConnectionRequest(id=revoked, reason="test"))
        during: list[tuple[Answer, Answer, Answer]] = []  # (revoked, kept, kept's current answer)
        gauges: set[float | None] = set()

        async def poll_a(seconds: float, current: Answer) -> None:
            until_then = time.monotonic() + seconds
            for n in itertools.count():
                if time.monotonic() > until_then:
                    return
                kept_now = await answer(clients, a, kept)  # first: the update is the newer change
                during.append((await answer(clients, a, revoked), kept_now, current))
                if n % 4 == 0:
                    gauges.add(await listener_gauge(replicas[a].metrics_url))

        await poll_a(CUT / 3, ok(OLD))
        for password in (MID, NEW):
            await admin_b.UpdateConnection(
                pb.UpdateConnectionRequest(id=kept, secrets={"password": password})
            )
            await poll_a(CUT / 3, ok(password))
        stop.set()
        relistens = await cutting
    finally:
        await killer.close()
    bad = [x for answers in during for x in stale(*answers)]
    assert not bad, f"A served from its old cache while not listening: {Counter(bad)}"
    # Not listening, A still answers, from the database; and says it is not listening.
    assert ((DENIED.name, None), ok(NEW), ok(NEW)) in during, f"A never answered during the cut: {during}"
    assert 0 in gauges, f"{GAUGE} never read 0 during the cut ({relistens} listener sessions cut)"

    # Left alone, A listens again by itself; every answer meanwhile is current (or a refusal).
    began = time.monotonic()
    while True:
        last = (await answer(clients, a, revoked), await answer(clients, a, kept))
        bad += stale(*last, ok(NEW))
        gauge = await listener_gauge(replicas[a].metrics_url)
        if last == ((DENIED.name, None), ok(NEW)) and gauge == 1:
            break
        if time.monotonic() - began > RECOVERY:
            break
        await asyncio.sleep(0.05)
    recovered_after = time.monotonic() - began
    assert not bad, f"A served from its old cache while recovering: {Counter(bad)}"
    assert recovered_after <= RECOVERY, (
        f"A not recovered after {RECOVERY}s: {last}, {GAUGE}={gauge}\n{replicas[a].logs(tail=40)}"
    )

    # Whole again: a later change through B reaches A within a second, as before the cut.
    await admin_b.UpdateConnection(pb.UpdateConnectionRequest(id=kept, secrets={"password": NEWER}))
    took = await until(clients, a, kept, ok(NEWER), before=ok(NEW))
    print(f"listening again after {recovered_after:.3f}s; the next update seen after {took:.3f}s")
    assert took < SEEN_WITHIN, (
        f"an update through B reached A after {took:.3f}s (listening again after {recovered_after:.1f}s)"
    )
    for index in range(REPLICAS):
        assert await answer(clients, index, revoked) == (DENIED.name, None)
