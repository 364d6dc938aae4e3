"""`make bench`: the broker's Resolve against a bare grpc.aio echo server, on one machine, in one run.

    python -m bench                  the full run (10,000 connections; about 3.5 minutes)
    python -m bench --smoke          a few seconds: tiny seed, short windows (the test suite runs it)
    python -m bench --rss            100,000 stored connections: the server's RSS after resolving each once
    python -m bench --replicas-only  only the PostgreSQL scenarios: 1 replica then 2, and
                                     `broker serve --workers 1` then `--workers 2` on one port
    python -m bench --leases-only    only the leases scenario (issue 17, bench/leases.py)

The PostgreSQL scenarios (replicas, leases) need a server (BROKER_BENCH_POSTGRES_DSN, else
BROKER_TEST_POSTGRES_DSN); without one they are skipped, and the report says why.

Prints a table and writes the JSON (default bench/results/latest.json). See docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from bench import leases, postgres, proxy, world
from bench.load import LoadResult, LoadSpec, Window, client_pool, run_load, warm_pool
from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "latest.json"
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Plan:
    connections: int
    processes: int
    channels: int
    concurrency: int
    warmup: float
    duration: float
    lead: float
    create_concurrency: int
    paging_runs: int
    lease_creates: int = 200
    outstanding_leases: int = 10_000


FULL = Plan(10_000, 2, 2, 32, 2.0, 10.0, 1.0, 8, 3)
# 400 connections: more than the 0.1 s warm-up can resolve, so resolve_uniform still meets a cold
# cache in its window (with 40, a fast run had resolved them all during the warm-up).
SMOKE = Plan(400, 1, 1, 4, 0.1, 0.5, 0.3, 2, 1, lease_creates=10, outstanding_leases=300)
RSS = Plan(100_000, 2, 2, 32, 1.0, 30.0, 1.0, 8, 1)


# ------------------------------------------------------------------ servers


@dataclass
class Server:
    kind: str
    process: subprocess.Popen[bytes]
    info: dict[str, Any]

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def status_kb(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux clear_refs 5); False where not permitted."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def metrics(self) -> dict[str, float]:
        """The broker's Prometheus samples (name{labels} -> value); empty for the echo server."""
        port = self.info.get("metrics")
        if not port:
            return {}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def stop(self) -> None:
        stop_processes([self.process])


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` (OSError once it has ended)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout: float = 15) -> None:
    """SIGTERM all at once (they drain in parallel), then wait for each; SIGKILL past `timeout`."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


@dataclass
class Launch:
    """A server process started but not yet serving: `ready()` waits for its ready file."""

    kind: str
    name: str
    root: Path
    process: subprocess.Popen[bytes]

    def ready(self, timeout: float = 60) -> Server:
        ready = self.root / f"{self.name}.ready"
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.process.wait(15)
                tail = (self.root / f"{self.name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the {self.name} server did not start:\n{tail}")
            time.sleep(0.05)
        return Server(self.kind, self.process, json.loads(ready.read_text()))


def launch_server(kind: str, root: Path, *args: str, name: str = "") -> Launch:
    """Start `python -m bench.servers kind root args...`; `name` (default: kind) names its files."""
    name = name or kind
    (root / f"{name}.ready").unlink(missing_ok=True)
    with (root / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "bench.servers", kind, str(root), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    return Launch(kind, name, root, process)


def start_server(kind: str, root: Path, *args: str) -> Server:
    return launch_server(kind, root, *args).ready()


def resolve_spec(env: world.BenchEnv, plan: Plan, ids: tuple[str, ...], channels: int) -> LoadSpec:
    """Warm Resolve of `ids` as the bench executor, at the plan's concurrency and windows (port: 0,
    set per server with `replace`)."""
    return LoadSpec(
        port=0,
        ca=env.ca,
        cert=env.executor.cert,
        key=env.executor.key,
        call="resolve",
        ids=ids,
        concurrency=plan.concurrency,
        channels=channels,
        warmup=plan.warmup,
        duration=plan.duration,
    )


# ---------------------------------------------------------------- measuring


@dataclass
class Probe(Window):
    server: Server
    cpu: list[float] = field(default_factory=list)
    samples: list[dict[str, float]] = field(default_factory=list)

    def start(self) -> None:
        self.cpu.append(self.server.cpu_seconds())
        self.samples.append(self.server.metrics())

    def end(self) -> None:
        self.start()

    def delta(self, name: str) -> float:
        return self.samples[1].get(name, 0.0) - self.samples[0].get(name, 0.0)


def _load_fields(result: LoadResult) -> dict[str, Any]:
    """What the load client saw: calls and their codes, throughput, latency percentiles."""
    return {
        "calls": result.calls,
        "ok": result.ok,
        "codes": dict(result.codes),
        "dropped": result.dropped,
        "seconds": result.duration,
        "rps": round(result.ok / result.duration, 1),
        **{f"p{p:g}_ms": round(result.percentile(p), 3) for p in (50, 90, 99, 99.9)},
    }


def _per_1k(cpu: float, calls: int) -> float | None:
    return round(cpu / calls * 1000, 4) if calls else None


def _row(
    name: str, server: Server, mode: str, result: LoadResult, probe: Probe, **extra: Any
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "scenario": name,
        "server": server.kind,
        "mode": mode,
        **_load_fields(result),
        "cpu_s_per_1k": _per_1k(probe.cpu[1] - probe.cpu[0], result.calls),
        "peak_rss_mb": round(server.status_kb("VmHWM") / 1024, 1),
    }
    batches = probe.delta("broker_audit_batch_size_count") if probe.samples[0] else 0
    if batches:
        row["audit_commits"] = int(batches)
        row["audit_events_per_commit"] = round(probe.delta("broker_audit_batch_size_sum") / batches, 1)
        row["audit_commit_ms"] = round(
            probe.delta("broker_audit_write_duration_seconds_sum") / batches * 1000, 2
        )
    misses = probe.delta('broker_resolve_cache_lookups_total{result="miss"}') if probe.samples[0] else 0
    if probe.samples and probe.samples[0]:
        row["cache_misses"] = int(misses)
    row.update(extra)
    return row


PROFILE_DIR: Path | None = None  # --profile: py-spy records the broker during these scenarios
PROFILED = ("resolve_hot", "resolve_uniform")


def _py_spy(name: str, server: Server, seconds: float) -> subprocess.Popen[bytes] | None:
    if PROFILE_DIR is None or name not in PROFILED:
        return None
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).with_name("py-spy")
    command = [str(py_spy), "record", "--pid", str(server.pid), "--duration", str(int(seconds) + 1)]
    command += [
        "--rate",
        "200",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(PROFILE_DIR / f"{name}.txt"),
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603


LOAD_PIDS: list[int] = []  # the load client's processes (`warm_pool`), for their CPU per scenario


def measure(
    name: str, server: Server, spec: LoadSpec, pool: Any, plan: Plan, mode: str = "closed", **extra: Any
) -> dict[str, Any]:
    server.reset_peak_rss()
    probe = Probe(server)
    spy = _py_spy(name, server, plan.lead + spec.warmup + spec.duration)
    client = _cpu_by_pid(LOAD_PIDS)
    client_wall = time.monotonic()
    result = run_load(spec, pool, plan.processes, probe, lead=plan.lead)
    if spy is not None:
        spy.wait(60)
    # Whole run (warm-up included): how much of its limit (one core per process) the client used.
    used = sum(cpu - client.get(pid, cpu) for pid, cpu in _cpu_by_pid(LOAD_PIDS).items())
    extra["load_client_cores"] = round(used / max(1e-9, time.monotonic() - client_wall), 2)
    row = _row(name, server, mode, result, probe, **extra)
    print(
        f"  {name:<28} {row['rps']:>9.1f} req/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms",
        flush=True,
    )
    return row


async def _sample_response(env: world.BenchEnv, port: int, connection_id: str) -> bytes:
    async with world.channel(env, env.executor, port) as channel:
        stub = broker_pb2_grpc.ResolveServiceStub(channel)  # type: ignore[no-untyped-call]
        response = await stub.Resolve(pb.ResolveRequest(connection_id=connection_id, purpose="bench"))
    return bytes(response.SerializeToString())


async def _page_all(env: world.BenchEnv, port: int, page_size: int) -> tuple[float, int, int]:
    """Seconds, pages and connections for one walk through every connection."""
    async with world.channel(env, env.admin, port) as channel:
        stub = broker_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        await channel.channel_ready()
        started = time.perf_counter()
        token, pages, seen = "", 0, 0
        while True:
            page = await stub.ListConnections(
                pb.ListConnectionsRequest(page_size=page_size, page_token=token)
            )
            pages += 1
            seen += len(page.connections)
            token = page.next_page_token
            if not token:
                return time.perf_counter() - started, pages, seen


def measure_paging(env: world.BenchEnv, server: Server, plan: Plan, page_size: int) -> dict[str, Any]:
    server.reset_peak_rss()
    runs = []
    cpu0 = server.cpu_seconds()
    for _ in range(plan.paging_runs):
        runs.append(asyncio.run(_page_all(env, server.info["admin"], page_size)))
    cpu = server.cpu_seconds() - cpu0
    seconds = sorted(r[0] for r in runs)
    row = {
        "scenario": f"admin_list_paging_{page_size}",
        "server": server.kind,
        "mode": "sequential",
        "page_size": page_size,
        "runs": len(runs),
        "pages": runs[0][1],
        "connections_listed": runs[0][2],
        "calls": sum(r[1] for r in runs),
        "ok": sum(r[1] for r in runs),
        "codes": {"OK": sum(r[1] for r in runs)},
        "total_seconds_median": round(seconds[len(seconds) // 2], 3),
        "total_seconds_best": round(seconds[0], 3),
        "cpu_s_per_1k": round(cpu / sum(r[1] for r in runs) * 1000, 4),
        "peak_rss_mb": round(server.status_kb("VmHWM") / 1024, 1),
    }
    print(
        f"  {row['scenario']:<28} {row['connections_listed']} connections in "
        f"{row['total_seconds_median']:.3f} s "
        f"({row['pages']} pages)",
        flush=True,
    )
    return row


def _cpu_by_pid(pids: list[int]) -> dict[int, float]:
    cpu = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # ended meanwhile: its last CPU is lost, a backend's at most
            cpu[pid] = process_cpu_seconds(pid)
    return cpu


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: user, nice, system, irq, softirq)."""
    user, nice, system, _idle, _iowait, irq, softirq = Path("/proc/stat").read_text().split()[1:8]
    return sum(int(jiffies) for jiffies in (user, nice, system, irq, softirq)) / _TICK


@dataclass
class CpuShares(Window):
    """CPU seconds of each role (replicas, database backends, load client) in the measured window,
    and of the whole machine: what else ran, and what stayed idle."""

    roles: dict[str, Callable[[], list[int]]]
    used: dict[str, float] = field(default_factory=dict)
    machine: float = 0.0
    seconds: float = 0.0
    _first: dict[str, dict[int, float]] = field(default_factory=dict)
    _started: tuple[float, float] = (0.0, 0.0)

    def _sample(self) -> dict[str, dict[int, float]]:
        return {role: _cpu_by_pid(pids()) for role, pids in self.roles.items()}

    def start(self) -> None:
        self._first = self._sample()
        self._started = time.monotonic(), machine_busy_seconds()

    def end(self) -> None:
        last = self._sample()
        self.seconds = time.monotonic() - self._started[0]
        self.machine = machine_busy_seconds() - self._started[1]
        for role, now in last.items():
            # A process first seen at the end started inside the window: all its CPU counts.
            self.used[role] = sum(cpu - self._first[role].get(pid, 0.0) for pid, cpu in now.items())

    def cores(self) -> dict[str, float]:
        """Average cores busy per role, then `other` (anything else running) and `idle`: they add
        up to the machine's cores."""
        busy = {role: used / self.seconds for role, used in self.used.items()}
        machine = self.machine / self.seconds
        busy["other"] = max(0.0, machine - sum(busy.values()))
        busy["idle"] = max(0.0, (os.cpu_count() or 1) - machine)
        return {role: round(cores, 2) for role, cores in busy.items()}


def measure_replicas(
    name: str, spec: LoadSpec, replicas: list[Server], shares: CpuShares, pool: Any, plan: Plan
) -> dict[str, Any]:
    """One closed-loop run of `spec` (its `ports`: the replicas it loads); CPU of every role."""
    for replica in replicas:
        replica.reset_peak_rss()
    result = run_load(spec, pool, plan.processes, shares, lead=plan.lead)
    row: dict[str, Any] = {
        "scenario": name,
        "server": "broker",
        "mode": "closed",
        "replicas_loaded": len(spec.ports),
        **_load_fields(result),
        # Every running replica, the idle one of the 1-replica run too.
        "cpu_s_per_1k": _per_1k(shares.used["replicas"], result.calls),
        "cores": shares.cores(),
        "peak_rss_mb": max(round(r.status_kb("VmHWM") / 1024, 1) for r in replicas),
    }
    cores = ", ".join(f"{role} {value:.2f}" for role, value in row["cores"].items())
    print(
        f"  {name:<28} {row['rps']:>9.1f} req/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms"
        f"  cores: {cores}",
        flush=True,
    )
    return row


# --------------------------------------------------------------------- runs


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    import google.protobuf

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "kernel": platform.release(),
    }


def run_bench(plan: Plan, root: Path, *, sqlite: bool = True, replicas: bool = True) -> dict[str, Any]:
    """The SQLite scenarios against the echo server and the proxy (unless not `sqlite`), the replica
    scenario (unless not `replicas`), then the leases scenario."""
    env = world.make_env(root)
    report: dict[str, Any] = {
        "kind": "bench",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "plan": plan.__dict__,
    }
    pool = client_pool(plan.processes)
    try:
        load_pids = warm_pool(pool, plan.processes)
        LOAD_PIDS[:] = load_pids
        if sqlite:
            report.update(run_sqlite(env, plan, pool))
            report["proxy"] = run_proxy(env, plan)
        if replicas:
            report["postgres_replicas"] = run_replicas(env, plan, pool, load_pids)
        report["leases"] = run_leases(env, plan)
    finally:
        pool.terminate()
        pool.join()
    return report


def run_proxy(env: world.BenchEnv, plan: Plan) -> dict[str, Any]:
    """ProxyHttp against the same GET sent straight to a local upstream (`bench/proxy.py`)."""
    print("proxy: a GET through the broker vs straight to the upstream ...", flush=True)
    proxy.proxy_config(env)
    upstream = start_server("upstream", env.root)
    broker = launch_server("broker", env.root, "proxy", name="proxy").ready()
    try:
        asyncio.run(proxy.prepare(env, broker.info["admin"], upstream.info["port"]))
        seconds = plan.duration / 2
        return asyncio.run(
            proxy.measure(env, broker.info["resolve"], upstream.info["port"], seconds, plan.concurrency)
        )
    finally:
        stop_processes([broker.process, upstream.process])


LEASE_IN_FLIGHT = 8  # the leases scenario's concurrency: creation, and Resolve beside the lease table


def run_leases(env: world.BenchEnv, plan: Plan) -> dict[str, Any]:
    """Lease creation latency on the local PostgreSQL, and warm Resolve of a static connection with
    no leases, then with `plan.outstanding_leases` in the lease table, on SQLite then on a PostgreSQL
    store (`bench/leases.py`).

    Skipped (and said so) without a PostgreSQL server.
    """
    dsn = postgres.server_dsn()
    if dsn is None:
        print(f"leases: skipped: {postgres.skip_reason()}", flush=True)
        return {"skipped": postgres.skip_reason()}
    print("leases: creation on the local PostgreSQL, Resolve beside outstanding leases ...", flush=True)
    section: dict[str, Any] = {"outstanding": {}}
    with leases.run_roles(dsn) as roles:
        config = leases.leases_config(env, "leases", env.root / "leases.db")
        section["creation"], ids = _lease_creation(env, plan, config, dsn, roles)
        section["outstanding"]["sqlite"] = _outstanding_runs(
            env, plan, config, env.root / "leases.db", ids, roles
        )
        with postgres.temporary_database(dsn) as (_name, url):
            config = leases.leases_config(env, "leases-pg", url)
            broker = _lease_broker(env, config)
            try:
                ids = asyncio.run(leases.prepare(env, broker.info["admin"], dsn, *roles))
            finally:
                broker.stop()
            section["outstanding"]["postgres"] = _outstanding_runs(env, plan, config, url, ids, roles)
    section["load_average_after"] = leases.load_average()
    return section


def _lease_broker(env: world.BenchEnv, config: Path) -> Server:
    return launch_server("broker", env.root, config.stem, name=config.stem).ready()


def _lease_creation(
    env: world.BenchEnv, plan: Plan, config: Path, dsn: str, roles: tuple[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Lease creation on the broker of `config`; the figures and the connections' ids."""
    broker = _lease_broker(env, config)
    try:
        ids = asyncio.run(leases.prepare(env, broker.info["admin"], dsn, *roles))
        ports = broker.info["resolve"], broker.info["admin"]
        creation = asyncio.run(
            leases.measure_creation(
                env, *ports, ids["dynamic"], plan.lease_creates, LEASE_IN_FLIGHT, broker.metrics
            )
        )
        creation["roles_left"] = asyncio.run(leases.roles_with_prefix(dsn, roles[1]))
    finally:
        broker.stop()
    return creation, ids


def _outstanding_runs(
    env: world.BenchEnv,
    plan: Plan,
    config: Path,
    database: Path | str,
    ids: dict[str, str],
    roles: tuple[str, str],
) -> dict[str, Any]:
    """Warm Resolve of the static connection with no leases, then with `plan.outstanding_leases`."""
    runs = []
    inserted: dict[str, float] = {}
    for outstanding in (0, plan.outstanding_leases):
        if outstanding:
            inserted = asyncio.run(leases.insert_outstanding(database, ids["dynamic"], roles[1], outstanding))
        broker = _lease_broker(env, config)  # both runs on a freshly started broker, warmed up alike
        try:
            row = asyncio.run(
                leases.measure_resolve(
                    env,
                    broker.info["resolve"],
                    ids["static"],
                    LEASE_IN_FLIGHT,
                    plan.duration / 2,
                    plan.warmup / 2,
                )
            )
            runs.append(row | {"outstanding_leases": outstanding})
        finally:
            broker.stop()
    return {
        "runs": runs,
        **inserted,
        "p99_ratio": _ratio(runs[1]["p99_ms"], runs[0]["p99_ms"]),
    }


def _lease_lines(section: dict[str, Any]) -> list[str]:
    if "skipped" in section:
        return [f"leases: skipped: {section['skipped']}"]
    lines = ["leases (issue 17): creation on the local PostgreSQL (Resolve on a dynamic connection)"]
    creation = section["creation"]
    for key, row in creation.items():
        if isinstance(row, dict):
            lines.append(
                f"  create {key:<20} {row['calls']:>5} leases  {row['per_second']:>7.1f}/s  "
                f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
                f"(the broker's own mean {row['server_mean_ms'] or 0.0:.2f} ms)"
            )
    lines.append(
        f"  {creation['revoked']} revoked in "
        f"{creation['revoke_all_seconds']:.2f} s; roles left {creation['roles_left']}"
    )
    for store, part in section["outstanding"].items():
        for row in part["runs"]:
            lines.append(
                f"  resolve static, {store} store, {row['outstanding_leases']:>6} outstanding leases: "
                f"{row['per_second']:>8.1f}/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
                f"(load average {row['load_average_before'][0]})"
            )
        lines.append(
            f"  {store}: p99 with / without outstanding leases: {part['p99_ratio']:.3f}; one pass of the"
            f" revocation worker's queries over the {part['runs'][1]['outstanding_leases']} leases: "
            f"{part['worker_poll_ms']:.2f} ms"
        )
    return lines


def run_sqlite(env: world.BenchEnv, plan: Plan, pool: Any) -> dict[str, Any]:
    """The broker on SQLite against the echo server: scenarios and ratios."""
    root = env.root
    print(f"seeding {plan.connections} connections and grants ...", flush=True)
    ids, seed_seconds = asyncio.run(world.seed(env, plan.connections))
    print(f"  seeded in {seed_seconds:.1f} s", flush=True)
    hot = ids[len(ids) // 2]
    rows: list[dict[str, Any]] = []
    servers: list[Server] = []
    try:
        broker = start_server("broker", root)
        servers.append(broker)
        response = asyncio.run(_sample_response(env, broker.info["resolve"], hot))
        (root / "response.bin").write_bytes(response)
        echo = start_server("echo", root, str(root / "response.bin"))
        servers.append(echo)
        base = resolve_spec(env, plan, (hot,), plan.channels)
        on_echo = replace(base, port=echo.info["resolve"])
        on_broker = replace(base, port=broker.info["resolve"])
        print("closed loop (saturation):", flush=True)
        rows.append(measure("echo", echo, on_echo, pool, plan))
        rows.append(measure("resolve_hot", broker, on_broker, pool, plan))
        # Cold cache at the start: only the hot connection was resolved so far.
        uniform = replace(on_broker, ids=tuple(ids), warmup=min(plan.warmup, 0.5))
        rows.append(measure("resolve_uniform", broker, uniform, pool, plan, connections=len(ids)))
        # The same spread once every connection is in the cache (a broker that has been serving them):
        # the cold run above pays a store read per connection met for the first time.
        asyncio.run(world.warm_caches(env, [broker.info["resolve"]], list(ids)))
        warm = measure("resolve_uniform_warm", broker, uniform, pool, plan, connections=len(ids))
        rows.append(warm)
        one = {"pool": pool, "plan": plan}
        rows.append(measure("echo_one_in_flight", echo, replace(on_echo, concurrency=1), **one))
        one_broker = replace(on_broker, concurrency=1)
        rows.append(measure("resolve_durable_audit_one_in_flight", broker, one_broker, **one))
        echo_rps, hot_rps = rows[0]["rps"], rows[1]["rps"]
        print("open loop at half of saturation:", flush=True)
        for name, server, spec, saturation in (
            ("echo_open_half", echo, on_echo, echo_rps),
            ("resolve_hot_open_half", broker, on_broker, hot_rps),
        ):
            rate = max(1.0, saturation / 2)
            open_spec = replace(spec, rate=rate / plan.processes)
            rows.append(measure(name, server, open_spec, pool, plan, mode="open", offered_rps=round(rate, 1)))
        print("admin:", flush=True)
        for page_size in (100, 1000):
            rows.append(measure_paging(env, broker, plan, page_size))
        create = replace(
            on_broker,
            port=broker.info["admin"],
            cert=env.admin.cert,
            key=env.admin.key,
            call="create",
            concurrency=plan.create_concurrency,
            warmup=min(plan.warmup, 0.5),
        )
        rows.append(measure("admin_create", broker, create, pool, plan))
    finally:
        stop_processes([server.process for server in servers])
    by_name = {row["scenario"]: row for row in rows}
    # Throughput ratios, and the same compared by the server's CPU per call: on a shared 2-core
    # machine the load client competes with the server, and CPU per call is the steadier measure.
    cpu = {name: row.get("cpu_s_per_1k") or 0.0 for name, row in by_name.items()}
    ratios = {
        "resolve_hot_cpu_vs_echo": _ratio(cpu["echo"], cpu["resolve_hot"]),
        "resolve_uniform_cpu_vs_echo": _ratio(cpu["echo"], cpu["resolve_uniform"]),
        "resolve_hot_vs_echo": _ratio(by_name["resolve_hot"]["rps"], echo_rps),
        "resolve_uniform_vs_echo": _ratio(by_name["resolve_uniform"]["rps"], echo_rps),
        "resolve_uniform_warm_vs_echo": _ratio(by_name["resolve_uniform_warm"]["rps"], echo_rps),
        "resolve_one_in_flight_vs_echo": _ratio(
            by_name["resolve_durable_audit_one_in_flight"]["rps"], by_name["echo_one_in_flight"]["rps"]
        ),
    }
    loops = {server.kind: server.info.get("event_loop", "asyncio") for server in servers}
    return {
        "seed_seconds": round(seed_seconds, 1),
        "event_loops": loops,
        "ratios": ratios,
        "latency_at_half_saturation": _latency(by_name, plan),
        "scenarios": rows,
    }


LATENCY_TARGETS_MS = {"p50": 2.0, "p99": 10.0}  # issue 15: Resolve at half of its saturation rate


def _latency(by_name: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """Open loop at half of each server's own saturation: Resolve against the targets, echo beside it."""
    summary: dict[str, Any] = {"targets_ms": LATENCY_TARGETS_MS}
    for key, name in (("resolve", "resolve_hot_open_half"), ("echo", "echo_open_half")):
        row = by_name[name]
        summary[key] = {
            "offered_rps": row["offered_rps"],
            "p50_ms": row["p50_ms"],
            "p99_ms": row["p99_ms"],
            "errors": row["calls"] - row["ok"] + row.get("dropped", 0),
            "load_client_cores": row["load_client_cores"],
        }
    resolve = summary["resolve"]
    summary["met"] = (
        resolve["p50_ms"] <= LATENCY_TARGETS_MS["p50"]
        and resolve["p99_ms"] <= LATENCY_TARGETS_MS["p99"]
        and not resolve["errors"]
    )
    summary["load_client_limit_cores"] = plan.processes  # one event loop (one core at most) per process
    return summary


REPLICAS = 2


def shared_cores_caveat() -> str:
    return (
        f"{os.cpu_count()} CPU cores shared by the load client, every replica and PostgreSQL: "
        "the ratio shows how they split those cores, not how replicas with a core each would scale"
    )


def run_replicas(env: world.BenchEnv, plan: Plan, pool: Any, load_pids: list[int]) -> dict[str, Any]:
    """Warm Resolve on one PostgreSQL database: 1 replica loaded, then 2 with the load split evenly.

    Skipped (and said so, in the output and the report) without a PostgreSQL server.
    """
    dsn = postgres.server_dsn()
    if dsn is None:
        print(f"postgres replicas: skipped: {postgres.skip_reason()}", flush=True)
        return {"skipped": postgres.skip_reason()}
    print(f"postgres replicas: {REPLICAS} brokers on a fresh database ...", flush=True)
    with postgres.temporary_database(dsn) as (database, url):
        names = [f"replica-{n}" for n in range(1, REPLICAS + 1)]
        for name in names:
            world.replica_config(env, name, url)
        # Started together, as a deployment would: migrations run once, under their advisory lock.
        launches = [launch_server("broker", env.root, name, name=name) for name in names]
        try:
            replicas = [launch.ready() for launch in launches]
            section, ids = _replica_runs(env, plan, pool, replicas, database, load_pids)
        finally:
            stop_processes([launch.process for launch in launches])
        # The same database and connections, now through `broker serve --workers`.
        section["workers"] = run_workers(env, plan, pool, url, database, ids, load_pids)
        return section


def _replica_runs(
    env: world.BenchEnv,
    plan: Plan,
    pool: Any,
    replicas: list[Server],
    database: str,
    load_pids: list[int],
) -> tuple[dict[str, Any], list[str]]:
    admin = replicas[0].info["admin"]
    ids, seed_seconds = asyncio.run(world.seed_through_admin(env, admin, plan.connections))
    print(
        f"  seeded {len(ids)} connections and grants through replica-1's admin API in {seed_seconds:.1f} s",
        flush=True,
    )
    ports = tuple(replica.info["resolve"] for replica in replicas)
    # Warm: every replica has resolved every connection once, so each one's own cache holds them.
    started = time.perf_counter()
    asyncio.run(world.warm_caches(env, ports, ids))
    warmed = time.perf_counter() - started
    print(f"  every replica resolved each connection once in {warmed:.1f} s", flush=True)
    # The same channels in both runs, a multiple of the replicas so they split evenly.
    spec = resolve_spec(env, plan, tuple(ids), -(-plan.channels // REPLICAS) * REPLICAS)
    roles: dict[str, Callable[[], list[int]]] = {
        "replicas": lambda: [replica.pid for replica in replicas],
        "postgres": lambda: postgres.backend_pids(database),
        "load": lambda: load_pids,
    }

    def run(name: str, loaded: tuple[int, ...]) -> dict[str, Any]:
        return measure_replicas(name, replace(spec, ports=loaded), replicas, CpuShares(roles), pool, plan)

    one = run("postgres_1_replica", ports[:1])
    two = run(f"postgres_{REPLICAS}_replicas", ports)
    section = {
        "connections": len(ids),
        "seed_seconds": round(seed_seconds, 1),
        "in_flight": plan.concurrency * plan.processes,
        "runs": [one, two],
        "scaling_ratio": _ratio(two["rps"], one["rps"]),
        # Above 1: a call costs the replicas less CPU with two of them (each less busy).
        "cpu_per_call_ratio": _ratio(one["cpu_s_per_1k"] or 0.0, two["cpu_s_per_1k"] or 0.0),
        "caveat": shared_cores_caveat(),
    }
    return section, ids


WORKERS = 2
WORKER_IDS = 1000  # the connections the workers scenario resolves: few enough to warm every worker fast
WORKER_CHANNELS = 8  # per load process: the kernel spreads connections, not calls, over the workers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _with_children(pid: int) -> list[int]:
    """`pid` and its child processes (a supervisor and its workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [pid, *(int(child) for child in children)]


def _serve_workers(env: world.BenchEnv, config: Path, count: int, ports: dict[str, int]) -> Server:
    """`broker serve --workers count` (1: a single process, as without the flag) on fixed ports; once
    it logged `broker_started` (the supervisor: once every worker serves)."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    variables |= {
        "BROKER_LISTEN_ADMIN": f"127.0.0.1:{ports['admin']}",
        "BROKER_LISTEN_RESOLVE": f"127.0.0.1:{ports['resolve']}",
        "BROKER_METRICS_LISTEN": f"127.0.0.1:{ports['metrics']}",
    }
    log_path = env.root / f"workers-{count}.log"
    command = [sys.executable, "-m", "broker.cli.broker", "serve", "--config", str(config)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603
            [*command, "--workers", str(count)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=env.root,
            env=variables,
        )
    deadline = time.monotonic() + 60
    while True:
        lines = log_path.read_text(errors="replace").splitlines()
        if any('"broker_started"' in line and '"worker":' not in line for line in lines):
            _settle(process.pid)
            return Server("broker", process, {"pid": process.pid, **ports})
        if process.poll() is not None or time.monotonic() > deadline:
            stop_processes([process])
            raise RuntimeError(f"broker serve --workers {count} did not start:\n" + "\n".join(lines[-30:]))
        time.sleep(0.1)


def _settle(pid: int, limit: float = 15.0) -> None:
    """Wait (at most `limit` s) until `pid` and its children are nearly idle: what each worker does
    just after SERVING (the MCP client's import, in a thread) must not land in a measured window."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        pids = _with_children(pid)
        before = sum(_cpu_by_pid(pids).values())
        time.sleep(0.5)
        if sum(_cpu_by_pid(pids).values()) - before < 0.1 * len(pids):  # under 0.2 cores each
            return


def run_workers(
    env: world.BenchEnv, plan: Plan, pool: Any, url: str, database: str, ids: list[str], load_pids: list[int]
) -> dict[str, Any]:
    """Warm Resolve through one port: `broker serve --workers 1`, then `--workers 2`, same load client."""
    print(f"postgres workers: broker serve --workers 1, then {WORKERS}, on one port ...", flush=True)
    config = world.replica_config(env, "workers", url)
    hot = ids[:WORKER_IDS]
    spec = resolve_spec(env, plan, tuple(hot), WORKER_CHANNELS)
    rows = []
    for count in (1, WORKERS):
        ports = {"admin": _free_port(), "resolve": _free_port(), "metrics": _free_port()}
        server = _serve_workers(env, config, count, ports)
        try:
            # Several connections, each resolving every id: every worker's cache very likely holds them
            # (the warm-up window does the rest; cache misses in the window are reported).
            asyncio.run(world.warm_caches(env, [ports["resolve"]] * 4, hot))
            roles: dict[str, Callable[[], list[int]]] = {
                "broker": functools.partial(_with_children, server.pid),
                "postgres": lambda: postgres.backend_pids(database),
                "load": lambda: load_pids,
            }
            rows.append(
                measure_workers(
                    f"postgres_workers_{count}",
                    count,
                    server,
                    replace(spec, port=ports["resolve"]),
                    CpuShares(roles),
                    pool,
                    plan,
                )
            )
        finally:
            stop_processes([server.process])
    one, two = rows
    return {
        "connections": len(hot),
        "in_flight": plan.concurrency * plan.processes,
        "connections_to_the_port": WORKER_CHANNELS * plan.processes,
        "runs": rows,
        "scaling_ratio": _ratio(two["rps"], one["rps"]),
        "cpu_per_call_ratio": _ratio(one["cpu_s_per_1k"] or 0.0, two["cpu_s_per_1k"] or 0.0),
        "caveat": shared_cores_caveat(),
    }


def measure_workers(
    name: str, workers: int, server: Server, spec: LoadSpec, shares: CpuShares, pool: Any, plan: Plan
) -> dict[str, Any]:
    """One closed-loop run against `broker serve --workers N`; CPU of the supervisor and workers."""
    probe = Probe(server)
    both = _Windows(shares, probe)
    result = run_load(spec, pool, plan.processes, both, lead=plan.lead)
    row: dict[str, Any] = {
        "scenario": name,
        "server": "broker",
        "mode": "closed",
        "workers": workers,
        **_load_fields(result),
        "cpu_s_per_1k": _per_1k(shares.used["broker"], result.calls),
        "cores": shares.cores(),
        "cache_misses": int(probe.delta('broker_resolve_cache_lookups_total{result="miss"}')),
        "peak_rss_mb": max(_rss_mb(pid) for pid in _with_children(server.pid)),
    }
    cores = ", ".join(f"{role} {value:.2f}" for role, value in row["cores"].items())
    print(
        f"  {name:<28} {row['rps']:>9.1f} req/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms"
        f"  cores: {cores}",
        flush=True,
    )
    return row


@dataclass
class _Windows(Window):
    """Several windows opened and closed together."""

    first: Window
    second: Window

    def start(self) -> None:
        self.first.start()
        self.second.start()

    def end(self) -> None:
        self.first.end()
        self.second.end()


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def run_rss(plan: Plan, root: Path) -> dict[str, Any]:
    """Seed 100,000 connections, resolve every one of them once, report the broker's RSS."""
    env = world.make_env(root)
    print(f"seeding {plan.connections} connections and grants (this takes a while) ...", flush=True)
    ids, seed_seconds = asyncio.run(world.seed(env, plan.connections, chunk=256))
    print(f"  seeded in {seed_seconds:.1f} s", flush=True)
    broker = start_server("broker", root)
    try:
        rss_idle = broker.status_kb("VmRSS")
        row = measure_each_once(env, broker, ids, rss_idle)
        paging = measure_paging(env, broker, plan, 1000)
    finally:
        broker.stop()
    return {
        "kind": "rss",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "plan": plan.__dict__,
        "seed_seconds": round(seed_seconds, 1),
        "scenarios": [row, paging],
    }


def measure_each_once(env: world.BenchEnv, broker: Server, ids: list[str], rss_idle: int) -> dict[str, Any]:
    """Resolve every id once (32 in flight), so the cache holds them all; then the broker's RSS."""
    print(f"  resolving each of {len(ids)} connections once ...", flush=True)
    cpu = broker.cpu_seconds()
    started = time.perf_counter()
    asyncio.run(world.warm_caches(env, [broker.info["resolve"]], ids))  # raises unless every call is OK
    seconds = time.perf_counter() - started
    cpu = broker.cpu_seconds() - cpu
    samples = broker.metrics()
    misses = int(samples.get('broker_resolve_cache_lookups_total{result="miss"}', 0))
    evictions = int(samples.get("broker_resolve_cache_evictions_total", 0))
    rss_kb = broker.status_kb("VmRSS")
    row = {
        "scenario": f"resolve_each_once_{len(ids) // 1000}k",
        "server": broker.kind,
        "mode": "each",
        "calls": len(ids),
        "ok": len(ids),
        "codes": {"OK": len(ids)},
        "seconds": round(seconds, 1),
        "rps": round(len(ids) / seconds, 1),
        "cpu_s_per_1k": _per_1k(cpu, len(ids)),
        "rss_after_start_mb": round(rss_idle / 1024, 1),
        "rss_after_mb": round(rss_kb / 1024, 1),
        "peak_rss_mb": round(broker.status_kb("VmHWM") / 1024, 1),
        "cache_misses": misses,
        "cache_evictions": evictions,
        # Everything the broker grew by, per resolved connection: cache, grants, monitor, allocator.
        "kb_per_resolved_connection": round((rss_kb - rss_idle) / len(ids), 2),
    }
    print(
        f"  {row['scenario']:<28} {row['rps']:>9.1f} req/s  RSS {row['rss_after_start_mb']:.1f} -> "
        f"{row['rss_after_mb']:.1f} MB ({row['kb_per_resolved_connection']:.2f} KB per connection)",
        flush=True,
    )
    return row


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def table(report: dict[str, Any]) -> str:
    head = (
        "scenario",
        "mode",
        "ok",
        "errors",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "CPU s/1k",
        "RSS MB",
    )
    lines = ["{:<36} {:<6} {:>8} {:>6} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>7}".format(*head)]
    lines += [_table_line(row) for row in report.get("scenarios", [])]
    for name, value in report.get("ratios", {}).items():
        lines.append(f"ratio {name}: {value:.3f}")
    if "latency_at_half_saturation" in report:
        lines += _latency_lines(report["latency_at_half_saturation"], report.get("event_loops", {}))
    if "proxy" in report:
        lines += _proxy_lines(report["proxy"])
    if "postgres_replicas" in report:
        lines += _replica_lines(report["postgres_replicas"])
    if "leases" in report:
        lines += ["", *_lease_lines(report["leases"])]
    return "\n".join(lines)


def _latency_lines(latency: dict[str, Any], loops: dict[str, str]) -> list[str]:
    targets, resolve, echo = latency["targets_ms"], latency["resolve"], latency["echo"]
    verdict = "met" if latency["met"] else "NOT met"
    return [
        f"latency at half of saturation (open loop), targets p50 <= {targets['p50']:g} ms, "
        f"p99 <= {targets['p99']:g} ms: {verdict}",
        f"  Resolve (warm)  {resolve['offered_rps']:>8.1f}/s offered  p50 {resolve['p50_ms']:.2f} ms  "
        f"p99 {resolve['p99_ms']:.2f} ms  errors {resolve['errors']}",
        f"  echo reference  {echo['offered_rps']:>8.1f}/s offered  p50 {echo['p50_ms']:.2f} ms  "
        f"p99 {echo['p99_ms']:.2f} ms  errors {echo['errors']}",
        f"  load client: {resolve['load_client_cores']:.2f} / {echo['load_client_cores']:.2f} cores used "
        f"(Resolve / echo) of its limit of {latency['load_client_limit_cores']} (one event loop per "
        "process), on the same cores as the server: a client near its limit inflates the tail",
        "  event loops: " + ", ".join(f"{kind} {loop}" for kind, loop in sorted(loops.items())),
    ]


def _proxy_lines(section: dict[str, Any]) -> list[str]:
    lines = ["", "proxy (GET, one client process):"]
    for key in ("direct_one_in_flight", "proxy_one_in_flight", "direct_saturated", "proxy_saturated"):
        row = section[key]
        lines.append(
            f"  {key:<22} {row['per_second']:>9} req/s  p50 {row['p50_ms']:>7} ms  p99 {row['p99_ms']:>7} ms"
        )
    lines.append(
        f"  added by the proxy, one in flight: p50 {section['added_p50_ms']} ms,"
        f" p99 {section['added_p99_ms']} ms; throughput proxy/direct {section['throughput_ratio']}"
    )
    return lines


def _table_line(row: dict[str, Any]) -> str:
    if row["mode"] == "each":
        return (
            f"{row['scenario']:<36} {'each':<6} {row['ok']:>8} {0:>6} {row['rps']:>9.1f} "
            f"RSS {row['rss_after_start_mb']:.1f} MB at start, {row['rss_after_mb']:.1f} MB after "
            f"({row['kb_per_resolved_connection']:.2f} KB per connection) "
            f"{row['cpu_s_per_1k'] or 0.0:>8.3f} {row['peak_rss_mb']:>7.1f}"
        )
    if "total_seconds_median" in row:
        return (
            f"{row['scenario']:<36} {'seq':<6} {row['ok']:>8} {0:>6} "
            f"{row['connections_listed']} listed in {row['total_seconds_median']:.3f} s "
            f"(best {row['total_seconds_best']:.3f} s){'':>8} "
            f"{row['cpu_s_per_1k']:>8.3f} {row['peak_rss_mb']:>7.1f}"
        )
    return "{:<36} {:<6} {:>8} {:>6} {:>9.1f} {:>7.2f} {:>7.2f} {:>7.2f} {:>8.2f} {:>8.3f} {:>7.1f}".format(
        row["scenario"],
        row["mode"],
        row["ok"],
        row["calls"] - row["ok"] + row.get("dropped", 0),
        row["rps"],
        row["p50_ms"],
        row["p90_ms"],
        row["p99_ms"],
        row["p99.9_ms"],
        row["cpu_s_per_1k"] or 0.0,
        row["peak_rss_mb"],
    )


def _replica_lines(section: dict[str, Any]) -> list[str]:
    if "skipped" in section:
        return [f"postgres replicas: skipped: {section['skipped']}"]
    lines = [
        f"postgres replicas: warm Resolve, uniform over {section['connections']} connections, "
        f"{section['in_flight']} calls in flight in both runs (CPU s/1k: all replicas)"
    ]
    lines += [_table_line(row) for row in section["runs"]]
    for row in section["runs"]:
        cores = ", ".join(f"{role} {value:.2f}" for role, value in row["cores"].items())
        lines.append(f"  cores busy in {row['scenario']}: {cores}")
    lines.append(f"scaling_ratio (2 replicas / 1 replica): {section['scaling_ratio']:.3f}")
    lines.append(f"  CPU per call, 1 replica / 2 replicas: {section['cpu_per_call_ratio']:.3f}")
    lines.append(f"  caveat: {section['caveat']}")
    if "workers" in section:
        lines += _workers_lines(section["workers"])
    return lines


def _workers_lines(section: dict[str, Any]) -> list[str]:
    lines = [
        f"postgres workers: warm Resolve on one port, uniform over {section['connections']} connections, "
        f"{section['in_flight']} calls in flight over {section['connections_to_the_port']} connections "
        "(CPU s/1k: supervisor and workers)"
    ]
    lines += [_table_line(row) for row in section["runs"]]
    for row in section["runs"]:
        cores = ", ".join(f"{role} {value:.2f}" for role, value in row["cores"].items())
        lines.append(f"  cores busy in {row['scenario']}: {cores}; cache misses {row['cache_misses']}")
    lines.append(f"workers_scaling_ratio (--workers {WORKERS} / --workers 1): {section['scaling_ratio']:.3f}")
    lines.append(f"  CPU per call, 1 worker / {WORKERS} workers: {section['cpu_per_call_ratio']:.3f}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="a few seconds: tiny seed, short windows")
    mode.add_argument("--rss", action="store_true", help="RSS with 100,000 stored connections")
    parser.add_argument(
        "--replicas-only", action="store_true", help="only the PostgreSQL replica scenario (not with --rss)"
    )
    parser.add_argument(
        "--leases-only", action="store_true", help="only the leases scenario (not with --rss)"
    )
    parser.add_argument("--out", type=Path, help=f"the JSON report (default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--connections", type=int, help="override the number of seeded connections")
    parser.add_argument("--duration", type=float, help="override the measured seconds per scenario")
    parser.add_argument("--profile", type=Path, help="py-spy the broker during resolve_hot/_uniform into DIR")
    args = parser.parse_args(argv)
    if args.rss and (args.replicas_only or args.leases_only):
        parser.error("--replicas-only and --leases-only do not go with --rss")
    if args.replicas_only and args.leases_only:
        parser.error("--replicas-only and --leases-only: choose one")
    global PROFILE_DIR
    PROFILE_DIR = args.profile
    plan = SMOKE if args.smoke else RSS if args.rss else FULL
    if args.connections:
        plan = replace(plan, connections=args.connections)
    if args.duration:
        plan = replace(plan, duration=args.duration)
    out = args.out or (DEFAULT_OUT.with_name("rss.json") if args.rss else DEFAULT_OUT)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        if args.rss:
            report = run_rss(plan, Path(tmp))
        else:
            only = args.replicas_only or args.leases_only
            report = run_bench(plan, Path(tmp), sqlite=not only, replicas=not args.leases_only)
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    print()
    print(table(report))
    print(f"\n{report['wall_seconds']:.0f} s in total; JSON: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
