"""The executor SDK against a real broker: after a secret changes, a re-resolve says when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker._proto import broker_pb2 as pb
from broker.client import ResolveClient
from tests.conftest import Running
from tests.helpers import EXECUTOR, db_request

pytestmark = pytest.mark.integration


class Monotonic:
    """The SDK's TTL clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sdk_client(running: Running, tmp_path: Path, clock: Monotonic) -> ResolveClient:
    """An async SDK client with the executor's identity (the broker runs on this event loop)."""
    files = {"ca": running.pki.ca}
    identity = running.identities["executor"]
    files |= {"cert": identity.cert, "key": identity.key}
    for stem, data in files.items():
        (tmp_path / f"sdk-{stem}.pem").write_bytes(data)
    return ResolveClient(
        f"127.0.0.1:{running.broker.resolve_port}",
        ca=tmp_path / "sdk-ca.pem",
        cert=tmp_path / "sdk-cert.pem",
        key=tmp_path / "sdk-key.pem",
        clock=clock,
    )


async def change_password(running: Running, connection_id: str, password: str) -> datetime:
    before = datetime.now(UTC)
    await running.admin().UpdateConnection(
        pb.UpdateConnectionRequest(id=connection_id, secrets={"password": password})
    )
    return before


def close_to(when: datetime | None, expected: datetime) -> bool:
    return when is not None and abs(when - expected) < timedelta(seconds=5)


async def test_a_rotated_secret_is_reported_after_the_ttl_and_on_a_forced_refresh(
    running: Running, tmp_path: Path
) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request(name="rotating", password="v1"))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    clock = Monotonic()
    async with sdk_client(running, tmp_path, clock) as client:
        first = await client.resolve(created.id)
        assert first.secret_version == 1 and first.superseded_at is None
        assert first.secrets == {"password": "v1"}

        # The TTL runs out after a rotation: the re-resolve names version 1 and is told when it went.
        changed = await change_password(running, created.id, "v2")
        assert (await client.resolve(created.id)) is first  # still cached
        clock.now += first.cache_ttl_seconds
        second = await client.resolve(created.id)
        assert second.secret_version == 2 and second.secrets == {"password": "v2"}
        assert close_to(second.superseded_at, changed)
        assert (await client.resolve(created.id)).superseded_at is None  # from the cache: told once

        # Nothing changed since: a forced refresh reports nothing.
        same = await client.resolve(created.id, refresh=True)
        assert same.secret_version == 2 and same.superseded_at is None

        # A caller that knows of a rotation forces a refresh, by name as well.
        by_name = await client.resolve(name="rotating")
        assert by_name.secret_version == 2 and by_name.superseded_at is None
        changed = await change_password(running, created.id, "v3")
        third = await client.resolve(name="rotating", refresh=True)
        assert third.secret_version == 3 and third.secrets == {"password": "v3"}
        assert close_to(third.superseded_at, changed)

        # A change to anything but the secrets keeps the version: nothing to report.
        await admin.UpdateConnection(
            pb.UpdateConnectionRequest(id=created.id, labels=pb.Labels(values={"team": "x"}))
        )
        unchanged = await client.resolve(name="rotating", refresh=True)
        assert unchanged.secret_version == 3 and unchanged.superseded_at is None

        # Past the broker's memory of the old version only the higher version tells.
        await change_password(running, created.id, "v4")
        assert await running.broker.store.purge_superseded(datetime.now(UTC) + timedelta(seconds=1)) >= 1
        late = await client.resolve(name="rotating", refresh=True)
        assert late.secret_version == 4 and late.superseded_at is None
