"""A throw-away PostgreSQL database for the replica scenario, and its backends' pids.

The server comes from BROKER_BENCH_POSTGRES_DSN, else BROKER_TEST_POSTGRES_DSN (the test
suite's). The database is created through the `postgres` maintenance database under a
unique name and dropped WITH (FORCE) at the end, also on failure: a replica or a load
process that is still connected cannot keep it alive.

The drop is left to a janitor process (`python -m bench.postgres <database>`) that waits
for its stdin to close: the bench closes it when done, and the kernel closes it when the
bench is killed (SIGTERM, or SIGKILL from a test's timeout), which runs no `finally`. A
SIGTERM handler raising SystemExit is no substitute: raised inside a grpc.aio callback,
it was seen to be swallowed, and the bench ran on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

DSN_VARIABLES = ("BROKER_BENCH_POSTGRES_DSN", "BROKER_TEST_POSTGRES_DSN")
_TIMEOUT = 30.0  # seconds for connecting and for each statement: a stuck server fails the run


def server_dsn(environ: Mapping[str, str] = os.environ) -> str | None:
    """The first DSN set among DSN_VARIABLES, or None."""
    for variable in DSN_VARIABLES:
        value = environ.get(variable, "").strip()
        if value:
            return value
    return None


def skip_reason() -> str:
    return f"neither {' nor '.join(DSN_VARIABLES)} is set (e.g. postgresql://postgres@127.0.0.1:5432/test)"


def with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at another database on the same server."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


async def _maintenance(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(with_database(dsn, "postgres"), timeout=_TIMEOUT)
    try:
        await conn.execute(statement, timeout=_TIMEOUT)
    finally:
        await conn.close(timeout=_TIMEOUT)


def _drop(dsn: str, name: str) -> None:
    asyncio.run(_maintenance(dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def temporary_database(dsn: str) -> Iterator[tuple[str, str]]:
    """Create an empty, uniquely named database; yield (its name, its DSN); drop it afterwards."""
    name = f"broker_bench_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    # The DSN goes by environment, not argv: `ps` shows argv, and a DSN may hold a password.
    janitor = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "bench.postgres", name],
        stdin=subprocess.PIPE,
        env={**os.environ, DSN_VARIABLES[0]: dsn},
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        asyncio.run(_maintenance(dsn, f'CREATE DATABASE "{name}"'))
        yield name, with_database(dsn, name)
    finally:
        if not _released(janitor):
            _drop(dsn, name)  # the janitor failed (its error is on stderr): drop it from here


def _released(janitor: subprocess.Popen[bytes]) -> bool:
    """Close the janitor's stdin, so it drops the database; True once it has, within a minute."""
    assert janitor.stdin is not None
    janitor.stdin.close()
    try:
        return janitor.wait(60) == 0
    except subprocess.TimeoutExpired:
        janitor.kill()
        janitor.wait(15)
        return False


def backend_pids(database: str) -> list[int]:
    """The local server's backends connected to `database`, found by their process title.

    PostgreSQL titles a backend `postgres: ... <user> <database> <host> <state>`; reading
    /proc needs no query, so sampling at the window's edges adds no load on the server.
    Empty when the server runs elsewhere (or hides its titles): the CPU is then not counted.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended meanwhile, or not ours to read
        if title.startswith("postgres:") and f" {database} " in title:
            pids.append(int(entry.name))
    return pids


def janitor(name: str) -> None:
    """Drop `name` once stdin closes: the bench finished, failed or was killed."""
    # Ctrl-C or a SIGTERM to the whole process group must not take the janitor first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdin.buffer.read()
    dsn = server_dsn()
    if dsn is None:
        raise SystemExit(f"bench janitor: no DSN to drop {name} with")
    _drop(dsn, name)


if __name__ == "__main__":
    janitor(sys.argv[1])
