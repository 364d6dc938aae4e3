"""Master-key rotation end to end: rotate, a rewrap killed half-way and resumed, retire, restart.

The CLI runs as a subprocess next to a running broker on the same store, as an
operator would run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from broker import crypto, keydir, metrics
from broker._proto import broker_pb2 as pb
from broker.crypto import Kek, Keyring, Sealed
from broker.errors import ConfigError
from broker.model import ConnectionRecord, ConnectionStatus, Grant, Principal, Role, new_id
from broker.sensitive import SecretFields
from broker.service.context import Call
from broker.service.keys import MasterKeys, dek_binding
from broker.service.sealing import seal
from broker.store import Store
from broker.store.protocols import WrappedDek
from tests.conftest import Running, spiffe
from tests.helpers import EXECUTOR, db_request, rpc_error

N = 1000
OPERATOR = spiffe("default", "admin", "cli")
ADMIN_CALL = Call(Principal("broker.local", "default", Role.ADMIN, "cli"))


def write_config(tmp_path: Path, key_dir: Path) -> Path:
    path = tmp_path / "broker.toml"
    tls = tmp_path / "tls"
    path.write_text(
        f'[tls]\ncert = "{tls / "server.pem"}"\nkey = "{tls / "server-key.pem"}"\n'
        f'client_ca = "{tls / "ca.pem"}"\n'
        f'[storage]\npath = "{tmp_path / "broker.db"}"\n[master_key]\ndir = "{key_dir}"\n'
    )
    return path


# pytest's own limit is 60 s (pyproject.toml). The end-to-end scenario keeps within a shorter one of
# its own, so that a run too slow for it fails inside the test, where every `finally` still runs: a
# pytest-timeout strikes between two steps of the event loop, and then the test's subprocesses and
# brokers outlive it and fail the tests after it. Its `broker keys` commands get the first 50 s.
CLI_BUDGET = 50.0
SCENARIO_BUDGET = 54.0


@dataclass
class Command:
    """One `broker keys` subprocess and the files its output goes to."""

    args: tuple[str, ...]
    process: asyncio.subprocess.Process
    out: Path
    err: Path

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


class KeysCli:
    """`broker keys ...` as an operator runs it: subprocesses on the broker's store, never blocking
    the broker's event loop.

    Their output goes to files (nothing to drain while they run). A command still running at
    `deadline` (the event loop's clock) is killed and fails the test with its stderr; `close` kills
    whatever is still running, so a slow or stuck command fails this test and leaves nothing behind.
    """

    def __init__(self, config: Path, out_dir: Path, deadline: float) -> None:
        out_dir.mkdir()
        self._config = config
        self._dir = out_dir
        self.deadline = deadline
        self._started: list[Command] = []

    async def start(self, *args: str) -> Command:
        n = len(self._started)
        out, err = self._dir / f"{n}-{args[0]}.out", self._dir / f"{n}-{args[0]}.err"
        with out.open("wb") as out_file, err.open("wb") as err_file:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "broker.cli.broker",
                "keys",
                args[0],
                "--config",
                str(self._config),
                *args[1:],
                stdout=out_file,
                stderr=err_file,
            )
        command = Command(args, process, out, err)
        self._started.append(command)
        return command

    async def run(self, *args: str) -> tuple[int, str, str]:
        """Run a command to its end: exit status, stdout, stderr."""
        command = await self.start(*args)
        try:
            async with asyncio.timeout_at(self.deadline):
                code = await command.process.wait()
        except TimeoutError:
            await _kill(command)
            pytest.fail(f"{self.describe(command)}\nIt was still running at the test's deadline: killed")
        return code, command.out.read_text(), command.stderr()

    def describe(self, command: Command) -> str:
        """The command, for a failure message: what it was and what it wrote to stderr."""
        return f"`broker keys {' '.join(command.args)}`, stderr:\n{command.stderr()}"

    async def close(self) -> None:
        for command in self._started:
            await _kill(command)


async def _kill(command: Command) -> None:
    if command.process.returncode is None:
        command.process.kill()
        await command.process.wait()


def record(keyring: Keyring, i: int, now: datetime) -> ConnectionRecord:
    connection_id = new_id("conn")
    unsealed = ConnectionRecord(
        id=connection_id,
        tenant="default",
        name=f"db-{i:04d}",
        type="database",
        provider="",
        config={"driver": "postgresql", "host": "db.internal", "database": "app", "username": "app"},
        secret_fields=("password",),
        labels={},
        status=ConnectionStatus.ACTIVE,
        version=1,
        secret_version=1,
        sealed=None,
        created_at=now,
        updated_at=now,
        created_by=OPERATOR,
    )
    return replace(unsealed, sealed=seal(keyring, SecretFields({"password": f"pw-{i}"}), unsealed))


async def create_many(store: Store, keyring: Keyring, count: int) -> list[ConnectionRecord]:
    now = datetime.now(UTC)
    records = [record(keyring, i, now) for i in range(count)]
    for r in records:
        await store.create_connection(r, ADMIN_CALL.audit_event(now, "connection.create", r.id))
    await store.add_kek_wraps(keyring.take_wrap_counts())
    return records


async def test_rotation_survives_a_killed_rewrap_and_every_connection_still_resolves(
    make_broker: Callable[..., object], tmp_path: Path
) -> None:
    # Every broker comes from make_broker, which stops them at teardown, whatever happened here.
    key_dir = tmp_path / "keys"
    old = keydir.init(key_dir, [])
    now = asyncio.get_running_loop().time()
    cli = KeysCli(write_config(tmp_path, key_dir), tmp_path / "cli", now + CLI_BUDGET)
    try:
        async with asyncio.timeout_at(now + SCENARIO_BUDGET):
            await _rotation_scenario(make_broker, key_dir, old, cli, tmp_path)
    finally:
        await cli.close()


async def _rotation_scenario(
    make_broker: Callable[..., object], key_dir: Path, old: Kek, cli: KeysCli, tmp_path: Path
) -> None:
    running: Running = await make_broker(master_key_file=None, master_key_dir=key_dir)  # type: ignore[misc]
    store = running.broker.store
    records = await create_many(store, keydir.load(key_dir), N)
    sample = random.Random(6).sample(records, 50)
    for r in sample:
        await store.put_grant(
            Grant("default", r.id, EXECUTOR, datetime.now(UTC), OPERATOR),
            ADMIN_CALL.audit_event(datetime.now(UTC), "access.grant", r.id),
        )
    assert await store.deks_by_kek() == {old.id: N}

    code, new_id_out, err = await cli.run("rotate")
    assert code == 0, err
    new = new_id_out.strip()
    assert new != old.id and (key_dir / "active").read_text().strip() == new
    await running.broker.services.keys.tick()  # the broker follows the marker (every few seconds on its own)
    late = await running.admin().CreateConnection(db_request(name="after-rotation", password="late-pw"))
    assert (await store.get_connection("default", late.id)).sealed.kek_id == new  # type: ignore[union-attr]

    # Slow batches, killed once some (but far from all) are done: 100 keys take about a second, and
    # the 900 left at least 9 s more, so a test process that stalls a few seconds still kills it midway.
    rewrap = await cli.start("rewrap", "--batch", "10", "--pause", "0.1")
    try:
        async with asyncio.timeout_at(cli.deadline):
            while (await store.deks_by_kek()).get(old.id, N) > N - 100:
                if rewrap.process.returncode is not None:
                    code = rewrap.process.returncode
                    pytest.fail(f"{cli.describe(rewrap)}\nIt ended (status {code}) before it was killed")
                await asyncio.sleep(0.02)
    except TimeoutError:
        left = await store.deks_by_kek()
        pytest.fail(f"{cli.describe(rewrap)}\nAt the test's deadline it had not re-wrapped 100 keys: {left}")
    finally:
        await _kill(rewrap)
    half = await store.deks_by_kek()
    assert 0 < half[old.id] < N and half[new] + half[old.id] == N + 1, half

    code, _, err = await cli.run("retire", old.id)
    assert code == 1 and f"{half[old.id]} stored data key(s) still use it" in err, err
    assert (key_dir / f"{old.id}.key").exists()

    # The start-up check refuses a keyring without a key the store still needs.
    partial = tmp_path / "keys-without-old"
    shutil.copytree(key_dir, partial)
    (partial / f"{old.id}.key").unlink()
    with pytest.raises(ConfigError, match=old.id):
        await make_broker(master_key_file=None, master_key_dir=partial)  # type: ignore[misc]

    code, _, err = await cli.run("rewrap", "--batch", "500")
    assert code == 0, err
    assert "rewrap [" in err and "re-wrapped" in err
    assert await store.deks_by_kek() == {new: N + 1}

    code, status, err = await cli.run("status")
    assert code == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in status.splitlines()[1:]}
    assert rows[new][:2] == ["active", str(N + 1 + 1)]  # connections and the key-check canary
    assert rows[old.id][:2] == ["old", "0"]

    # The audit trail's newest seal is still the one made under the old key as the broker started:
    # without that key, verification could not check it.
    code, _, err = await cli.run("retire", old.id)
    assert code == 1 and "the audit trail's newest seal is signed under it" in err, err
    await running.broker.services.audit.seal()  # what the broker does every seal interval
    code, _, err = await cli.run("retire", old.id)
    assert code == 0, err
    assert not (key_dir / f"{old.id}.key").exists()

    # A restart loads only the new key; the start-up check passes and every sampled secret resolves.
    await running.close()
    await running.broker.stop(grace=0)
    again: Running = await make_broker(master_key_file=None, master_key_dir=key_dir)  # type: ignore[misc]
    try:
        resolver = again.resolver()
        for r in sample:
            response = await resolver.Resolve(pb.ResolveRequest(connection_id=r.id))
            assert dict(response.secrets) == {"password": f"pw-{r.name[3:].lstrip('0') or '0'}"}
        wraps = await again.broker.store.kek_wraps()
        assert wraps[old.id] >= N and wraps[new] >= N + 1
    finally:
        await again.close()
        await again.broker.stop(grace=0)


@contextlib.asynccontextmanager
async def rotated(
    make_broker: Callable[..., object], tmp_path: Path, connections: int
) -> AsyncIterator[tuple[KeysCli, Running, str, str]]:
    """A broker on a key directory with `connections` connections, its master key rotated by
    `broker keys rotate`: the CLI, the broker, the old key's id and the new one's."""
    key_dir = tmp_path / "keys"
    old = keydir.init(key_dir, [])
    cli = KeysCli(write_config(tmp_path, key_dir), tmp_path / "cli", asyncio.get_running_loop().time() + 50)
    running: Running = await make_broker(master_key_file=None, master_key_dir=key_dir)  # type: ignore[misc]
    try:
        await create_many(running.broker.store, keydir.load(key_dir), connections)
        code, new, err = await cli.run("rotate")
        assert code == 0, err
        yield cli, running, old.id, new.strip()
    finally:
        await cli.close()


async def test_a_rewrap_that_meets_a_busy_store_says_so_in_one_line_and_can_be_run_again(
    make_broker: Callable[..., object], tmp_path: Path
) -> None:
    async with rotated(make_broker, tmp_path, 3) as (cli, running, old, new):
        # Another writer holds the store past the busy timeout (5 s) while the rewrap runs.
        holder = sqlite3.connect(tmp_path / "broker.db", isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            code, _, err = await cli.run("rewrap")
        finally:
            holder.close()
        assert code == 1 and "Traceback" not in err, err
        assert "broker keys: error: the database is busy" in err and "run the command again" in err
        assert await running.broker.store.deks_by_kek() == {old: 3}
        code, _, err = await cli.run("rewrap")
        assert code == 0, err
        assert await running.broker.store.deks_by_kek() == {new: 3}


async def test_a_rewrap_without_the_key_the_canary_needs_names_it_in_one_line(
    make_broker: Callable[..., object], tmp_path: Path
) -> None:
    """Before: a traceback (DecryptionFailed from the key-check canary's re-wrap)."""
    async with rotated(make_broker, tmp_path, 2) as (cli, running, old, _):
        (tmp_path / "keys" / f"{old}.key").rename(tmp_path / "moved-away.key")
        code, _, err = await cli.run("rewrap")
        assert code == 2 and "Traceback" not in err, err  # a configuration error, as at start-up
        assert f"the key-check canary is wrapped by master key {old}, which is not configured" in err
        assert await running.broker.store.deks_by_kek() == {old: 2}  # nothing half done


async def test_rotate_master_key_rpc_is_for_operators_only(
    make_broker: Callable[..., object], tmp_path: Path
) -> None:
    key_dir = tmp_path / "keys"
    old = keydir.init(key_dir, [])
    running: Running = await make_broker(  # type: ignore[misc]
        master_key_file=None, master_key_dir=key_dir, master_key_operators=(OPERATOR,)
    )
    try:
        before = await running.admin().CreateConnection(db_request(name="before", password="pw-before"))
        denied = await rpc_error(running.admin("admin_b").RotateMasterKey(pb.RotateMasterKeyRequest()))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        assert keydir.active_id(key_dir) == old.id

        reply = await running.admin().RotateMasterKey(pb.RotateMasterKeyRequest())
        assert reply.previous_kek_id == old.id and reply.active_kek_id != old.id
        assert keydir.active_id(key_dir) == reply.active_kek_id
        assert (key_dir / f"{reply.active_kek_id}.key").stat().st_mode & 0o077 == 0
        assert dict(reply.deks_by_kek) == {old.id: 2}  # the connection and the key-check canary

        after = await running.admin().CreateConnection(db_request(name="after", password="pw-after"))
        store = running.broker.store
        assert (await store.get_connection("default", after.id)).sealed.kek_id == reply.active_kek_id  # type: ignore[union-attr]
        for c, pw in ((before, "pw-before"), (after, "pw-after")):
            await running.admin().GrantAccess(pb.GrantAccessRequest(connection_id=c.id, principal=EXECUTOR))
            response = await running.resolver().Resolve(pb.ResolveRequest(connection_id=c.id))
            assert dict(response.secrets) == {"password": pw}
        events = await running.admin().ListAuditEvents(pb.ListAuditEventsRequest(action="master_key.rotate"))
        assert [dict(e.details) for e in events.events] == [
            {"kek_id": reply.active_kek_id, "previous_kek_id": old.id}
        ]
    finally:
        await running.close()
        await running.broker.stop(grace=0)


async def test_rotation_needs_a_key_directory(running: Running) -> None:
    # The default test broker has a single key file and no operators: refused either way.
    error = await rpc_error(running.admin().RotateMasterKey(pb.RotateMasterKeyRequest()))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_single_file_mode_refuses_rotation_for_an_operator(
    make_broker: Callable[..., object],
) -> None:
    running: Running = await make_broker(master_key_operators=(OPERATOR,))  # type: ignore[misc]
    try:
        error = await rpc_error(running.admin().RotateMasterKey(pb.RotateMasterKeyRequest()))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "master_key.dir" in (error.details() or "")
    finally:
        await running.close()
        await running.broker.stop(grace=0)


async def test_rewrap_is_compare_and_swap_and_a_stale_update_keeps_the_new_wrap(running: Running) -> None:
    store = running.broker.store
    keyring = running.broker.services.keys._keyring
    admin = running.admin()
    a = await admin.CreateConnection(db_request(name="cas-a", password="pw-a"))
    b = await admin.CreateConnection(db_request(name="cas-b", password="pw-b"))
    new = crypto.Kek(os.urandom(32))
    keyring.activate(new)
    deks = {d.key: d for d in await store.list_deks_not_under(new.id, 10)}
    stale_a = await store.get_connection("default", a.id)

    # b is re-sealed by an update between the read and the rewrap: its row is skipped.
    await admin.UpdateConnection(pb.UpdateConnectionRequest(id=b.id, secrets={"password": "pw-b2"}))
    pairs = [(d, crypto.rewrap(keyring, d.sealed, dek_binding(d))) for d in deks.values()]
    assert await store.rewrap_deks(pairs, keyring.take_wrap_counts()) == 1
    row_a = await store.get_connection("default", a.id)
    assert row_a is not None and stale_a is not None
    assert row_a.sealed.kek_id == new.id and row_a.version == stale_a.version  # type: ignore[union-attr]

    # An update based on a read from before the rewrap (same data key) keeps the re-wrapped key.
    stale_update = replace(stale_a, name="cas-a-renamed", version=stale_a.version + 1)
    await store.replace_connection(
        stale_update, stale_a.version, ADMIN_CALL.audit_event(datetime.now(UTC), "connection.update", a.id)
    )
    row_a = await store.get_connection("default", a.id)
    assert row_a is not None and row_a.sealed is not None
    assert row_a.sealed.kek_id == new.id and row_a.sealed.wrapped_dek == pairs_for(pairs, a.id).wrapped_dek
    # a re-wrapped here, b re-sealed by the update (under the shared keyring's new active key).
    assert await store.deks_by_kek() == {new.id: 2}
    for c, pw in ((a.id, "pw-a"), (b.id, "pw-b2")):
        await admin.GrantAccess(pb.GrantAccessRequest(connection_id=c, principal=EXECUTOR))
        response = await running.resolver().Resolve(pb.ResolveRequest(connection_id=c))
        assert dict(response.secrets) == {"password": pw}


def pairs_for(pairs: list[tuple[WrappedDek, Sealed]], key: str) -> Sealed:
    for old, new in pairs:
        if old.key == key:
            return new
    raise AssertionError(key)


async def test_wrap_counts_are_persisted_exposed_and_warned_about(running: Running) -> None:
    admin = running.admin()
    for i in range(3):
        await admin.CreateConnection(db_request(name=f"count-{i}"))
    keys = running.broker.services.keys
    active = keys._keyring.active.id
    await keys.flush()
    wraps = await running.broker.store.kek_wraps()
    assert wraps[active] >= 4  # three connections and the key-check canary
    assert metrics.REGISTRY.get_sample_value("broker_kek_wraps", {"kek_id": active}) == wraps[active]
    # Three connections and the key-check canary.
    assert metrics.REGISTRY.get_sample_value("broker_deks_by_kek", {"kek_id": active}) == 4
    assert metrics.REGISTRY.get_sample_value("broker_kek_active", {"kek_id": active}) == 1

    store = running.broker.store
    low = MasterKeys(store, store, keys._keyring, running.broker.services.audit, datetime.now, warn_wraps=2)
    await low.flush()
    assert "master_key_wrap_limit_near" in running.logs.getvalue()


async def test_resolve_says_when_the_known_secret_version_was_superseded(running: Running) -> None:
    admin = running.admin()
    created = await admin.CreateConnection(db_request(name="rotating", password="v1"))
    await admin.GrantAccess(pb.GrantAccessRequest(connection_id=created.id, principal=EXECUTOR))
    first = await running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id))
    assert first.secret_version == 1 and not first.HasField("superseded_at")

    await admin.UpdateConnection(
        pb.UpdateConnectionRequest(id=created.id, labels=pb.Labels(values={"a": "b"}))
    )
    same = await running.resolver().Resolve(
        pb.ResolveRequest(connection_id=created.id, known_secret_version=1)
    )
    assert same.secret_version == 1 and not same.HasField("superseded_at")  # no secret change

    before = datetime.now(UTC)
    await admin.UpdateConnection(pb.UpdateConnectionRequest(id=created.id, secrets={"password": "v2"}))
    told = await running.resolver().Resolve(
        pb.ResolveRequest(connection_id=created.id, known_secret_version=1)
    )
    assert told.secret_version == 2 and dict(told.secrets) == {"password": "v2"}
    assert told.HasField("superseded_at")
    assert abs(told.superseded_at.ToDatetime(UTC) - before) < timedelta(seconds=5)
    current = await running.resolver().Resolve(
        pb.ResolveRequest(connection_id=created.id, known_secret_version=2)
    )
    assert not current.HasField("superseded_at")

    # After the grace period the broker forgets when; the version still tells the executor.
    assert await running.broker.store.purge_superseded(datetime.now(UTC) + timedelta(seconds=1)) == 1
    late = await running.resolver().Resolve(
        pb.ResolveRequest(connection_id=created.id, known_secret_version=1)
    )
    assert late.secret_version == 2 and not late.HasField("superseded_at")

    bad = await rpc_error(
        running.resolver().Resolve(pb.ResolveRequest(connection_id=created.id, known_secret_version=-1))
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
