"""One edge worker: the store, the ACME issuer, the listeners, wired together.

`--workers N` runs N of these in separate processes; each binds the same
addresses with SO_REUSEPORT and opens the same SQLite store, which is what keeps
them coordinated (challenge tokens, leases, certificates, the event feed). Every
worker runs the background verifier (leases make each check run once) and follows
the event feed. Only the primary worker (slot 0) runs the admin listener and the
webhook sender: the admin port cannot be shared, forced renewals need a running
CertificateManager, and webhooks must go out once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import signal
import socket
import ssl
import stat
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from acme_client import (
    AcmeIssuer,
    AcmeSettings,
    CaBreaker,
    FailoverIssuer,
    OrderLimits,
)
from certstore import CertStore, Store, load_key
from certstore import open_store as open_store_url
from certstore.readthrough import ReadThroughStore, needs_read_through
from proxy.admin import AdminDeps, make_admin_app
from proxy.app import metrics, settings
from proxy.app.config import (
    UNIX_PREFIX,
    Config,
    ConfigError,
    parse_address,
    read_secret,
)
from proxy.app.health import OpsEndpoints
from proxy.app.logging_setup import ACCESS_LOGGER, AccessLogger, redact
from proxy.app.reload import ConfigSource, reload_worker
from proxy.counters import Counters, Meter
from proxy.hosts.checks import HostChecker
from proxy.hosts.events import EventKind
from proxy.hosts.lifecycle import Lifecycle
from proxy.hosts.state_sync import StateSync
from proxy.hosts.verifier import Verifier
from proxy.hosts.webhooks import WebhookSender
from proxy.http.app import MAX_HEADERS, hide_server_version, make_http_app, server_log
from proxy.http.backends import BackendPool
from proxy.http.click_protocol import ClickPaths
from proxy.http.forward import Forwarder, ForwarderSlot
from proxy.http.host_policy import HostPolicy, arrived_over_https
from proxy.http.host_views import CHANGE_EVENTS, HostViews
from proxy.tls import contexts as tlscontexts
from proxy.tls.accept import (
    DescriptorBudget,
    PlainListener,
    ProxyProtocolSettings,
    descriptor_budget,
    inherited_options,
    raise_descriptor_limit,
)
from proxy.tls.certificates import CertificateManager
from proxy.tls.connections import ConnectionLimits, MemoryTrimmer, break_transport_cycle
from proxy.tls.contexts import new_server_context
from proxy.tls.gate import IssuanceGate
from proxy.tls.handshake import HandshakePolicy
from proxy.tls.listener import TLSListener
from proxy.tls.maintenance import Maintainer
from proxy.tls.refusals import Refused
from proxy.wire.peers import TrustedNetworks

log = logging.getLogger(__name__)
# Each shutdown step (a listener, a runner, the store, ...) gets this long, then the next
# one runs: a step that never ends must not keep the process from exiting (a CI teardown
# once waited 180 s on one; which step was not seen). `drain` has already had its deadline.
CLOSE_STEP_SECONDS = 10.0


def listening_socket(address: str, what: str, *, reuse_port: bool) -> socket.socket:
    host, port = parse_address(address, what)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address} ({what}): {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def admin_socket(address: str) -> socket.socket:
    """The admin listener's socket: `host:port`, or `unix:/path` (mode 0660).

    A leftover socket file nobody listens on (a killed edge) is replaced; one that
    answers belongs to a running process and is an error, as is any other file there.
    """
    if not address.startswith(UNIX_PREFIX):
        return listening_socket(address, "admin.listen", reuse_port=False)
    path = address[len(UNIX_PREFIX) :]
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"admin.listen: {path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale
            else:
                raise OSError(errno.EADDRINUSE, f"admin.listen: {path} is in use")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)  # the umask leaves no write bit for others: nobody else can connect
        os.chmod(path, 0o660)  # owner and group (e.g. an operators' group) may connect
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"cannot listen on {address} (admin.listen): {exc.strerror}"
        ) from None
    sock.setblocking(False)
    return sock


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def admin_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = new_server_context()
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"admin.tls_cert/admin.tls_key: cannot load {cert}, {key}: {exc}"
        ) from None
    return ctx


async def open_store(config: Config, clock: Callable[[], float] = time.time) -> Store:
    key = load_key(config.store.key_file or None, config.store.key_env or None)
    location = config.store.location()
    with contextlib.suppress(ValueError):
        if in_url := urlsplit(location).password:
            redact(in_url)  # a password in store.url never reaches a log line either
    return await open_store_url(
        location,
        key,
        clock=clock,
        password=store_password(config),
        pool_size=config.store.pool_size,
        statement_timeout=config.store.timeout_seconds,
        connect_timeout=config.store.connect_timeout_seconds,
    )


def store_password(config: Config) -> str | None:
    """The database password from `store.password_env` (wins when set) or
    `store.password_file`; None when neither gives one (the URL may carry it, or the
    server needs none). Never logged."""
    store = config.store
    value = os.environ.get(store.password_env, "") if store.password_env else ""
    if not value and store.password_file:
        try:
            value = Path(store.password_file).read_text()
        except OSError as exc:
            raise ConfigError(
                f"cannot read store password file {store.password_file}: {exc.strerror}"
            ) from None
    value = value.strip()
    if not value:
        return None
    redact(value)
    return value


def make_issuer(
    config: Config,
    store: CertStore,
    clock: Callable[[], float] = time.time,
    *,
    metered: bool = False,
) -> FailoverIssuer:
    breaker = settings.breaker(config)

    def issuer(settings: AcmeSettings, label: str) -> AcmeIssuer:
        if not metered:
            ca = CaBreaker(store, settings.directory_url, breaker, clock)
            return AcmeIssuer(settings, store, ca)
        # orders counted and timed, breaker state exported (proxy/app/metrics.py)
        ca = CaBreaker(
            store,
            settings.directory_url,
            breaker,
            clock,
            on_change=lambda state: metrics.set_ca_breaker_state(label, state),
        )
        return metrics.MeteredAcmeIssuer(settings, store, ca, ca_label=label)

    fallback = settings.fallback(config)
    return FailoverIssuer(
        issuer(settings.acme(config), "primary"),
        issuer(fallback, "fallback") if fallback is not None else None,
    )


async def build_forwarder(config: Config) -> tuple[Forwarder, BackendPool]:
    """The backends (health checks running) and a started forwarder to them."""
    backend = config.backend
    backends = BackendPool(backend.backend_urls(), settings.health(config))
    await backends.start()
    # clicks counted by status class and timed (proxy/app/metrics.py)
    forwarder_class = metrics.MeteredForwarder if config.metrics.enabled else Forwarder
    forwarder = forwarder_class(
        backends,
        connect_timeout=backend.connect_timeout,
        timeout=backend.timeout,
        pool_size=backend.pool_size,
        forwarded_trusted=TrustedNetworks(
            config.listen.forwarded_trusted, "listen.forwarded_trusted"
        ),
        body_timeout=backend.body_timeout,
        deadline=backend.deadline,
        max_per_source=backend.max_per_source,
        lean_client=backend.lean_client,
        lean_clicks=config.listen.lean_clicks,
    )
    try:
        await forwarder.start()
    except BaseException:
        await backends.close()
        raise
    return forwarder, backends


class EdgeWorker:
    def __init__(
        self, config: Config, clock: Callable[[], float] = time.time, *, primary: bool = True
    ) -> None:
        self.config = config
        self._clock = clock
        self.primary = primary
        self._closers: list[Callable[[], object]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.manager: CertificateManager | None = None
        self.maintainer: Maintainer | None = None
        self.verifier: Verifier | None = None
        self.state_sync: StateSync | None = None
        self.host_views: HostViews | None = None
        self.webhooks: WebhookSender | None = None
        self.tls_listener: TLSListener | None = None
        self.http_listener: PlainListener | None = None  # only with listen.http_proxy_protocol
        self.connections: ConnectionLimits | None = None
        self.clicks: ClickPaths | None = None  # the lean click protocol, listen.lean_clicks
        self.descriptors: DescriptorBudget | None = None
        self.backends: BackendPool | None = None
        self.forwarding: ForwarderSlot | None = None  # swapped on reload (proxy/http/forward.py)
        self.admin_deps: AdminDeps | None = None
        self._sites: list[web.BaseSite] = []  # stopped first on a graceful shutdown
        self._servers: list[web.Server] = []
        self._accepting: list[asyncio.Server] = []  # plain-HTTP listeners: closed first too
        self.http_address: tuple[str, int] | None = None
        self.https_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | str | None = None  # a str: Unix socket
        self.admin_app: web.Application | None = None
        self.metrics_address: tuple[str, int] | None = None  # metrics.listen
        self.store: Store | None = None
        self.read_through: ReadThroughStore | None = None  # a remote store's circuit and copy
        self.http_server: web.Server | None = None  # both listeners' HTTP server
        self.listen_sockets: list[socket.socket] = []  # HTTPS and HTTP, for /readyz
        self.worker_metrics: metrics.WorkerMetrics | None = None
        self._issuer: FailoverIssuer | None = None
        self.meter = Meter()  # every component's counters (proxy/counters.py)
        self._register_counters()
        self.handshake: HandshakePolicy | None = None  # SNI, no-SNI, ALPN (proxy/tls/handshake.py)

    def _register_counters(self) -> None:
        """Each component's counters by source name, read when asked (a component may not
        be running yet, and a reload swaps the forwarder)."""

        def stats_of(attribute: str) -> Callable[[], Counters | None]:
            def read() -> Counters | None:
                component = getattr(self, attribute)
                return component.stats if component is not None else None

            return read

        for source, attribute in (
            ("https_listener", "tls_listener"),
            ("http_listener", "http_listener"),
            ("connections", "connections"),
            ("forward", "forwarder"),
            ("certificates", "manager"),
            ("checks", "verifier"),
            ("webhooks", "webhooks"),
        ):
            self.meter.register(source, stats_of(attribute))

    async def start(self, store: Store | None = None) -> None:
        """Open the store (or take `store`, already open: the worker owns it from here
        on), then everything else."""
        config = self.config
        tlscontexts.SESSION_TICKETS = config.tls.session_tickets
        admin_token = None
        if self.primary and config.admin.listen:  # refuse to serve the admin API unprotected
            admin_token = read_secret(
                config.admin.token_file, config.admin.token_env, "admin token", "admin.token"
            )
        for secret in (admin_token, config.acme.eab_hmac_key, config.fallback.eab_hmac_key):
            if secret:
                redact(secret)  # never in a log line (proxy/app/logging_setup.py)
        if store is None:
            store = await open_store(config, self._clock)
        if needs_read_through(config.store.location()):
            # The database is not in the click path: fail fast while it is away, answer
            # from the node's local copy (certstore/readthrough.py). SQLite is local already.
            try:
                self.read_through = await ReadThroughStore.open(
                    store,
                    load_key(config.store.key_file or None, config.store.key_env or None),
                    config.store.local_copy,
                    config.store.local_copy_max_hosts,
                    clock=self._clock,
                )
            except BaseException:
                await store.close()
                raise
            store = self.read_through.as_store()
        self.store = store
        self._closers.append(store.close)
        self._closers.append(self._cancel_tasks)
        released = await store.release_dead_leases()
        if released:
            log.info(
                "released %d lease(s) of earlier processes: %s",
                len(released),
                ", ".join(sorted(released)[:10]),
            )
        issuer = make_issuer(config, store, self._clock, metered=config.metrics.enabled)
        self._closers.append(issuer.close)
        self._issuer = issuer
        # The CA is reached lazily, through its circuit breaker: a CA that is down now must
        # not keep this edge from serving the certificates and challenges it has.
        ca_task = asyncio.ensure_future(self._connect_ca(issuer))

        async def stop_ca_task() -> None:  # before the issuer's thread pool goes away
            ca_task.cancel()
            await asyncio.gather(ca_task, return_exceptions=True)

        self._closers.append(stop_ca_task)
        account = await store.get_account(config.acme.directory)
        checker = HostChecker(settings.checks(config), self._clock)
        lifecycle = Lifecycle(store, settings.schedule(config), self._clock)
        gate = IssuanceGate(
            store, checker, lifecycle, config.tls.pending_recheck_seconds, clock=self._clock
        )
        self.manager = CertificateManager(
            store,
            issuer,
            gate,
            settings.manager(config),
            clock=self._clock,
            limits=OrderLimits(store, settings.limits(config), clock=self._clock),
            lifecycle=lifecycle,
        )
        self._closers.append(self.manager.close)
        self.maintainer = Maintainer(
            store,
            self.manager,
            issuer,
            checker.cname_checker,
            config.edge.cname_target,
            settings.maintenance(config),
            clock=self._clock,
        )
        self.manager.on_stored = self.maintainer.wake
        self.state_sync = StateSync(
            store,
            self.manager.forget,
            config.lifecycle.sync_seconds,
            applied=self.manager.caused_here,
        )
        await self.state_sync.start()
        # a certificate stored by another worker changes when this one's loop must wake
        self.state_sync.follow({EventKind.ISSUED, EventKind.RENEWED}, self.maintainer.wake)
        self.host_views = HostViews(store)
        self.state_sync.follow(CHANGE_EVENTS, self.host_views.forget)
        if self.read_through is not None:  # a changed host is copied again (or dropped)
            self.state_sync.follow(CHANGE_EVENTS, self.read_through.host_changed)
        self.verifier = Verifier(
            store,
            checker,
            lifecycle,
            settings.verifier(config),
            issue_now=self._issue_now,
            account_uri=account.uri if account else None,
            clock=self._clock,
        )
        forwarder, self.backends = await build_forwarder(config)
        self.forwarding = ForwarderSlot(forwarder, self.backends)
        self._closers.append(self.forwarding.close)
        forwarded_trusted = TrustedNetworks(
            config.listen.forwarded_trusted, "listen.forwarded_trusted"
        )

        policy = HostPolicy(
            self.host_views,
            https_public_port=config.edge.https_public_port,
            clock=self._clock,
            is_https=functools.partial(arrived_over_https, forwarded_trusted),
        )
        hide_server_version()
        # How each HTTP connection is handled; the listeners build their handlers with
        # these too (ConnectionLimits.protocol_factory), not through the runner's server.
        handler_options: dict[str, Any] = {
            "access_log": logging.getLogger(ACCESS_LOGGER),  # off unless `access_log` is set
            "access_log_class": AccessLogger,
            "logger": server_log(),
            "max_headers": MAX_HEADERS,
        }
        runner = web.AppRunner(
            make_http_app(
                self.manager.challenges, self.forwarding, self.state_sync.is_suspended, policy
            ),
            **handler_options,
        )
        await runner.setup()
        self._closers.append(runner.cleanup)
        assert runner.server is not None
        self._servers.append(runner.server)
        self.http_server = runner.server
        proxy_protocol = ProxyProtocolSettings(
            trusted=TrustedNetworks(
                config.listen.proxy_protocol_trusted, "listen.proxy_protocol_trusted"
            ),
            timeout=config.listen.proxy_protocol_timeout,
        )
        # Descriptors: raise the soft limit to the hard one, keep room for everything
        # that is not a client connection, and size the connection caps to the rest.
        self.descriptors = budget = descriptor_budget(
            raise_descriptor_limit(),
            # 192 beyond the backend pool (was 128): with 1024 descriptors a burst of 1,100
            # idle connections peaked at 925-939 in full test runs, under 100 from the limit
            reserve=config.backend.pool_size + len(config.backend.backend_urls()) + 192,
            accept_loops=2 if config.listen.http_proxy_protocol else 1,
            max_connections=config.listen.max_connections,
        )
        self.connections = ConnectionLimits(
            settings.connections(config, max_total=budget.max_connections),
            exempt=forwarded_trusted,
        )
        protocol_factory: Callable[[], asyncio.Protocol] = self.connections.protocol_factory(
            runner.server, **handler_options
        )
        if config.listen.lean_clicks:  # the common click without aiohttp's server machinery
            access = handler_options["access_log"]
            self.clicks = ClickPaths(
                forwarding=self.forwarding,
                is_suspended=self.state_sync.is_suspended,
                policy=policy,
                fallback=protocol_factory,
                limits=self.connections,
                server=runner.server,
                idle_timeout=config.listen.idle_timeout,
                access_logged=lambda: access.isEnabledFor(logging.INFO),  # AccessLogger.enabled
                release_transport=break_transport_cycle,
            )
            protocol_factory = self.clicks.protocol_factory()
        trimmer = MemoryTrimmer(self.connections.stats)
        trimmer.start()
        self._closers.append(trimmer.close)
        http_sock = listening_socket(config.listen.http, "listen.http", reuse_port=True)
        self.http_address = http_sock.getsockname()[:2]
        self.listen_sockets.append(http_sock)
        if config.listen.http_proxy_protocol:
            # aiohttp's site would read the header as a broken request: accept ourselves
            self.http_listener = PlainListener(
                http_sock,
                protocol_factory,
                proxy_protocol=proxy_protocol,
                max_pending=budget.max_pending,
            )
            self.http_listener.start()
            self._closers.append(self.http_listener.close)
        else:
            inherited_options(http_sock)  # as the listeners do: the lean protocol sets none
            http_server = await asyncio.get_running_loop().create_server(
                protocol_factory, sock=http_sock, backlog=1024
            )
            self._accepting.append(http_server)
            self._closers.append(http_server.close)

        https_sock = listening_socket(config.listen.https, "listen.https", reuse_port=True)
        self.https_address = https_sock.getsockname()[:2]
        self.listen_sockets.append(https_sock)
        self.handshake = HandshakePolicy(self.manager, config.edge.no_sni_host)
        select_context: metrics.Selector = self.handshake.select
        if config.metrics.enabled:  # refusals by reason, certificate waits
            select_context = metrics.instrument_selector(
                select_context, self.manager.cached_context
            )
        self.tls_listener = TLSListener(
            https_sock,
            select_context,
            protocol_factory,
            settings.listener(
                config,
                proxy_protocol if config.listen.https_proxy_protocol else None,
                max_pending=budget.max_pending,
            ),
        )
        self.tls_listener.start()
        self._closers.append(self.tls_listener.close)
        if config.renewal.interval_seconds > 0:  # 0: no background loop (tests drive run_once)
            self.maintainer.start()
            self._closers.append(self.maintainer.close)

        self._spawn(self.state_sync.run_forever())
        if config.metrics.enabled:
            self.worker_metrics = metrics.start_worker_metrics(self)
            self._spawn(self.worker_metrics.run_forever())
        if config.verify.poll_seconds > 0:
            self._spawn(self.verifier.run_forever())
        if self.primary:
            ops = self._ops_endpoints(store)
            if admin_token is not None:
                await self._start_admin(store, lifecycle, admin_token, ops)
            if config.metrics.listen:
                await self._start_metrics_listener(ops)
            if config.webhooks.url:
                await self._start_webhooks(store)
        log.info(
            "descriptors: limit %d, %d reserved, %d established connections (%d per source), "
            "%d pending per accept loop",
            budget.limit,
            budget.reserve,
            budget.max_connections,
            config.listen.max_connections_per_source,
            budget.max_pending,
        )
        log.info(
            "edge worker ready: https on %s%s, http on %s%s, backends %s",
            _fmt(self.https_address),
            " (PROXY protocol)" if config.listen.https_proxy_protocol else "",
            _fmt(self.http_address),
            " (PROXY protocol)" if config.listen.http_proxy_protocol else "",
            ", ".join(config.backend.backend_urls()),
        )

    def _ops_endpoints(self, store: Store) -> OpsEndpoints:
        """/healthz, /readyz and /metrics (proxy/app/health.py, proxy/app/metrics.py)."""
        exporter = None
        if self.config.metrics.enabled:
            m = self.config.metrics
            token = None
            if m.token_file or os.environ.get(m.token_env or ""):
                token = read_secret(m.token_file, m.token_env, "metrics token", "metrics.token")
            exporter = metrics.Exporter(store, self.config, self.worker_metrics, token)
        return OpsEndpoints(self, exporter)

    async def _start_metrics_listener(self, ops: OpsEndpoints) -> None:
        runner = web.AppRunner(ops.app(), access_log=None)
        await runner.setup()
        self._closers.append(runner.cleanup)
        sock = listening_socket(self.config.metrics.listen, "metrics.listen", reuse_port=False)
        await web.SockSite(runner, sock).start()
        self.metrics_address = sock.getsockname()[:2]
        log.info("metrics and health on http://%s/metrics", _fmt(self.metrics_address))

    async def _start_admin(
        self, store: Store, lifecycle: Lifecycle, token: str, ops: OpsEndpoints
    ) -> None:
        assert self.verifier is not None
        admin = self.config.admin
        tls = admin_tls_context(admin.tls_cert, admin.tls_key) if admin.tls_cert else None
        deps = AdminDeps(
            store=store,
            verifier=self.verifier,
            lifecycle=lifecycle,
            edge_target=self.config.edge.cname_target.rstrip(".").lower(),
            token=token,
            manager=self.manager,
            state_sync=self.state_sync,
            host_views=self.host_views,
            clock=self._clock,
            secure_cookies=tls is not None,
            auth_delay=admin.auth_delay_seconds,
            auth_max_delay=admin.auth_max_delay_seconds,
            issuer=self._issuer,
        )
        self.admin_deps = deps
        redact(token)
        self.admin_app = make_admin_app(deps)
        ops.install(self.admin_app)  # /healthz, /readyz, /metrics answer before the token check
        runner = web.AppRunner(self.admin_app, access_log=None, logger=server_log())
        await runner.setup()
        self._closers.append(runner.cleanup)
        assert runner.server is not None
        self._servers.append(runner.server)
        sock = admin_socket(admin.listen)
        site = web.SockSite(runner, sock, ssl_context=tls)
        await site.start()
        self._sites.append(site)
        scheme = "https" if tls is not None else "http"
        if sock.family == socket.AF_UNIX:
            path: str = sock.getsockname()
            self.admin_address = path
            self._closers.append(functools.partial(_unlink, path))
            log.info("admin API and status page on %s (%s, mode 0660)", admin.listen, scheme)
            return
        address: tuple[str, int] = sock.getsockname()[:2]
        self.admin_address = address
        log.info("admin API and status page on %s://%s/status", scheme, _fmt(address))
        if tls is None and not ipaddress.ip_address(address[0]).is_loopback:
            log.warning(
                "admin listener %s is not on loopback and speaks plain HTTP: set admin.tls_cert"
                " and admin.tls_key, or put TLS in front",
                _fmt(address),
            )

    async def _start_webhooks(self, store: Store) -> None:
        hooks = self.config.webhooks
        secret = read_secret(
            hooks.secret_file, hooks.secret_env, "webhook secret", "webhooks.secret"
        )
        redact(secret)
        self.webhooks = WebhookSender(
            store,
            settings.webhooks(self.config, secret),
        )
        await self.webhooks.start()
        self._closers.append(self.webhooks.close)
        self._spawn(self.webhooks.run_forever())

    async def _connect_ca(self, issuer: FailoverIssuer) -> None:
        await issuer.connect()
        await issuer.run_prober()

    async def _issue_now(self, hostname: str) -> None:
        """Proactive issuance: a host that has just verified gets its certificate now."""
        assert self.manager is not None
        self.manager.forget(hostname)  # an earlier refusal must not stand in the way
        try:
            await self.manager.context_for(hostname)
        except Refused as exc:
            log.info("proactive issuance for %s did not happen: %s", hostname, exc.reason)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    @property
    def forwarder(self) -> Forwarder | None:
        """The forwarder in service (a reload may swap it)."""
        return self.forwarding.forwarder if self.forwarding is not None else None

    async def drain(self, seconds: float) -> None:
        """Graceful stop: accept nothing more, let requests in flight finish within `seconds`.

        Listening sockets close first (new connections are refused, or go to the other
        workers sharing the port). Connections between accept and hand-off (ClientHello,
        a certificate being issued, the handshake) get to finish; then every HTTP
        connection finishes its current request and closes, idle keep-alive ones at
        once. Whatever is still running at the deadline is cancelled. `close()` then
        stops the background work (its leases are released as the tasks end) and the
        store, last.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, seconds)
        listeners = [x for x in (self.tls_listener, self.http_listener) if x is not None]
        for listener in listeners:
            await listener.stop_accepting()
        for site in self._sites:
            await site.stop()
        self._sites.clear()
        for plain in self._accepting:
            plain.close()
        self._accepting.clear()
        # said once it is true: a client that reads this line and connects is refused
        log.info(
            "stopping: no new connections, up to %.0f s for requests in flight",
            seconds,
            extra={"event": "draining", "duration": seconds},
        )
        for listener in listeners:
            await listener.wait_idle(max(0.0, deadline - loop.time()))
        for server in self._servers:
            server.pre_shutdown()  # idle keep-alive connections close now, busy ones after
        await asyncio.gather(
            *(server.shutdown(max(0.0, deadline - loop.time())) for server in self._servers)
        )
        self._servers.clear()

    async def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                result = closer()
                if asyncio.iscoroutine(result):
                    await asyncio.wait_for(result, CLOSE_STEP_SECONDS)
            except TimeoutError:
                log.warning(
                    "shutting down: %s did not finish within %.0f s; cancelled, going on",
                    getattr(closer, "__qualname__", repr(closer)),
                    CLOSE_STEP_SECONDS,
                )
            except Exception:  # keep closing the rest
                log.exception("error while shutting down")


def _fmt(address: tuple[str, int] | None) -> str:
    if address is None:
        return "-"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run_worker(
    config: Config,
    ready: Callable[[], None] | None = None,
    *,
    primary: bool = True,
    source: ConfigSource | None = None,
    store: Store | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT (drained, see `EdgeWorker.drain`); SIGHUP reloads.
    `store`: an open store for the worker to use (and close), e.g. the preflight's.

    A second SIGINT (Ctrl-C twice) stops without waiting for the requests in flight.

    SIGHUP may arrive blocked (`serve` blocks it until this handler exists, so an early
    one is not the default "terminate"); it is unblocked once the handler is in place.
    """
    worker = EdgeWorker(config, primary=primary)
    stop = asyncio.Event()
    now = asyncio.Event()  # a second Ctrl-C: do not wait for the requests in flight
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_stop(sig: int) -> None:
        # Repeated SIGTERMs change nothing: systemd signals the whole control group and
        # the supervisor forwards its own, so a worker commonly gets two.
        nonlocal interrupts
        if sig == signal.SIGINT:
            interrupts += 1
            if interrupts >= 2:
                now.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    reloads: list[asyncio.Task[bool]] = []

    async def reload() -> bool:
        await started.wait()
        if source is None:
            log.warning("SIGHUP: no configuration source to reload from; ignored")
            return False
        return await reload_worker(worker, source)

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.append(task)
        task.add_done_callback(reloads.remove)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    try:
        await worker.start(store)
        started.set()
        if ready is not None:
            ready()
        await stop.wait()
        drain = loop.create_task(worker.drain(worker.config.shutdown_timeout))
        again = loop.create_task(now.wait())
        await asyncio.wait({drain, again}, return_when=asyncio.FIRST_COMPLETED)
        drain.cancel()
        again.cancel()
        await asyncio.gather(drain, again, return_exceptions=True)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in list(reloads):
            task.cancel()
        await worker.close()
