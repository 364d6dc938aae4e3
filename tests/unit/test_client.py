"""The executor SDK over a fake channel and a fake clock: the cache, refs, errors and masking."""

from __future__ import annotations

import asyncio
import datetime as dt
import pickle
import threading
from typing import Any

import grpc
import pytest

from broker import client as client_module
from broker._proto import broker_pb2 as pb
from broker.client import ResolveClient, Resolved, SyncResolveClient

CANARY = "canary-93be-secret"
WALL_START = 1_750_000_000.0  # seconds since the epoch when the fake clocks start


class Clock:
    """Both clocks move together: `now` is monotonic, `wall` is seconds since the epoch."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL_START + (self.now - 1000.0)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def reply(ttl: int = 60, expires_in: float | None = None, **overrides: Any) -> pb.ResolveResponse:
    fields: dict[str, Any] = {
        "connection_id": "conn_1",
        "name": "orders-db",
        "type": "database",
        "provider": "postgres",
        "secrets": {"password": CANARY},
        "cache_ttl_seconds": ttl,
    }
    message = pb.ResolveResponse(**(fields | overrides))
    message.config.update({"host": "db.internal", "port": 5432, "ratio": 0.5, "tags": [1, "a"]})
    if expires_in is not None:
        message.expires_at.FromDatetime(dt.datetime.fromtimestamp(WALL_START + expires_in, dt.UTC))
    return message


class FakeChannel:
    """Stands in for a grpc channel: the generated stub asks it for a `unary_unary` callable."""

    def __init__(self, *replies: Any, is_async: bool) -> None:
        self.replies = list(replies)
        self.requests: list[pb.ResolveRequest] = []
        self.timeouts: list[float | None] = []
        self.is_async = is_async
        self.closed = False
        # RenewLease / RevokeLease: each call as (method, lease_id); answers from `lease_answers`
        # (a function of the request: a reply, or an exception to raise).
        self.lease_calls: list[tuple[str, str]] = []
        self.lease_answers: dict[str, Any] = {}

    def unary_unary(self, method: str, **_: Any) -> Any:
        name = method.rsplit("/", 1)[1]
        if name in ("RenewLease", "RevokeLease"):
            return self._lease_call(name)
        if method != "/broker.v1.ResolveService/Resolve":
            return self._not_expected  # the stub makes a callable for every method of the service
        return self._call_async if self.is_async else self._call

    def _lease_call(self, name: str) -> Any:
        def call(request: Any, timeout: float | None = None) -> Any:
            self.lease_calls.append((name, request.lease_id))
            answer = self.lease_answers.get(name, lambda r: pb.Lease(id=r.lease_id))(request)
            if isinstance(answer, Exception):
                raise answer
            return answer

        async def call_async(request: Any, timeout: float | None = None) -> Any:
            return call(request, timeout)

        return call_async if self.is_async else call

    @staticmethod
    def _not_expected(*_: Any, **__: Any) -> Any:
        raise AssertionError("only Resolve is expected here")

    def _call(self, request: pb.ResolveRequest, timeout: float | None = None) -> pb.ResolveResponse:
        self.requests.append(request)
        self.timeouts.append(timeout)
        answer = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    async def _call_async(
        self, request: pb.ResolveRequest, timeout: float | None = None
    ) -> pb.ResolveResponse:
        return self._call(request, timeout)

    def close(self) -> Any:
        self.closed = True
        if self.is_async:

            async def done() -> None:
                return None

            return done()
        return None


def sync_client(channel: FakeChannel, clock: Clock, **kwargs: Any) -> SyncResolveClient:
    return SyncResolveClient.from_channel(channel, clock=clock.monotonic, wall_clock=clock.wall, **kwargs)


class RpcFailure(grpc.RpcError):  # type: ignore[misc]  # grpc is untyped
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.PERMISSION_DENIED


# ------------------------------------------------------------------ cache


def test_reply_is_cached_for_exactly_its_ttl() -> None:
    clock, channel = Clock(), FakeChannel(reply(ttl=30), is_async=False)
    client = sync_client(channel, clock)
    first = client.resolve("conn_1")
    clock.advance(29.999)
    assert client.resolve("conn_1") is first
    assert len(channel.requests) == 1
    clock.advance(0.001)  # the TTL is over at exactly 30 s
    client.resolve("conn_1")
    assert len(channel.requests) == 2


def test_ttl_zero_means_no_caching() -> None:
    clock, channel = Clock(), FakeChannel(reply(ttl=0), is_async=False)
    client = sync_client(channel, clock)
    client.resolve("conn_1")
    client.resolve("conn_1")
    assert len(channel.requests) == 2


def test_cache_false_always_asks_the_broker() -> None:
    clock, channel = Clock(), FakeChannel(reply(ttl=600), is_async=False)
    client = sync_client(channel, clock, cache=False)
    client.resolve("conn_1")
    client.resolve("conn_1")
    assert len(channel.requests) == 2


def test_never_served_past_expires_at() -> None:
    clock, channel = Clock(), FakeChannel(reply(ttl=300, expires_in=10), is_async=False)
    client = sync_client(channel, clock)
    first = client.resolve("conn_1")
    assert first.expires_at == dt.datetime.fromtimestamp(WALL_START + 10, dt.UTC)
    clock.advance(9.5)
    assert client.resolve("conn_1") is first
    clock.advance(0.5)
    client.resolve("conn_1")
    assert len(channel.requests) == 2


def test_already_expired_reply_is_returned_but_not_cached() -> None:
    clock, channel = Clock(), FakeChannel(reply(ttl=300, expires_in=-1), is_async=False)
    client = sync_client(channel, clock)
    assert client.resolve("conn_1").secrets == {"password": CANARY}
    client.resolve("conn_1")
    assert len(channel.requests) == 2


def test_id_and_name_are_cached_separately() -> None:
    clock, channel = Clock(), FakeChannel(reply(), is_async=False)
    client = sync_client(channel, clock)
    client.resolve("conn_1")
    client.resolve(name="orders-db")
    client.resolve(name="orders-db")
    client.resolve(connection_id="conn_1")
    assert [r.WhichOneof("ref") for r in channel.requests] == ["connection_id", "name"]
    assert channel.requests[1].name == "orders-db"


def test_invalidate_one_ref_or_all() -> None:
    clock, channel = Clock(), FakeChannel(reply(), is_async=False)
    client = sync_client(channel, clock)
    client.resolve("conn_1")
    client.resolve(name="orders-db")
    client.invalidate(name="orders-db")
    client.resolve("conn_1")
    client.resolve(name="orders-db")
    assert len(channel.requests) == 3
    client.invalidate()
    client.resolve("conn_1")
    assert len(channel.requests) == 4


def test_errors_propagate_and_are_not_cached() -> None:
    clock = Clock()
    channel = FakeChannel(RpcFailure(), reply(), is_async=False)
    client = sync_client(channel, clock)
    with pytest.raises(grpc.RpcError):
        client.resolve("conn_1")
    assert client.resolve("conn_1").connection_id == "conn_1"
    assert len(channel.requests) == 2


# -------------------------------------------------------- secret versions


def superseded(seconds_ago: float = 30) -> dict[str, Any]:
    """Reply fields for a secret replaced `seconds_ago` before the fake wall clock's start."""
    when = pb.ResolveResponse()
    when.superseded_at.FromDatetime(dt.datetime.fromtimestamp(WALL_START - seconds_ago, dt.UTC))
    return {"superseded_at": when.superseded_at}


def test_reresolve_after_the_ttl_sends_the_version_held_and_surfaces_superseded_at() -> None:
    clock = Clock()
    channel = FakeChannel(
        reply(ttl=30, secret_version=3), reply(ttl=30, secret_version=4, **superseded()), is_async=False
    )
    client = sync_client(channel, clock)
    first = client.resolve("conn_1")
    assert first.secret_version == 3 and first.superseded_at is None
    assert channel.requests[0].known_secret_version == 0  # nothing held yet
    clock.advance(30)
    second = client.resolve("conn_1")
    assert channel.requests[1].known_secret_version == 3
    assert second.secret_version == 4
    assert second.superseded_at == dt.datetime.fromtimestamp(WALL_START - 30, dt.UTC)
    # Told once: the cached copy does not report the change again.
    again = client.resolve("conn_1")
    assert len(channel.requests) == 2
    assert again.secret_version == 4 and again.superseded_at is None
    assert again.secrets == second.secrets
    clock.advance(30)
    client.resolve("conn_1")
    assert channel.requests[2].known_secret_version == 4


def test_refresh_skips_the_cache_and_sends_the_version_held() -> None:
    clock = Clock()
    channel = FakeChannel(
        reply(ttl=600, secret_version=1), reply(ttl=600, secret_version=2, **superseded()), is_async=False
    )
    client = sync_client(channel, clock)
    client.resolve(name="orders-db")
    fresh = client.resolve(name="orders-db", refresh=True)
    assert [r.known_secret_version for r in channel.requests] == [0, 1]
    assert fresh.secret_version == 2 and fresh.superseded_at is not None
    assert client.resolve(name="orders-db").superseded_at is None  # served from the cache
    assert len(channel.requests) == 2


def test_invalidate_drops_the_reply_but_not_the_version_held() -> None:
    clock, channel = Clock(), FakeChannel(reply(secret_version=7), is_async=False)
    client = sync_client(channel, clock)
    client.resolve("conn_1")
    client.invalidate()
    client.resolve("conn_1")
    assert [r.known_secret_version for r in channel.requests] == [0, 7]


def test_versions_are_held_per_ref_and_without_a_cache() -> None:
    clock, channel = Clock(), FakeChannel(reply(secret_version=5), is_async=False)
    client = sync_client(channel, clock, cache=False)
    client.resolve("conn_1")
    client.resolve(name="orders-db")  # another ref: it has held nothing yet
    client.resolve("conn_1")
    assert [r.known_secret_version for r in channel.requests] == [0, 0, 5]


def test_versions_held_are_bounded_oldest_forgotten_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_HELD", 2)
    clock, channel = Clock(), FakeChannel(reply(secret_version=5), is_async=False)
    client = sync_client(channel, clock, cache=False)
    for ref in ("conn_1", "conn_2", "conn_1", "conn_3", "conn_2", "conn_1"):
        client.resolve(ref)
    # Held after each call: {1}, {1,2}, {1,2}, {2,3} (conn_1 was the oldest), {2,3}, {3,1}.
    assert [r.known_secret_version for r in channel.requests] == [0, 0, 5, 0, 5, 0]


def test_superseded_at_of_another_connection_is_not_reported() -> None:
    # The name now belongs to a different connection: the broker's time is of that one's history.
    clock = Clock()
    channel = FakeChannel(
        reply(ttl=0, secret_version=3),
        reply(ttl=0, secret_version=9, connection_id="conn_2", **superseded()),
        reply(ttl=0, secret_version=9, connection_id="conn_2"),
        is_async=False,
    )
    client = sync_client(channel, clock)
    client.resolve(name="orders-db")
    other = client.resolve(name="orders-db")
    assert other.connection_id == "conn_2" and other.superseded_at is None
    client.resolve(name="orders-db")
    assert [r.known_secret_version for r in channel.requests] == [0, 3, 9]


def test_an_older_answer_arriving_late_does_not_lower_the_version_held() -> None:
    clock = Clock()
    channel = FakeChannel(reply(ttl=0, secret_version=4), reply(ttl=0, secret_version=2), is_async=False)
    client = sync_client(channel, clock)
    client.resolve("conn_1")
    client.resolve("conn_1")
    client.resolve("conn_1")
    assert [r.known_secret_version for r in channel.requests] == [0, 4, 4]


async def test_async_client_sends_the_version_held() -> None:
    clock = Clock()
    channel = FakeChannel(
        reply(ttl=5, secret_version=1), reply(secret_version=2, **superseded()), is_async=True
    )
    async with ResolveClient.from_channel(channel, clock=clock.monotonic, wall_clock=clock.wall) as client:
        await client.resolve("conn_1")
        fresh = await client.resolve("conn_1", refresh=True)
    assert [r.known_secret_version for r in channel.requests] == [0, 1]
    assert fresh.superseded_at is not None


# ------------------------------------------------------------------- refs


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"connection_id": "c", "name": "n"}, {"connection_id": ""}, {"name": ""}],
)
def test_exactly_one_non_empty_ref(kwargs: dict[str, str]) -> None:
    channel = FakeChannel(reply(), is_async=False)
    with pytest.raises(ValueError):
        sync_client(channel, Clock()).resolve(**kwargs)
    assert channel.requests == []


def test_request_carries_purpose_and_timeout() -> None:
    channel = FakeChannel(reply(), is_async=False)
    sync_client(channel, Clock(), timeout=2.5).resolve(name="orders-db", purpose="nightly export")
    assert channel.requests[0].purpose == "nightly export"
    assert channel.timeouts == [2.5]


# ----------------------------------------------------------------- values


def test_resolved_values() -> None:
    resolved = sync_client(FakeChannel(reply(), is_async=False), Clock()).resolve("conn_1")
    assert resolved.config == {"host": "db.internal", "port": 5432, "ratio": 0.5, "tags": [1, "a"]}
    assert isinstance(resolved.config["port"], int)
    assert resolved.secrets == {"password": CANARY}
    assert (resolved.name, resolved.type, resolved.provider) == ("orders-db", "database", "postgres")
    assert resolved.expires_at is None and resolved.cache_ttl_seconds == 60
    assert resolved.secret_version == 0 and resolved.superseded_at is None


def test_repr_masks_secret_values_and_pickling_is_refused() -> None:
    resolved = sync_client(FakeChannel(reply(), is_async=False), Clock()).resolve("conn_1")
    text = repr(resolved)
    assert CANARY not in text and CANARY not in str(resolved) and CANARY not in f"{resolved}"
    assert "'password': '***'" in text and "db.internal" in text
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(resolved)


def test_resolved_is_frozen() -> None:
    resolved = Resolved("c", "n", "t", "p", {}, {}, None, 0)
    with pytest.raises(AttributeError):
        resolved.name = "other"  # type: ignore[misc]


# ------------------------------------------------------------------ async


async def test_async_client_caches_and_closes() -> None:
    clock, channel = Clock(), FakeChannel(reply(ttl=5), is_async=True)
    async with ResolveClient.from_channel(channel, clock=clock.monotonic, wall_clock=clock.wall) as client:
        first = await client.resolve("conn_1", purpose="job 7")
        assert await client.resolve("conn_1") is first
        clock.advance(5)
        await client.resolve("conn_1")
        assert len(channel.requests) == 2
        with pytest.raises(ValueError):
            await client.resolve()
    assert channel.closed


async def test_async_errors_propagate() -> None:
    channel = FakeChannel(RpcFailure(), is_async=True)
    client = ResolveClient.from_channel(channel)
    with pytest.raises(grpc.RpcError):
        await client.resolve(name="x")
    await client.close()


def test_sync_client_context_manager_closes() -> None:
    channel = FakeChannel(reply(), is_async=False)
    with SyncResolveClient.from_channel(channel) as client:
        client.resolve("conn_1")
    assert channel.closed


# ------------------------------------------------------------------ leases


def at(seconds: float) -> dt.datetime:
    """A time `seconds` after the fake wall clock's start."""
    return dt.datetime.fromtimestamp(WALL_START + seconds, dt.UTC)


def leased(
    lease_id: str = "lease_1", life: float = 300, max_life: float = 3000, **fields: Any
) -> pb.ResolveResponse:
    """A dynamic connection's answer: a lease ending `life` seconds after the fake clock's start."""
    message = reply(ttl=60, expires_in=life, secrets={"password": CANARY}, **fields)
    message.config.update({"username": f"brk_{lease_id[-1] * 16}"})
    message.lease.CopyFrom(pb.Lease(id=lease_id, connection_id="conn_1", username=f"brk_{lease_id[-1] * 16}"))
    message.lease.expires_at.FromDatetime(at(life))
    message.lease.max_expires_at.FromDatetime(at(max_life))
    return message


class RenewFrom:
    """RenewLease answers: the lease extended by `life` s from the fake clock's now, up to `max_life`."""

    def __init__(self, clock: Clock, life: float = 300, max_life: float = 3000) -> None:
        self.clock, self.life, self.max_life = clock, life, max_life

    def __call__(self, request: pb.RenewLeaseRequest) -> pb.Lease:
        lease = pb.Lease(id=request.lease_id, state=pb.LEASE_STATE_ACTIVE)
        lease.expires_at.FromDatetime(at(min(self.clock.now - 1000 + self.life, self.max_life)))
        lease.max_expires_at.FromDatetime(at(self.max_life))
        return lease


class Unavailable(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_a_lease_is_exposed_and_run_id_is_sent() -> None:
    clock, channel = Clock(), FakeChannel(leased(), is_async=False)
    with sync_client(channel, clock) as client:
        resolved = client.resolve(name="orders-db", run_id="run-7")
    assert channel.requests[0].run_id == "run-7"
    assert resolved.lease is not None
    assert (resolved.lease.id, resolved.lease.username) == ("lease_1", "brk_1111111111111111")
    assert (resolved.lease.expires_at, resolved.lease.max_expires_at) == (at(300), at(3000))
    assert resolved.config["username"] == resolved.lease.username
    assert CANARY not in repr(resolved) and "lease_1" in repr(resolved)


def test_a_cached_answer_is_never_served_to_another_run() -> None:
    clock = Clock()
    channel = FakeChannel(leased("lease_1"), leased("lease_2"), leased("lease_3"), is_async=False)
    client = sync_client(channel, clock)
    first = client.resolve(name="orders-db", run_id="run-a")
    other = client.resolve(name="orders-db", run_id="run-b")
    again = client.resolve(name="orders-db", run_id="run-a")
    assert first.lease and other.lease and first.lease.id != other.lease.id
    assert again is first and len(channel.requests) == 2
    assert [r.run_id for r in channel.requests] == ["run-a", "run-b"]
    client.invalidate(name="orders-db")  # every run's answer for the ref
    assert client.resolve(name="orders-db", run_id="run-b").lease.id == "lease_3"  # type: ignore[union-attr]
    client.close()


def test_a_lease_is_renewed_after_two_thirds_of_its_life_up_to_its_max() -> None:
    clock, channel = Clock(), FakeChannel(leased(life=300, max_life=700), is_async=False)
    channel.lease_answers["RenewLease"] = RenewFrom(clock, life=300, max_life=700)
    client = sync_client(channel, clock)
    client.resolve(name="orders-db")
    assert client.renew_due() == pytest.approx(200)
    clock.advance(199)
    client.renew_due()
    assert channel.lease_calls == []
    clock.advance(1)  # 2/3 of 300 s
    assert client.renew_due() == pytest.approx(200)  # the new end is 500: renewed again at 400
    assert channel.lease_calls == [("RenewLease", "lease_1")]
    clock.advance(200)
    client.renew_due()  # the answer reaches max_expires_at (700): no more renewals
    assert len(channel.lease_calls) == 2
    assert client.renew_due() is None
    clock.advance(299)
    client.renew_due()
    assert len(channel.lease_calls) == 2
    client.close()


def test_only_the_newest_lease_of_a_ref_is_renewed_and_close_revokes_every_live_one() -> None:
    clock = Clock()
    channel = FakeChannel(leased("lease_1", life=300), leased("lease_2", life=300), is_async=False)
    channel.lease_answers["RenewLease"] = RenewFrom(clock)
    client = sync_client(channel, clock)
    client.resolve(name="orders-db")
    clock.advance(60)  # the cache TTL: resolving again makes a second lease
    client.resolve(name="orders-db")
    assert len(channel.requests) == 2
    clock.advance(200)
    client.renew_due()  # lease_1 is due (2/3 of its life) but no longer the newest
    clock.advance(60)
    client.renew_due()
    assert channel.lease_calls == [("RenewLease", "lease_2")]
    client.close()
    # lease_1 ended at 300 (not renewed) and is not revoked; lease_2 was extended and is.
    assert channel.lease_calls[1:] == [("RevokeLease", "lease_2")]
    assert channel.closed


def test_close_revokes_and_logs_failures_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    channel = FakeChannel(leased("lease_1"), leased("lease_2"), is_async=False)
    channel.lease_answers["RevokeLease"] = lambda r: Unavailable() if r.lease_id == "lease_1" else pb.Lease()
    client = sync_client(channel, clock)
    client.resolve(name="orders-db", run_id="a")
    client.resolve(name="orders-db", run_id="b")
    with caplog.at_level("WARNING", logger="broker.client"):
        client.close()
    assert sorted(channel.lease_calls) == [("RevokeLease", "lease_1"), ("RevokeLease", "lease_2")]
    assert "could not revoke lease lease_1 on close (UNAVAILABLE)" in caplog.text
    assert CANARY not in caplog.text and channel.closed


def test_a_renewal_that_fails_is_retried_and_an_ended_lease_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, channel = Clock(), FakeChannel(leased(life=300), is_async=False)
    answers = [Unavailable(), Unavailable(grpc.StatusCode.FAILED_PRECONDITION)]
    channel.lease_answers["RenewLease"] = lambda r: answers.pop(0)
    client = sync_client(channel, clock)
    client.resolve(name="orders-db")
    clock.advance(200)
    with caplog.at_level("INFO", logger="broker.client"):
        assert client.renew_due() == pytest.approx(50)  # half of what is left
        clock.advance(50)
        assert client.renew_due() is None  # the broker says it ended: not tried again
    assert channel.lease_calls == [("RenewLease", "lease_1")] * 2
    assert "could not renew lease lease_1 (UNAVAILABLE)" in caplog.text
    client.close()
    assert channel.lease_calls[2:] == []  # nothing held any more: nothing to revoke


def test_renew_and_revoke_lease_by_hand() -> None:
    clock, channel = Clock(), FakeChannel(leased("lease_1"), leased("lease_2"), is_async=False)
    channel.lease_answers["RenewLease"] = RenewFrom(clock, life=1000)
    channel.lease_answers["RevokeLease"] = lambda r: pb.Lease(id=r.lease_id, state=pb.LEASE_STATE_REVOKED)
    client = sync_client(channel, clock)
    client.resolve(name="orders-db")
    renewed = client.renew_lease("lease_1", increment_seconds=1000)
    assert renewed.expires_at == at(1000) and renewed.id == "lease_1"
    assert client.renew_due() == pytest.approx(2000 / 3)  # the schedule follows the new end
    revoked = client.revoke_lease("lease_1")
    assert revoked.state == "revoked"
    # The revoked user's answer is not served from the cache any more, nor renewed or revoked again.
    assert client.resolve(name="orders-db").lease.id == "lease_2"  # type: ignore[union-attr]
    assert channel.lease_calls == [("RenewLease", "lease_1"), ("RevokeLease", "lease_1")]
    client.close()  # lease_2 is revoked; lease_1 is not revoked again
    assert channel.lease_calls[2:] == [("RevokeLease", "lease_2")]


def test_sync_client_renews_from_a_thread_and_stops_on_close() -> None:
    # Real clocks: a lease of 1.5 s is renewed after about 1 s by the daemon thread.
    channel = FakeChannel(real_time_lease(life=1.5), is_async=False)
    renewed = threading.Event()

    def renew(request: pb.RenewLeaseRequest) -> pb.Lease:
        renewed.set()
        return real_time_lease(life=60).lease

    channel.lease_answers["RenewLease"] = renew
    client = SyncResolveClient.from_channel(channel)
    before = renewer_threads()
    client.resolve(name="orders-db")
    assert renewer_threads() == before + 1
    assert renewed.wait(5)
    client.close()
    assert channel.lease_calls == [("RenewLease", "lease_1"), ("RevokeLease", "lease_1")]
    assert renewer_threads() == before


def renewer_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "broker-lease-renewer" and t.is_alive())


async def test_async_client_renews_in_a_task_and_revokes_on_close() -> None:
    channel = FakeChannel(real_time_lease(life=1.5), is_async=True)
    renewed = asyncio.Event()

    def renew(request: pb.RenewLeaseRequest) -> pb.Lease:
        renewed.set()
        return real_time_lease(life=60).lease

    channel.lease_answers["RenewLease"] = renew
    async with ResolveClient.from_channel(channel) as client:
        resolved = await client.resolve(name="orders-db", run_id="run-1")
        assert resolved.lease is not None and channel.requests[0].run_id == "run-1"
        await asyncio.wait_for(renewed.wait(), 5)
    assert channel.lease_calls == [("RenewLease", "lease_1"), ("RevokeLease", "lease_1")]
    assert channel.closed


def real_time_lease(life: float) -> pb.ResolveResponse:
    """A leased answer ending `life` seconds from now on the real clock."""
    now = dt.datetime.now(dt.UTC)
    message = reply(ttl=60)
    message.lease.CopyFrom(pb.Lease(id="lease_1", connection_id="conn_1", username="brk_1111111111111111"))
    message.lease.expires_at.FromDatetime(now + dt.timedelta(seconds=life))
    message.lease.max_expires_at.FromDatetime(now + dt.timedelta(hours=1))
    message.expires_at.CopyFrom(message.lease.expires_at)
    return message
