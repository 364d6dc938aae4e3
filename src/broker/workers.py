"""`broker serve --workers N`: a supervisor and N serving processes that share the listeners' ports.

    supervisor (this module)          no gRPC listener; /metrics for all workers; signals
      worker 0..N-1                   `broker serve --worker I,READY_FD,LIFELINE_FD`: a whole
                                      broker each, its listeners bound with SO_REUSEPORT, so
                                      the kernel spreads new connections over the workers

PostgreSQL only: each worker is a replica on the store's change feed (LISTEN/NOTIFY), so what
one worker writes reaches the others' caches as it reaches other replicas'. SQLite has no
cross-process change feed, so `check` refuses more than one worker on it.

Workers are started with `subprocess` (a fresh interpreter each, never a fork of a process with
an event loop or gRPC threads). A worker reports SERVING by writing to its ready pipe; the
supervisor logs `broker_started` once every worker has. Each worker also holds the read end of
one lifeline pipe whose write end only the supervisor holds: if the supervisor dies, the
lifeline reads end-of-file and the worker drains and stops rather than serve on unsupervised.

Metrics: prometheus-client's multiprocess mode. The supervisor makes a temporary directory,
names it to the workers in PROMETHEUS_MULTIPROC_DIR, serves the one `metrics.listen` endpoint
from it (`MultiProcessCollector`), marks each exited worker dead (its live gauges drop out) and
removes the directory at the end. The metric names and labels are those of one process.

Signals: SIGTERM or SIGINT is forwarded to every worker as SIGTERM; each drains as a single
`broker serve` does; after `server.grace_seconds` plus a margin the rest are killed. A worker
that exits while serving is logged (exit code or signal) and restarted, after a delay that
doubles with each quick failure (`restart_delay`), so a crash loop cannot spin the CPU. A
worker that exits before all have first been SERVING fails the start (a bad setting, a port
taken): the others are stopped and its exit code is the supervisor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from broker import log as broker_log
from broker.config import Settings
from broker.errors import ConfigError
from broker.server import ListenError, bind_problem

log = structlog.get_logger("broker.workers")

MARGIN_SECONDS = 5.0  # past the grace period, for a worker to flush and exit before it is killed
STEADY_SECONDS = 30.0  # a worker that served this long before dying starts a new run of failures
MAX_RESTART_DELAY = 8.0
Command = Callable[[int, int, int], list[str]]  # (index, ready fd, lifeline fd) -> argv


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker after its `failures`-th quick death in a row: 0.5, 1, 2, 4, 8..."""
    return float(min(0.5 * 2 ** max(failures - 1, 0), MAX_RESTART_DELAY))


def check(settings: Settings, workers: int) -> None:
    """Refuse what cannot work with `workers` processes (ConfigError, exit status 2)."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}")
    if workers == 1:
        return
    if settings.storage_url is None:
        raise ConfigError(
            f"--workers {workers} needs PostgreSQL (storage.url): with SQLite (storage.path) a change "
            "made through one worker (a revoke) would not reach the other workers' caches, since "
            "SQLite has no cross-process change feed; run one worker, or set storage.url"
        )
    listeners = (("listen.admin", settings.admin_addr), ("listen.resolve", settings.resolve_addr))
    for setting, address in listeners:
        if address.rpartition(":")[2] == "0":
            raise ListenError(setting, address, "port 0 would give each worker a port of its own")
        # A plain bind (no SO_REUSEPORT): also fails when another broker's workers hold the port.
        problem = bind_problem(address)
        if problem is not None:
            raise ListenError(setting, address, problem)


def worker_command(config: Path) -> Command:
    """How a worker is started: this interpreter, `broker serve` on the same settings file."""

    def argv(index: int, ready_fd: int, lifeline_fd: int) -> list[str]:
        cli = [sys.executable, "-m", "broker.cli.broker", "serve", "--config", str(config.resolve())]
        return [*cli, "--worker", f"{index},{ready_fd},{lifeline_fd}"]

    return argv


def exit_reason(code: int) -> dict[str, Any]:
    """A child's exit status as log fields: `exit_code`, or the `signal` that ended it."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return {"signal": signal.Signals(-code).name}
        return {"signal": -code}
    return {"exit_code": code}


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    serving: bool = False
    started_at: float = 0.0
    failures: int = 0


class Supervisor:
    """Starts `count` workers, keeps them running, serves their metrics, stops them on a signal."""

    def __init__(
        self,
        count: int,
        command: Command,
        *,
        grace_seconds: float,
        metrics_listen: str = "",
        delay: Callable[[int], float] = restart_delay,
    ) -> None:
        self._workers = [_Worker(i) for i in range(count)]
        self._command = command
        self._grace = grace_seconds
        self._metrics_listen = metrics_listen
        self._delay = delay
        self._stop = asyncio.Event()
        self._all_serving = asyncio.Event()
        self._start_failed: int | None = None  # the exit status of a worker that died while starting
        self._settled = asyncio.Event()  # all serving, a failed start, or a stop: the start is over
        self._metrics_dir = ""
        self._lifeline = -1  # the write end; never inherited, so its end-of-file means we are gone
        self._metrics_server: Any = None
        self.metrics_port = 0

    async def run(self, on_serving: Callable[[Supervisor], None] | None = None) -> int:
        """Serve until SIGTERM or SIGINT; the exit status (0 when every worker drained cleanly)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_stop)
        self._metrics_dir = tempfile.mkdtemp(prefix="broker-metrics-")
        lifeline_read, self._lifeline = os.pipe()
        keepers: list[asyncio.Task[None]] = []
        try:
            self._start_metrics()
            keepers = [asyncio.create_task(self._keep(w, lifeline_read)) for w in self._workers]
            await self._settled.wait()
            if self._start_failed is not None:
                await self._stop_workers(keepers)
                return self._start_failed
            if self._all_serving.is_set():
                if on_serving is not None:
                    on_serving(self)
                await self._stop.wait()
            log.info("broker_stopping", grace_seconds=self._grace, workers=len(self._workers))
            return await self._stop_workers(keepers)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            for keeper in keepers:
                keeper.cancel()
            os.close(lifeline_read)
            os.close(self._lifeline)
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _request_stop(self) -> None:
        self._stop.set()
        self._settled.set()

    def _start_metrics(self) -> None:
        """The one /metrics endpoint: every worker's metrics, from the multiprocess directory."""
        if not self._metrics_listen:
            return
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        host, _, port = self._metrics_listen.rpartition(":")
        try:
            self._metrics_server, _thread = start_http_server(int(port), host.strip("[]"), registry=registry)
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            raise ListenError("metrics.listen", self._metrics_listen, reason) from None
        self.metrics_port = int(self._metrics_server.server_port)

    async def _keep(self, worker: _Worker, lifeline_read: int) -> None:
        """Run one worker slot: start the worker, and restart it (with a delay) each time it dies."""
        while not self._stop.is_set():
            process = await self._spawn(worker, lifeline_read)
            code = await process.wait()
            mark_process_dead(process.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            served_long = worker.serving and time.monotonic() - worker.started_at >= STEADY_SECONDS
            was_serving, worker.serving = worker.serving, False
            if self._stop.is_set():
                log.info("worker_stopped", worker=worker.index, pid=process.pid, **exit_reason(code))
                return
            if not self._all_serving.is_set():
                log.error("worker_failed_to_start", worker=worker.index, pid=process.pid, **exit_reason(code))
                if self._start_failed is None:
                    self._start_failed = code if code > 0 else 1
                    self._settled.set()
                return
            worker.failures = 0 if served_long else worker.failures + 1
            delay = self._delay(worker.failures)
            log.error(
                "worker_exited",
                worker=worker.index,
                pid=process.pid,
                was_serving=was_serving,
                restart_in_seconds=delay,
                **exit_reason(code),
            )
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()

    async def _spawn(self, worker: _Worker, lifeline_read: int) -> asyncio.subprocess.Process:
        """Start a worker; it writes to its ready pipe once SERVING."""
        ready_read, ready_write = os.pipe()
        try:
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir}
            argv = self._command(worker.index, ready_write, lifeline_read)
            process = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(ready_write, lifeline_read), env=env
            )
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)  # the worker's copy is the only one left: its end-of-file is its exit
        worker.process, worker.started_at = process, time.monotonic()
        log.info("worker_started", worker=worker.index, pid=process.pid)
        if self._stop.is_set():  # the stop came while it was starting: it drains with the rest
            process.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        loop.add_reader(ready_read, self._on_ready_pipe, worker, process.pid, ready_read)
        return process

    def _on_ready_pipe(self, worker: _Worker, pid: int, fd: int) -> None:
        """The worker wrote "serving" (or exited: end-of-file); either way this pipe is done."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        try:
            said = os.read(fd, 64)
        finally:
            os.close(fd)
        if not said or worker.process is None or worker.process.pid != pid:
            return
        worker.serving = True
        log.info("worker_serving", worker=worker.index, pid=pid)
        if not self._all_serving.is_set() and all(w.serving for w in self._workers):
            self._all_serving.set()
            self._settled.set()
            log.info(
                "broker_started",
                workers=len(self._workers),
                pids=[w.process.pid for w in self._workers if w.process is not None],
                metrics_port=self.metrics_port,
            )

    async def _stop_workers(self, keepers: Sequence[asyncio.Task[None]]) -> int:
        """SIGTERM every worker, wait for their drains (bounded), kill what is left; the exit status."""
        self._stop.set()
        running = [w.process for w in self._workers if w.process and w.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        _, late = await asyncio.wait(keepers, timeout=self._grace + MARGIN_SECONDS) if keepers else ((), ())
        killed = False
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                pid = worker.process.pid
                log.error("worker_killed", worker=worker.index, pid=pid, after_seconds=self._grace)
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                killed = True
        if late:
            await asyncio.wait(late, timeout=MARGIN_SECONDS)
        # Workers that had died before the stop were logged then; they do not make the drain unclean.
        clean = not killed and all(process.returncode == 0 for process in running)
        log.info("broker_stopped", workers=len(self._workers), clean=clean)
        return 0 if clean else 1


def run(settings: Settings, count: int, config: Path) -> int:
    """Blocking entry point for `broker serve --workers N` (N > 1, after `check`)."""
    broker_log.configure(settings.log_level)
    supervisor = Supervisor(
        count,
        worker_command(config),
        grace_seconds=settings.grace_seconds,
        metrics_listen=settings.metrics_listen,
    )
    return asyncio.run(supervisor.run())
