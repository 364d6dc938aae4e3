"""Wiring: the store, the services and the two mTLS listeners; start-up and shutdown.

    admin listener    AdminService (+ health, reflection)   role admin
    resolve listener  ResolveService, ProxyService (+ health)  role executor

Both require a client certificate signed by the configured CA (gRPC's Python
default is *not* to require one). The broker refuses to start without a usable
master key or with one that cannot open what the store holds.

Health: every listener serves grpc.health.v1 for its service and for "" (overall).
Each is NOT_SERVING until everything has started, while the store does not answer
the background ping (every `health.store_probe_seconds`) and from the moment
shutdown begins. The TLS files are watched (`broker.tlsreload`): new handshakes
pick up a rotated certificate, key or client CA without a restart.

Each listener has its own interceptor chain (drain gate included), so neither can
answer the other's services (invariant 9).

Shutdown (SIGTERM or SIGINT): NOT_SERVING; serve what was already sent, then
refuse new calls with UNAVAILABLE while those under way finish (`broker.api.drain`);
stop the listeners once that work is done; let the provider revocations under way
finish (until the listeners' deadline, the rest cut off and logged); then stop the background work, flush
the batched writes (last-used times, security-monitor state, audit events) and
close the store, in that order; all within `server.grace_seconds`.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from broker import log as broker_log
from broker import metrics
from broker._proto import broker_pb2, broker_pb2_grpc
from broker.api import (
    AdminServicer,
    CallInterceptor,
    DrainGate,
    ProxyServicer,
    ResolveServicer,
    resolve_public_part,
    stop_listeners,
)
from broker.config import Settings, variable
from broker.crypto import Keyring
from broker.egress import EgressPolicy
from broker.errors import ConfigError
from broker.model import Role
from broker.service import (
    AccessService,
    AlertSender,
    AuditLog,
    Clock,
    ConnectionService,
    DenialAudit,
    LeaseService,
    Limit,
    MasterKeys,
    Monitor,
    OAuthService,
    OAuthSettings,
    ProxyService,
    RateLimits,
    ReplicaChanges,
    ResolveCache,
    Resolver,
    TestingService,
    TokenRefresher,
    parse_target,
    rebind_legacy,
    utc_now,
    verify_keyring,
)
from broker.store import ConnectionStore, Coordination, Store
from broker.store.open import store_for
from broker.testers import mcp
from broker.tlsreload import TlsReloader

log = structlog.get_logger("broker.server")

ADMIN_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
RESOLVE_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["ResolveService"].full_name
# Served beside ResolveService on the executor listener.
PROXY_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["ProxyService"].full_name
_ROLES = {ADMIN_SERVICE: Role.ADMIN, RESOLVE_SERVICE: Role.EXECUTOR, PROXY_SERVICE: Role.EXECUTOR}
_ADDRESS_SETTINGS = {ADMIN_SERVICE: "listen.admin", RESOLVE_SERVICE: "listen.resolve"}


class ListenError(ConfigError):
    """A listener's address cannot be bound; names the setting (and its variable) to change."""

    def __init__(self, setting: str, address: str, reason: str) -> None:
        self.setting, self.address, self.reason = setting, address, reason
        section, _, key = setting.partition(".")
        super().__init__(
            f"{self.problem}; choose another with {setting} in the config file or {variable(section, key)}"
        )

    @property
    def problem(self) -> str:
        """What is wrong, without the advice (which depends on how the address was given)."""
        if self.reason == "in use":
            return f"{self.address} is in use (another broker?)"
        return f"cannot listen on {self.address} ({self.setting}): {self.reason}"


def bind_problem(address: str, reuse_port: bool = False) -> str | None:
    """Why a plain socket cannot bind `address` ("in use", or the system's reason); None if it can.

    Asked before gRPC binds: gRPC reports only "Failed to bind", and logs its own error line.
    With `reuse_port` (a worker of `broker serve --workers`) the port may already be held by the
    sibling workers, which the supervisor checked was free before starting any (broker.workers).
    """
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc)
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            # As gRPC does: a port left in TIME_WAIT by an earlier run is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                return "in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
    return None


def _oauth_settings(settings: Settings) -> OAuthSettings:
    return OAuthSettings(
        refresh_margin=timedelta(seconds=settings.oauth_refresh_margin_seconds),
        default_lifetime=timedelta(seconds=settings.oauth_default_token_lifetime_seconds),
        refresh_interval_seconds=settings.oauth_refresh_interval_seconds,
    )


def _rate_limits(settings: Settings, coordination: Coordination, denials: DenialAudit) -> RateLimits:
    """Resolve and proxy buckets per replica; the per-minute ones shared through the store (ratelimit.py)."""
    per_minute = (settings.admin_writes_per_minute, settings.tests_per_minute)
    return RateLimits(
        {
            "resolve": Limit(settings.resolve_per_second, settings.resolve_burst),
            "proxy": Limit(
                settings.proxy_per_second, settings.proxy_burst, in_flight=settings.proxy_in_flight
            ),
            "admin_write": Limit(per_minute[0] / 60, per_minute[0], shared=True),
            "test": Limit(per_minute[1] / 60, per_minute[1], shared=True),
        },
        denials,
        coordination,
    )


def _alert_sender(
    settings: Settings, connections: ConnectionStore, keyring: Keyring, egress: EgressPolicy, clock: Clock
) -> AlertSender | None:
    """The security monitor's alert sender when `monitor.alert_webhook` names a webhook connection."""
    if not settings.monitor.alert_webhook:
        return None
    target = parse_target(settings.monitor.alert_webhook)
    return AlertSender(connections, keyring, egress, target, clock)


@dataclass(frozen=True)
class Services:
    """Everything `build_services` makes: the listeners' servicers and interceptors and the
    background work use these."""

    cache: ResolveCache
    monitor: Monitor
    audit: AuditLog
    denials: DenialAudit
    limits: RateLimits
    changes: ReplicaChanges
    tests: TestingService
    connections: ConnectionService
    tokens: TokenRefresher
    oauth: OAuthService
    resolver: Resolver
    proxy: ProxyService
    access: AccessService
    keys: MasterKeys
    leases: LeaseService


def build_services(settings: Settings, store: Store, keyring: Keyring, clock: Clock) -> Services:
    """Every service, in order, each from the collaborators it names; nothing is wired afterwards.

    One store plays every role; each service is given it as the roles it uses. No I/O here:
    `Broker.start` opens the monitor and the change feed once everything is built.
    """
    egress = EgressPolicy(settings.egress)
    cache = ResolveCache(public_part=resolve_public_part, max_entries=settings.resolve_cache_entries)
    monitor = Monitor(
        events=store,
        connections=store,
        coordination=store,
        clock=clock,
        settings=settings.monitor,
        alerts=_alert_sender(settings, store, keyring, egress, clock),
    )
    audit = AuditLog(
        store,
        clock=clock,
        retention=timedelta(days=settings.audit_retention_days),
        keyring=keyring,
        seal_interval=settings.audit_seal_interval_seconds,
        watch=monitor.audited,  # a secret that does not open is a security event
    )
    # Wrong-role and rate-limited calls: audited up to a limit per principal, then counted.
    denials = DenialAudit(audit, monitor, clock, settings.denied_audits_per_minute)
    # Dynamic database connections: a user per Resolve, and the worker that drops each one.
    leases = LeaseService(
        store=store,
        revocations=store,
        connections=store,
        grants=store,
        keyring=keyring,
        audit=audit,
        egress=egress,
        clock=clock,
        settings=settings.leases,
    )
    # The store's change feed: every committed write (this process's and other replicas') invalidates
    # this cache, blocks announced by any replica's monitor reach this one, and changes that end
    # leases reach the lease service.
    changes = ReplicaChanges(cache, monitor, leases)
    tokens = TokenRefresher(
        connections=store,
        oauth_states=store,
        coordination=store,
        keyring=keyring,
        audit=audit,
        egress=egress,
        clock=clock,
        settings=_oauth_settings(settings),
        on_refresh_failure=monitor.oauth_refresh_failed,
    )
    tests = TestingService(
        connections=store,
        keyring=keyring,
        audit=audit,
        egress=egress,
        clock=clock,
        stale_after=timedelta(days=settings.stale_after_days),
        discover=mcp.discover_tools,
        monitor=monitor,
        tokens=tokens,  # an MCP connection linked to an oauth2 connection tests with its token
    )
    connections = ConnectionService(
        connections=store, keyring=keyring, audit=audit, clock=clock, tests=tests, egress=egress, leases=store
    )
    oauth = OAuthService(
        connections=store,
        oauth_states=store,
        keyring=keyring,
        audit=audit,
        egress=egress,
        clock=clock,
        tokens=tokens,
        create_connection=connections.create_authorized,  # a flow begun from a draft ends in a new row
    )
    resolver = Resolver(
        connections=store,
        grants=store,
        versions=store,
        keyring=keyring,
        cache=cache,
        audit=audit,
        clock=clock,
        cache_ttl_seconds=settings.cache_ttl_seconds,
        tokens=tokens,
        monitor=monitor,
        superseded_grace=timedelta(seconds=settings.superseded_grace_seconds),
        leases=leases,  # a dynamic database connection's Resolve makes a lease
    )
    # Wrap counts, key gauges, RotateMasterKey, and (with master_key.dir) following the key directory.
    keys = MasterKeys(
        key_store=store,
        versions=store,
        keyring=keyring,
        audit=audit,
        clock=clock,
        key_dir=settings.master_key_dir,
        operators=settings.master_key_operators,
        superseded_grace_seconds=settings.superseded_grace_seconds,
    )
    return Services(
        cache=cache,
        monitor=monitor,
        audit=audit,
        denials=denials,
        limits=_rate_limits(settings, store, denials),
        changes=changes,
        tests=tests,
        connections=connections,
        tokens=tokens,
        oauth=oauth,
        resolver=resolver,
        proxy=ProxyService(
            connections=store,
            grants=store,
            keyring=keyring,
            audit=audit,
            egress=egress,
            clock=clock,
            max_response_bytes=settings.egress.max_response_bytes,
            monitor=monitor,
            note_used=resolver.note_used,  # proxied calls count in last_used_at as Resolves do
            tokens=tokens,  # OAuth2 tokens refreshed when due, and once after a 401
        ),
        access=AccessService(connections=store, grants=store, clock=clock),
        keys=keys,
        leases=leases,
    )


MAX_STREAMS_PER_CONNECTION = 1000


class Broker:
    """The running service. `start()` binds both listeners; `stop()` drains and closes.

    `reuse_port`: the listeners share their ports with the other workers of `broker serve --workers`
    (SO_REUSEPORT: the kernel spreads new connections over them); off otherwise.
    """

    def __init__(self, settings: Settings, clock: Clock = utc_now, reuse_port: bool = False) -> None:
        self.settings = settings
        self._reuse_port = reuse_port
        self._clock = clock
        self.admin_port = 0
        self.resolve_port = 0
        self._servers: list[grpc.aio.Server] = []
        self._health: list[tuple[health.aio.HealthServicer, str]] = []
        # SERVING needs all three: started, store answering, not draining.
        self._ready = False
        self._store_ok = True
        self._draining = False
        self._store_probe: asyncio.Task[None] | None = None
        self._gates: list[DrainGate] = []  # one per listener, like everything in its chain
        self._ports: list[int] = []
        self._metrics_server: Any = None
        self.metrics_port = 0
        self._stopped = False

    async def start(self) -> None:
        """Check keys and TLS files, open the store, bind both listeners, then report SERVING."""
        settings = self.settings
        for name, near in settings.unknown_variables:
            log.warning("unknown_environment_variable", variable=name, did_you_mean=near or None)
        keyring = settings.load_keyring()
        # Reads and checks the TLS files now: a bad file stops the start with a ConfigError.
        self.tls = TlsReloader(settings.tls, settings.tls_reload_seconds)
        # PostgreSQL when storage.url is set, else SQLite at storage.path.
        self.store = store_for(settings)
        await self.store.open()
        try:
            await verify_keyring(self.store, keyring)
            # Before any listener opens: rows sealed in an older format are re-sealed in the current one.
            await rebind_legacy(self.store, self.store, keyring, self._clock)
            self.services = services = build_services(settings, self.store, keyring, self._clock)
            await services.monitor.open()
            await self.store.watch(services.changes)
            # Heavy imports before any listener opens: loaded after SERVING, the MCP SDK held the GIL
            # for about a second while the first calls arrived (docs/PERFORMANCE.md, issue 15).
            try:
                await mcp.preload()
            except Exception as exc:  # serving needs no MCP; its first test reports the problem again
                log.warning("mcp_preload_failed", error_type=type(exc).__name__)
            admin = self._listener(ADMIN_SERVICE, settings.admin_addr)
            add_admin = broker_pb2_grpc.add_AdminServiceServicer_to_server
            servicer = AdminServicer(
                services.connections,
                services.access,
                services.audit,
                services.tests,
                services.oauth,
                services.leases,
                monitor=services.monitor,
                keys=services.keys,
            )
            add_admin(servicer, admin)  # type: ignore[no-untyped-call]
            if settings.reflection:
                listed = [ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
                reflection.enable_server_reflection(listed, admin)
            resolve = self._listener(RESOLVE_SERVICE, settings.resolve_addr)
            ResolveServicer(services.resolver, services.leases).add_to(resolve)
            add_proxy = broker_pb2_grpc.add_ProxyServiceServicer_to_server
            add_proxy(ProxyServicer(services.proxy), resolve)  # type: ignore[no-untyped-call]
            self._health.append((self._health[-1][0], PROXY_SERVICE))
            self.admin_port, self.resolve_port = self._ports
            await self._publish_health()  # NOT_SERVING: the servicer starts out SERVING for ""
            self.metrics_port = self._start_metrics()
            for server in self._servers:
                await server.start()
        except BaseException:
            await asyncio.gather(*(server.stop(None) for server in self._servers))
            if self._metrics_server is not None:
                self._metrics_server.server_close()
            await self.store.close()
            raise
        services.resolver.start()
        services.tokens.start()
        services.monitor.start()
        services.denials.start()
        services.audit.start_pruning()
        await services.audit.start_sealing()
        services.keys.start()
        services.leases.start()
        await self._refresh_gauges()
        self._store_probe = asyncio.create_task(self._probe_store())
        self._ready = True
        await self._publish_health()
        log.info(
            "broker_started",
            admin=f"{settings.admin_addr.rpartition(':')[0]}:{self.admin_port}",
            resolve=f"{settings.resolve_addr.rpartition(':')[0]}:{self.resolve_port}",
            master_key_id=keyring.active.id,
            event_loop=event_loop_name(),
        )

    def _start_metrics(self) -> int:
        """Serve /metrics on its own port; 0 when turned off."""
        if not self.settings.metrics_listen:
            return 0
        address = self.settings.metrics_listen
        host, _, port = address.rpartition(":")
        try:
            self._metrics_server, _thread = start_http_server(
                int(port), host.strip("[]"), registry=metrics.REGISTRY
            )
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            raise ListenError("metrics.listen", address, reason) from None
        return int(self._metrics_server.server_port)

    async def _publish_health(self) -> None:
        """Set every listener's service and overall status from the current state."""
        serving = self._ready and self._store_ok and not self._draining
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for checker, service in self._health:
            await checker.set(service, status)
            await checker.set("", status)

    async def _probe_store(self) -> None:
        """Ping the store every `health.store_probe_seconds`; flip the health status when that changes."""
        interval = self.settings.health_probe_seconds
        while True:
            await asyncio.sleep(interval)
            problem = None
            try:
                await asyncio.wait_for(self.store.ping(), timeout=max(interval, 1.0))
            except Exception as exc:  # any failure means "not answering"; the type is enough to log
                problem = type(exc).__name__
            if problem is None:
                await self._refresh_gauges()
            if (problem is None) == self._store_ok:
                continue
            self._store_ok = problem is None
            if problem is None:
                log.info("store_reachable_again")
            else:
                log.warning("store_unreachable", error_type=problem)
            await self._publish_health()

    async def _refresh_gauges(self) -> None:
        """Store-derived gauges; a failure here is not a health problem, only a stale gauge."""
        try:
            counts = await self.store.count_connections()
        except Exception as exc:
            log.warning("gauge_refresh_failed", error_type=type(exc).__name__)
            return
        metrics.set_connection_counts(counts)

    def _listener(self, service: str, addr: str) -> grpc.aio.Server:
        """A server bound to `addr` with the call interceptor and a health service (NOT_SERVING yet)."""
        setting = _ADDRESS_SETTINGS[service]
        problem = bind_problem(addr, self._reuse_port)
        if problem is not None:
            raise ListenError(setting, addr, problem)
        gate = DrainGate()
        self._gates.append(gate)
        settings = self.settings

        def milliseconds(seconds: float) -> int:
            return int(seconds * 1000)

        server = grpc.aio.server(
            # Identity, then the rate limit for the known caller, and the error mapping: one layer.
            interceptors=[
                gate,  # outermost: counts calls under way, refuses new ones while draining
                CallInterceptor(
                    settings.trust_domain, _ROLES, self.services.denials.wrong_role, self.services.limits
                ),
            ],
            options=[
                # gRPC sets SO_REUSEPORT by default: a second broker would silently share the port.
                ("grpc.so_reuseport", int(self._reuse_port)),
                # Anyone who can reach the port can hold a socket until this ends, with no certificate.
                ("grpc.server_handshake_timeout_ms", milliseconds(settings.handshake_timeout_seconds)),
                # TLS checks a client's chain once, at the handshake: a GOAWAY after this long makes
                # every client handshake again, against the client CA of the day (calls under way finish).
                ("grpc.max_connection_age_ms", milliseconds(settings.max_connection_age_seconds)),
                # ... and closes it this long after, with whatever is still under way: a client that
                # never reads its answers cannot hold the connection, or them, past it.
                ("grpc.max_connection_age_grace_ms", milliseconds(settings.max_connection_age_grace_seconds)),
                ("grpc.max_connection_idle_ms", milliseconds(settings.max_connection_idle_seconds)),
                # HTTP/2 streams a client may open on one connection. Unlimited by default: streams
                # opened without a request cost memory (~18 KB each, measured) before any identity
                # check or rate limit runs. Clients queue beyond it once they know it; calls sent on
                # a new connection before its settings arrive fail UNAVAILABLE, so it is not small.
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            ],
        )
        self._servers.append(server)
        checker = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        self._health.append((checker, service))
        try:
            # Own credentials per listener: gRPC tracks which TLS configuration each one serves.
            port = server.add_secure_port(addr, self.tls.credentials())
        except RuntimeError:
            port = 0
        if port == 0:
            # Taken between the check and gRPC's own bind; its reason is not known here.
            reason = bind_problem(addr, self._reuse_port) or "address in use or not available"
            raise ListenError(setting, addr, reason)
        self._ports.append(port)
        return server

    async def stop(self, grace: float | None = None) -> None:
        """Mark NOT_SERVING, stop accepting, let in-flight calls finish, flush, close the store."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_seconds if grace is None else grace
        began = time.monotonic()
        self._draining = True
        if self._store_probe is not None:
            self._store_probe.cancel()
            await asyncio.wait([self._store_probe])
        for checker, _ in self._health:
            await checker.enter_graceful_shutdown()  # NOT_SERVING, and stays so
        # Serve what was already sent, refuse (UNAVAILABLE) while the calls under way finish, then
        # close (see broker.api.drain); calls still running when `closed_by` comes are cancelled.
        closed_by = began + grace - min(1.0, grace / 5)  # the rest of the grace is for flushing
        settle_until = began + min(self.settings.drain_delay_seconds, grace)
        await stop_listeners(list(zip(self._gates, self._servers, strict=True)), settle_until, closed_by)
        # The listeners are gone: nothing adds work now. Stop the background tasks, then flush
        # what they batch (last-used times, monitor state, then the audit events every step may
        # have appended) and close the store last. A failing step does not skip the ones after it.
        services = self.services
        # Provider revocations a revoke or purge left running (its caller waits 5 s at most) end
        # before the grace does, or are cut off and logged; their audit events are flushed below.
        await self._shutdown_step("upstream_revocations", services.connections.close(closed_by))
        await self._shutdown_step("tokens", services.tokens.close())
        await self._shutdown_step("proxy", services.proxy.close())
        await self._shutdown_step("leases", services.leases.close())
        await self._shutdown_step("last_used", services.resolver.close())
        await self._shutdown_step("denials", services.denials.close())
        await self._shutdown_step("monitor", services.monitor.close())
        await self._shutdown_step("master_keys", services.keys.close())
        if self._metrics_server is not None:
            # shutdown() waits for the serving thread's next poll: not on the event loop.
            await self._shutdown_step("metrics", asyncio.to_thread(self._metrics_server.shutdown))
            self._metrics_server.server_close()
        await self._shutdown_step("audit", services.audit.close())
        await self.store.close()
        log.info("broker_stopped")

    async def _shutdown_step(self, name: str, step: Awaitable[None]) -> None:
        try:
            await step
        except Exception as exc:
            log.error("shutdown_step_failed", step=name, error_type=type(exc).__name__)


async def serve(
    settings: Settings, on_serving: Callable[[Broker], None] | None = None, reuse_port: bool = False
) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully; `on_serving` is called once SERVING."""
    broker = Broker(settings, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before start(): a SIGTERM that arrives while starting still ends in a graceful stop.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await broker.start()
    # This process serves from here on, and what start-up built (modules, settings, services) lives
    # as long as it does: out of the cyclic collector's reach, a full collection walks only what
    # calls allocate (docs/PERFORMANCE.md, "gc.freeze"). Here, not in `Broker.start`: the whole
    # interpreter is the server's only in `broker serve` and `broker dev`.
    gc.freeze()
    if on_serving is not None:
        on_serving(broker)
    await stop.wait()
    log.info("broker_stopping", grace_seconds=settings.grace_seconds)
    await broker.stop()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (`pip install 'broker[fast]'`), else None
    (asyncio's own). The broker works the same on both; uvloop costs less CPU per call."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def event_loop_name() -> str:
    """ "uvloop" or "asyncio": which event loop runs this coroutine (logged at start)."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def run(
    settings: Settings, on_serving: Callable[[Broker], None] | None = None, reuse_port: bool = False
) -> int:
    """Blocking entry point for the CLI: serve, return an exit code. ConfigError propagates
    (ListenError when an address cannot be bound)."""
    broker_log.configure(settings.log_level)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(settings, on_serving, reuse_port))
    return 0
