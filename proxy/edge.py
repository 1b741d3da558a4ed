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
import ipaddress
import logging
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from acme_client import (
    ACME_TLS_ALPN,
    AcmeIssuer,
    AcmeSettings,
    FailoverIssuer,
    LimitSettings,
    OrderLimits,
)
from certstore import CertStore, SQLiteStore, load_key

from .admin import AdminDeps, make_admin_app
from .backends import BackendPool, HealthSettings
from .certificates import CertificateManager, ManagerSettings
from .checks import CheckSettings, HostChecker
from .clienthello import HANDSHAKE_FAILURE, ClientHello
from .config import Config, parse_address, read_secret
from .connections import ConnectionLimits, ConnectionSettings, MemoryTrimmer
from .forward import Forwarder
from .gate import IssuanceGate
from .host_policy import HostPolicy
from .host_views import CHANGE_EVENTS, HostViews
from .hostnames import InvalidHostname, normalize_hostname
from .http_app import make_http_app
from .lifecycle import Lifecycle
from .listener import (
    DescriptorBudget,
    PlainListener,
    ProxyProtocolSettings,
    descriptor_budget,
    raise_descriptor_limit,
)
from .maintenance import Maintainer, MaintenanceSettings
from .peers import TrustedNetworks, client_address
from .refusals import Refused
from .schedule import Schedule
from .state_sync import StateSync
from .tls_listener import ListenerSettings, TLSListener
from .verifier import Verifier, VerifierSettings
from .webhooks import WebhookSender, WebhookSettings

log = logging.getLogger(__name__)


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


async def open_store(config: Config, clock: Callable[[], float] = time.time) -> SQLiteStore:
    key = load_key(config.store.key_file or None, config.store.key_env or None)
    return await SQLiteStore.open(config.store.path, key, clock=clock)


def acme_settings(config: Config) -> AcmeSettings:
    acme = config.acme
    return AcmeSettings(
        directory_url=acme.directory,
        ca_bundle=acme.ca_bundle or None,
        contact_email=acme.email or None,
        threads=acme.threads,
        order_timeout=acme.order_timeout,
        challenges=tuple(acme.challenges),
        profile=acme.profile or None,
        eab_kid=acme.eab_kid or None,
        eab_hmac_key=acme.eab_hmac_key or None,
    )


def fallback_settings(config: Config) -> AcmeSettings | None:
    fallback = config.fallback
    if not fallback.directory:
        return None
    return AcmeSettings(
        directory_url=fallback.directory,
        ca_bundle=fallback.ca_bundle or None,
        contact_email=fallback.email or config.acme.email or None,
        threads=config.acme.threads,
        order_timeout=config.acme.order_timeout,
        challenges=tuple(config.acme.challenges),
        profile=fallback.profile or None,
        eab_kid=fallback.eab_kid or None,
        eab_hmac_key=fallback.eab_hmac_key or None,
    )


def make_issuer(config: Config, store: CertStore) -> FailoverIssuer:
    fallback = fallback_settings(config)
    return FailoverIssuer(
        AcmeIssuer(acme_settings(config), store),
        AcmeIssuer(fallback, store) if fallback is not None else None,
    )


def limit_settings(config: Config) -> LimitSettings:
    limits = config.limits
    return LimitSettings(
        orders_per_window=limits.orders_per_window,
        orders_window_seconds=limits.orders_window_seconds,
        per_domain=limits.per_domain,
        per_domain_window_seconds=limits.per_domain_window_seconds,
        failed_authz_per_hour=limits.failed_authz_per_hour,
        first_backoff_seconds=config.tls.failure_backoff_seconds,
        max_backoff_seconds=limits.max_backoff_seconds,
    )


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
        self.forwarder: Forwarder | None = None
        self.descriptors: DescriptorBudget | None = None
        self.backends: BackendPool | None = None
        self.http_address: tuple[str, int] | None = None
        self.https_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None

    async def start(self) -> None:
        config = self.config
        admin_token = None
        if self.primary and config.admin.listen:  # refuse to serve the admin API unprotected
            admin_token = read_secret(
                config.admin.token_file, config.admin.token_env, "admin token", "admin.token"
            )
        store = await open_store(config, self._clock)
        self._closers.append(store.close)
        self._closers.append(self._cancel_tasks)
        issuer = make_issuer(config, store)
        self._closers.append(issuer.close)
        await issuer.start()
        account = await store.get_account(config.acme.directory)
        checker = HostChecker(CheckSettings.from_config(config), self._clock)
        lifecycle = Lifecycle(store, Schedule.from_config(config), self._clock)
        gate = IssuanceGate(
            store, checker, lifecycle, config.tls.pending_recheck_seconds, clock=self._clock
        )
        self.manager = CertificateManager(
            store,
            issuer,
            gate,
            ManagerSettings(
                refusal_seconds=config.tls.refusal_cache_seconds,
                failure_backoff_seconds=config.tls.failure_backoff_seconds,
                lease_seconds=config.acme.order_timeout + 60,
                cache_size=config.tls.cache_size,
                revalidate_seconds=config.tls.revalidate_seconds,
            ),
            clock=self._clock,
            limits=OrderLimits(store, limit_settings(config), clock=self._clock),
            lifecycle=lifecycle,
        )
        self._closers.append(self.manager.close)
        self.maintainer = Maintainer(
            store,
            self.manager,
            issuer,
            checker.cname_checker,
            config.edge.cname_target,
            MaintenanceSettings(
                interval_seconds=config.renewal.interval_seconds,
                batch_size=config.renewal.batch_size,
                concurrency=config.renewal.concurrency,
                skip_recheck_seconds=config.renewal.skip_recheck_seconds,
                lease_seconds=config.acme.order_timeout + 60,
            ),
            clock=self._clock,
        )
        self.state_sync = StateSync(store, self.manager.forget, config.lifecycle.sync_seconds)
        await self.state_sync.start()
        self.host_views = HostViews(store)
        self.state_sync.follow(CHANGE_EVENTS, self.host_views.forget)
        self.verifier = Verifier(
            store,
            checker,
            lifecycle,
            VerifierSettings(
                poll_seconds=config.verify.poll_seconds,
                concurrency=config.verify.concurrency,
                lease_seconds=config.acme.order_timeout + config.checks.https_timeout + 60,
            ),
            issue_now=self._issue_now,
            account_uri=account.uri if account else None,
            clock=self._clock,
        )
        backend = config.backend
        self.backends = BackendPool(
            backend.backend_urls(),
            HealthSettings(
                path=backend.health_path,
                interval=backend.health_interval,
                timeout=backend.health_timeout,
                healthy_after=backend.healthy_after,
                unhealthy_after=backend.unhealthy_after,
            ),
        )
        await self.backends.start()
        self._closers.append(self.backends.close)
        forwarded_trusted = TrustedNetworks(
            config.listen.forwarded_trusted, "listen.forwarded_trusted"
        )
        forwarder = Forwarder(
            self.backends,
            connect_timeout=backend.connect_timeout,
            timeout=backend.timeout,
            pool_size=backend.pool_size,
            forwarded_trusted=forwarded_trusted,
            body_timeout=backend.body_timeout,
            deadline=backend.deadline,
            max_per_source=backend.max_per_source,
        )
        self.forwarder = forwarder
        await forwarder.start()
        self._closers.append(forwarder.close)

        def arrived_over_https(request: web.Request) -> bool:
            # A trusted TLS-terminating proxy in front may say the client used HTTPS
            # (else an upgraded host would redirect forever); nobody else may.
            if request.secure:
                return True
            proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
            return proto == "https" and client_address(request) in forwarded_trusted

        policy = HostPolicy(
            self.host_views,
            https_public_port=config.edge.https_public_port,
            clock=self._clock,
            is_https=arrived_over_https,
        )
        runner = web.AppRunner(
            make_http_app(store, forwarder, self.state_sync.is_suspended, policy), access_log=None
        )
        await runner.setup()
        self._closers.append(runner.cleanup)
        assert runner.server is not None
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
            reserve=backend.pool_size + len(backend.backend_urls()) + 128,
            accept_loops=2 if config.listen.http_proxy_protocol else 1,
            max_connections=config.listen.max_connections,
        )
        self.connections = ConnectionLimits(
            ConnectionSettings(
                idle_timeout=config.listen.idle_timeout,
                header_timeout=config.listen.header_timeout,
                max_total=budget.max_connections,
                max_per_source=config.listen.max_connections_per_source,
            ),
            exempt=forwarded_trusted,
        )
        protocol_factory = self.connections.protocol_factory(runner.server, access_log=None)
        trimmer = MemoryTrimmer(self.connections.stats)
        trimmer.start()
        self._closers.append(trimmer.close)
        http_sock = listening_socket(config.listen.http, "listen.http", reuse_port=True)
        self.http_address = http_sock.getsockname()[:2]
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
            http_server = await asyncio.get_running_loop().create_server(
                protocol_factory, sock=http_sock, backlog=1024
            )
            self._closers.append(http_server.close)

        https_sock = listening_socket(config.listen.https, "listen.https", reuse_port=True)
        self.https_address = https_sock.getsockname()[:2]
        self.tls_listener = TLSListener(
            https_sock,
            self._select_context,
            protocol_factory,
            ListenerSettings(
                max_pending=budget.max_pending,
                hello_timeout=config.tls.hello_timeout,
                selection_timeout=config.tls.issuance_wait,
                handshake_timeout=config.tls.handshake_timeout,
                max_pending_per_source=config.tls.max_pending_per_source,
                proxy_protocol=proxy_protocol if config.listen.https_proxy_protocol else None,
            ),
        )
        self.tls_listener.start()
        self._closers.append(self.tls_listener.close)
        if config.renewal.interval_seconds > 0:  # 0: no background loop (tests drive run_once)
            self.maintainer.start()
            self._closers.append(self.maintainer.close)

        self._spawn(self.state_sync.run_forever())
        if config.verify.poll_seconds > 0:
            self._spawn(self.verifier.run_forever())
        if self.primary:
            if admin_token is not None:
                await self._start_admin(store, lifecycle, admin_token)
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

    async def _start_admin(self, store: SQLiteStore, lifecycle: Lifecycle, token: str) -> None:
        assert self.verifier is not None
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
        )
        runner = web.AppRunner(make_admin_app(deps), access_log=None)
        await runner.setup()
        self._closers.append(runner.cleanup)
        sock = listening_socket(self.config.admin.listen, "admin.listen", reuse_port=False)
        await web.SockSite(runner, sock).start()
        self.admin_address = sock.getsockname()[:2]
        log.info("admin API and status page on http://%s/status", _fmt(self.admin_address))
        if not ipaddress.ip_address(self.admin_address[0]).is_loopback:
            log.warning(
                "admin listener %s is not on loopback: it speaks plain HTTP, put TLS in front",
                _fmt(self.admin_address),
            )

    async def _start_webhooks(self, store: SQLiteStore) -> None:
        hooks = self.config.webhooks
        secret = read_secret(
            hooks.secret_file, hooks.secret_env, "webhook secret", "webhooks.secret"
        )
        self.webhooks = WebhookSender(
            store,
            WebhookSettings(
                url=hooks.url,
                secret=secret,
                max_attempts=max(1, hooks.max_attempts),
                backoff_seconds=hooks.backoff_seconds,
                timeout=hooks.timeout,
                poll_seconds=self.config.lifecycle.sync_seconds,
            ),
        )
        await self.webhooks.start()
        self._closers.append(self.webhooks.close)
        self._spawn(self.webhooks.run_forever())

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

    async def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # keep closing the rest
                log.exception("error while shutting down")

    async def _select_context(self, hello: ClientHello) -> ssl.SSLContext:
        assert self.manager is not None
        name = hello.server_name
        if name is not None and ACME_TLS_ALPN not in hello.alpn:
            # Cache keys are normalised names, so a hit proves the SNI was one too.
            cached = self.manager.cached_context(name)
            if cached is not None:
                return cached
        if name is None:
            # Policy for clients without SNI (old tools, `openssl s_time`): serve the
            # configured host's certificate if there is one, otherwise refuse.
            if not self.config.edge.no_sni_host:
                raise Refused("no SNI in ClientHello", HANDSHAKE_FAILURE)
            name = self.config.edge.no_sni_host
        try:
            hostname = normalize_hostname(name)
        except InvalidHostname as exc:
            raise Refused(str(exc)) from None
        if ACME_TLS_ALPN in hello.alpn:
            # RFC 8737: the CA's TLS-ALPN-01 validation, never a recipient's click
            return await self.manager.challenge_context_for(hostname)
        return await self.manager.context_for(hostname)


def _fmt(address: tuple[str, int] | None) -> str:
    if address is None:
        return "-"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run_worker(
    config: Config, ready: Callable[[], None] | None = None, *, primary: bool = True
) -> None:
    """Run one worker until SIGTERM/SIGINT."""
    worker = EdgeWorker(config, primary=primary)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await worker.start()
        if ready is not None:
            ready()
        await stop.wait()
    finally:
        await worker.close()
