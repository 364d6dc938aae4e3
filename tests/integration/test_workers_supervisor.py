"""The supervisor of `broker serve --workers` with stand-in workers (tiny Python processes).

The command that starts a worker is the supervisor's seam: these workers report SERVING on their
ready pipe, or not, and exit when told to, so start failures, crash loops and drains are exact
and need no database. tests/e2e/test_workers.py runs the real thing on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from structlog.testing import capture_logs

from broker.workers import Command, Supervisor, restart_delay

# A worker: says "serving" on its ready pipe (unless told otherwise), then does what `then` says.
_WORKER = """
import os, signal, sys, time
index, ready, lifeline, then = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
signal.signal(signal.SIGTERM, signal.SIG_IGN if then == "ignore-sigterm" else lambda *_: sys.exit(0))
if then == "fail-at-start" and index == 1:
    sys.exit(2)
os.write(ready, b"serving\\n")
if then == "crash":
    sys.exit(3)
while True:
    time.sleep(0.05)
"""


def _command(then: str, started: list[int] | None = None) -> Command:
    def argv(index: int, ready_fd: int, lifeline_fd: int) -> list[str]:
        if started is not None:
            started.append(index)
        return [sys.executable, "-c", _WORKER, str(index), str(ready_fd), str(lifeline_fd), then]

    return argv


def test_the_restart_delay_doubles_up_to_a_cap() -> None:
    assert [restart_delay(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


async def test_a_worker_that_fails_to_start_fails_the_start_with_its_exit_status() -> None:
    supervisor = Supervisor(2, _command("fail-at-start"), grace_seconds=5)
    with capture_logs() as logs:
        status = await asyncio.wait_for(supervisor.run(), 30)
    assert status == 2
    events = [e["event"] for e in logs]
    assert "worker_failed_to_start" in events and "broker_started" not in events
    stopped = [e for e in logs if e["event"] == "worker_stopped"]  # the other one was stopped
    # By its SIGTERM handler (exit 0), or by the signal itself if it came before the stand-in had
    # installed its handler (a fresh interpreter takes a while to start).
    ended = [(e["worker"], e.get("exit_code", e.get("signal"))) for e in stopped]
    assert ended in ([(0, 0)], [(0, "SIGTERM")]), logs


async def test_a_crash_loop_is_restarted_with_growing_delays_not_spun() -> None:
    started: list[int] = []
    supervisor = Supervisor(1, _command("crash", started), grace_seconds=5)
    with capture_logs() as logs:
        run = asyncio.ensure_future(supervisor.run())
        await asyncio.sleep(4.0)
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's own handler: as a SIGTERM from outside
        status = await asyncio.wait_for(run, 30)
    # 0.5 + 1 + 2 s of delays fit in 4 s: at most 4 starts (a spinning loop would make dozens).
    assert 2 <= len(started) <= 5, started
    exits = [e for e in logs if e["event"] == "worker_exited"]
    assert [e["restart_in_seconds"] for e in exits][:3] == [0.5, 1.0, 2.0], exits
    assert all(e["exit_code"] == 3 for e in exits)
    assert status == 0


async def test_sigterm_drains_every_worker_and_kills_one_that_does_not_stop() -> None:
    supervisor = Supervisor(2, _command("ignore-sigterm"), grace_seconds=0.5)
    with capture_logs() as logs:
        run = asyncio.ensure_future(supervisor.run(on_serving=lambda _: os.kill(os.getpid(), signal.SIGTERM)))
        status = await asyncio.wait_for(run, 30)
    assert status == 1  # not a clean drain: both had to be killed
    assert sorted(e["worker"] for e in logs if e["event"] == "worker_killed") == [0, 1]
    assert [e for e in logs if e["event"] == "broker_stopped"][-1]["clean"] is False


async def test_sigterm_after_serving_is_a_clean_stop_with_status_0() -> None:
    def serving(supervisor: Supervisor) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    with capture_logs() as logs:
        status = await asyncio.wait_for(Supervisor(2, _command("serve"), grace_seconds=5).run(serving), 30)
    pids = [e["pid"] for e in logs if e["event"] == "worker_serving"]
    assert status == 0 and len(pids) == 2
    assert [e["event"] for e in logs if e["event"] in ("broker_started", "broker_stopping")] == [
        "broker_started",
        "broker_stopping",
    ]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
