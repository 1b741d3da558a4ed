"""Prometheus metrics: what operators alert on, aggregated over the worker processes.

Design (see README, "Operating"):

* **Aggregation.** `--workers N` runs N processes, but Prometheus scrapes one
  address: the admin listener (and `metrics.listen`), served by worker slot 0. So
  the workers use prometheus-client's multiprocess mode: the supervisor points
  `PROMETHEUS_MULTIPROC_DIR` at a private directory before it spawns them (spawned
  processes import prometheus-client afresh and pick it up), every worker writes
  its values to its own memory-mapped files there, and slot 0 merges them at
  scrape time. Counters of a worker that died stay in the sum (they only ever go
  up); its live gauges are dropped when the supervisor notices the exit. With one
  worker (in-process) the ordinary in-memory registry is used.
  Per-worker scrape targets were the alternative; they would need N ports, N
  Prometheus targets and `sum()` in every query, for no gain.

* **Nothing on the click path that is not already there.** Most figures already
  exist as plain in-memory counters (`ListenerStats`, backend health, the context
  cache, webhook deliveries). A small task per worker copies them into the
  Prometheus series every `SYNC_SECONDS` (and slot 0 once more right before a
  scrape), so the accept and handshake paths gain no instructions. What has no
  counter yet is counted at its source: refusals by reason and certificate waits
  (a wrapper around the context selector that is skipped on a cache hit), ACME
  orders (a subclass of the issuer), backend requests (a subclass of the
  forwarder), checks and dropped webhooks (one line each).

* **Store-derived gauges** (hosts by state, certificates by state, the soonest
  expiry, renewals due/overdue/failing, the order budget) are computed in slot 0 at
  scrape time with aggregate queries that return one row each, cached for
  `metrics.store_cache_seconds`.

Label sets are bounded: no host names, no free-text reasons; backends are the
configured URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import shutil
import ssl
import tempfile
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from acme_client import (
    AcmeError,
    AcmeIssuer,
    AcmeSettings,
    AcmeUnavailable,
    AuthorizationFailed,
    IssuanceTimeout,
    IssuedCertificate,
    OrderLimitReached,
    RateLimited,
)
from acme_client.breaker import CaBreaker
from acme_client.solvers import ACME_TLS_ALPN, ChallengeSink
from certstore import CertStore, DomainState
from certstore.errors import StoreUnavailable
from proxy.http.forward import Forwarder, LeanResponder
from proxy.tls.refusals import Refused
from proxy.wire.clienthello import HANDSHAKE_FAILURE, ClientHello

if TYPE_CHECKING:
    from proxy.app.config import Config
    from proxy.app.wiring import EdgeWorker

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
disable_created_metrics()  # no *_created series: half the scrape, and nothing alerts on them
SYNC_SECONDS = 2.0  # how stale another worker's copied counters may be at a scrape

# -- the series --------------------------------------------------------------------

HANDSHAKES = Counter(
    "linkedge_tls_handshakes",
    "TLS connections by what became of them: served (handed to TLS), refused (reason: "
    "why no certificate), failed (the handshake or the ClientHello went wrong), "
    "timed_out (waiting for the ClientHello or for a certificate)",
    ["outcome", "reason"],
)
CERTIFICATE_WAIT = Histogram(
    "linkedge_tls_certificate_wait_seconds",
    "Handshakes whose certificate was not in memory: time until one was chosen (a store "
    "load takes milliseconds; a first click waits for its certificate from the CA)",
    buckets=(0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LISTENER_ACCEPTED = Counter(
    "linkedge_listener_accepted_connections",
    "TCP connections accepted by the edge's own accept loops",
    ["listener"],
)
LISTENER_CLOSED = Counter(
    "linkedge_listener_rejected_connections",
    "Connections closed before TLS or HTTP: over a cap or a bad PROXY header",
    ["listener", "reason"],
)
LISTENER_PENDING = Gauge(
    "linkedge_listener_pending_connections",
    "Connections between accept and hand-off (PROXY header, ClientHello, certificate)",
    ["listener"],
    multiprocess_mode="livesum",
)
AWAITING_HELLO = Gauge(
    "linkedge_listener_awaiting_hello_connections",
    "HTTPS connections waiting for their ClientHello",
    multiprocess_mode="livesum",
)
CONNECTIONS_OPEN = Gauge(
    "linkedge_http_connections_open",
    "HTTP and HTTPS connections open in the HTTP server (after the hand-off)",
    multiprocess_mode="livesum",
)
CONTEXTS_CACHED = Gauge(
    "linkedge_tls_contexts_cached",
    "TLS contexts in the workers' memory caches (summed over workers)",
    multiprocess_mode="livesum",
)
ACME_ORDERS = Counter(
    "linkedge_acme_orders",
    "ACME orders by CA (primary, fallback) and outcome (issued, invalid: validation "
    "failed, rate_limited: the CA said so, deferred: our own limiter, timeout, "
    "unavailable, error)",
    ["ca", "outcome"],
)
ACME_ORDER_DURATION = Histogram(
    "linkedge_acme_order_duration_seconds",
    "Time an ACME order took, new order to certificate (or failure)",
    ["ca"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CA_BREAKER = Gauge(
    "linkedge_acme_ca_breaker_state",
    "1 for the current state of each CA's circuit breaker (closed, open, half_open)",
    ["ca", "state"],
    multiprocess_mode="livemax",
)
BACKEND_REQUESTS = Counter(
    "linkedge_backend_requests",
    "Clicks forwarded, by the class of the status returned to the client (the edge's own "
    "502/504 when no backend answered count as 5xx)",
    ["status_class"],
)
BACKEND_DURATION = Histogram(
    "linkedge_backend_request_duration_seconds",
    "Forwarding time of a click, until the backend's response was relayed",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BACKEND_UP = Gauge(
    "linkedge_backend_up",
    "1 while a backend passes its health checks (in any worker)",
    ["backend"],
    multiprocess_mode="livemax",
)
CHECKS = Counter(
    "linkedge_checks",
    "Customer-facing checks run, by check (cname, caa, https) and state",
    ["check", "state"],
)
WEBHOOKS = Counter(
    "linkedge_webhook_deliveries",
    "Status-change webhooks: delivered, or dropped after the last attempt",
    ["outcome"],
)

_STATUS_CLASSES = {c: BACKEND_REQUESTS.labels(f"{c}xx") for c in range(1, 6)}


class _ClickTally:
    """Per-click figures kept as plain numbers in this process, flushed by the sync task.

    A multiprocess-mode Counter.inc or Histogram.observe writes memory-mapped files
    under a lock (~1.5 µs each, ~4.5 µs per click for the three); a list slot and a
    float cost ~0.3 µs. The flush adds the tallies to the real series (the histogram's
    per-bucket values and sum, as `observe` would have), so a scrape sees them within
    SYNC_SECONDS (slot 0 flushes right before its scrape).
    """

    __slots__ = ("_bounds", "buckets", "status", "total")

    def __init__(self, histogram: Histogram) -> None:
        self._bounds: list[float] = list(histogram._upper_bounds)
        self.buckets = [0] * len(self._bounds)
        self.total = 0.0
        self.status = [0] * 6  # by status // 100

    def record(self, status: int, seconds: float) -> None:
        self.buckets[bisect_left(self._bounds, seconds)] += 1
        self.total += seconds
        klass = status // 100
        if 0 < klass < 6:
            self.status[klass] += 1

    def flush(self) -> None:
        buckets, self.buckets = self.buckets, [0] * len(self._bounds)
        status, self.status = self.status, [0] * 6
        total, self.total = self.total, 0.0
        for i, count in enumerate(buckets):
            if count:
                BACKEND_DURATION._buckets[i].inc(count)
        if total:
            BACKEND_DURATION._sum.inc(total)
        for klass, count in enumerate(status):
            if count:
                _STATUS_CLASSES[klass].inc(count)


_CLICKS = _ClickTally(BACKEND_DURATION)
_SERVED = HANDSHAKES.labels("served", "")
_FAILED_HANDSHAKE = HANDSHAKES.labels("failed", "handshake")

_REFUSAL_PREFIXES = (  # Refused.reason -> a bounded label
    ("not registered", "not_registered"),
    ("suspended", "suspended"),
    ("moved", "moved"),
    ("pending", "not_verified"),
    ("verified", "not_verified"),
    ("failed:", "failed"),
    ("issuance deferred", "rate_limited"),
    ("issuance failed", "issuance_failing"),
    ("backing off", "issuance_failing"),
    ("no tls-alpn-01", "no_challenge"),
)


def refusal_reason(exc: Refused) -> str:
    if exc.alert == HANDSHAKE_FAILURE:
        return "no_sni"
    text = exc.reason.lower()
    for prefix, label in _REFUSAL_PREFIXES:
        if text.startswith(prefix):
            return label
    if "failed authorizations" in text:
        return "issuance_failing"
    return "other"


def set_ca_breaker_state(ca: str, state: str) -> None:
    """For the CA circuit breaker: call on every transition (ca: primary|fallback)."""
    for known in ("closed", "open", "half_open"):
        CA_BREAKER.labels(ca, known).set(1 if known == state else 0)


# -- instrumented parts ------------------------------------------------------------

Selector = Callable[[ClientHello], Awaitable[ssl.SSLContext]]


def instrument_selector(
    select: Selector, cached_context: Callable[[str], ssl.SSLContext | None]
) -> Selector:
    """Count refusals by reason and time certificate waits; a cache hit costs one lookup.

    The edge's own selector always runs (it also records the connection's TLS host for
    the 421 rule); the lookup here only decides whether this handshake waited."""

    async def selector(hello: ClientHello) -> ssl.SSLContext:
        name = hello.server_name
        if name is not None and ACME_TLS_ALPN not in hello.alpn and cached_context(name):
            return await select(hello)  # served from memory: nothing to time
        started = time.monotonic()
        try:
            ctx = await select(hello)
        except Refused as exc:
            HANDSHAKES.labels("refused", refusal_reason(exc)).inc()
            raise
        CERTIFICATE_WAIT.observe(time.monotonic() - started)
        return ctx

    return selector


def _order_outcome(exc: AcmeError) -> str:
    if isinstance(exc, OrderLimitReached):
        return "deferred"
    if isinstance(exc, RateLimited):
        return "rate_limited"
    if isinstance(exc, AuthorizationFailed):
        return "invalid"
    if isinstance(exc, IssuanceTimeout):
        return "timeout"
    if isinstance(exc, AcmeUnavailable):
        return "unavailable"
    return "error"


class MeteredAcmeIssuer(AcmeIssuer):
    """An AcmeIssuer that counts its orders by outcome and times them."""

    def __init__(
        self,
        settings: AcmeSettings,
        store: CertStore,
        breaker: CaBreaker | None = None,
        *,
        ca_label: str,
    ) -> None:
        super().__init__(settings, store, breaker)
        self.ca_label = ca_label
        self._duration = ACME_ORDER_DURATION.labels(ca_label)

    async def issue(self, hostname: str, sink: ChallengeSink, **options: Any) -> IssuedCertificate:
        started = time.monotonic()
        try:
            issued = await super().issue(hostname, sink, **options)
        except AcmeError as exc:
            outcome = _order_outcome(exc)
            ACME_ORDERS.labels(self.ca_label, outcome).inc()
            if outcome != "deferred":  # no order was placed
                self._duration.observe(time.monotonic() - started)
            raise
        ACME_ORDERS.labels(self.ca_label, "issued").inc()
        self._duration.observe(time.monotonic() - started)
        return issued


class MeteredForwarder(Forwarder):
    """A Forwarder that counts clicks by status class and times them."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        response = await super().handle(request)
        _CLICKS.record(response.status, time.monotonic() - started)
        return response

    async def handle_lean(self, request: web.Request, respond: LeanResponder) -> bool:
        started = time.monotonic()
        taken = await super().handle_lean(request, respond)
        if taken and respond.status:
            _CLICKS.record(respond.status, time.monotonic() - started)
        return taken


# -- copying in-memory counters --------------------------------------------------


class _Deltas:
    """Turns cumulative in-memory counts into Counter increments (never negative)."""

    def __init__(self) -> None:
        self._seen: dict[int, float] = {}

    def add(self, counter: Any, total: float) -> None:
        key = id(counter)
        last = self._seen.get(key, 0.0)
        if total > last:
            counter.inc(total - last)
            self._seen[key] = total


class WorkerMetrics:
    """The Prometheus adapter of the small metrics interface (proxy/counters.py): copies
    one worker's counters, read through its Meter, into the Prometheus series."""

    def __init__(self, worker: EdgeWorker) -> None:
        self._worker = worker
        self._deltas = _Deltas()

    def sync(self) -> None:
        w = self._worker
        m = w.meter
        d = self._deltas
        _CLICKS.flush()
        s = m.read("https_listener")
        if s:
            d.add(LISTENER_ACCEPTED.labels("https"), s["accepted"])
            d.add(_SERVED, s["handshakes_started"] - s["handshake_failures"])
            d.add(_FAILED_HANDSHAKE, s["handshake_failures"])
            d.add(HANDSHAKES.labels("failed", "bad_hello"), s["bad_hello"])
            d.add(HANDSHAKES.labels("failed", "hello_abandoned"), s["hello_abandoned"])
            d.add(HANDSHAKES.labels("timed_out", "hello"), s["hello_timeouts"])
            d.add(HANDSHAKES.labels("timed_out", "certificate"), s["selection_timeouts"])
            d.add(LISTENER_CLOSED.labels("https", "per_source_limit"), s["per_source_limited"])
            self._listener_common("https", s)
            AWAITING_HELLO.set(s["awaiting_hello"])
        s = m.read("http_listener")
        if s:
            d.add(LISTENER_ACCEPTED.labels("http"), s["accepted"])
            self._listener_common("http", s)
        for key, count in m.read("checks").items():
            if key.startswith("results."):
                _, name, state = key.split(".", 2)
                d.add(CHECKS.labels(name, state), count)
        webhooks = m.read("webhooks")
        if webhooks:
            d.add(WEBHOOKS.labels("delivered"), webhooks["delivered"])
            d.add(WEBHOOKS.labels("dropped"), webhooks["dropped"])
        if w.http_server is not None:
            CONNECTIONS_OPEN.set(len(w.http_server.connections))
        if w.manager is not None:
            CONTEXTS_CACHED.set(w.manager.cached_contexts)
        if w.backends is not None:
            for backend in w.backends.backends:
                BACKEND_UP.labels(backend.base).set(1 if backend.healthy else 0)

    def _listener_common(self, name: str, s: dict[str, float]) -> None:
        d = self._deltas
        LISTENER_PENDING.labels(name).set(s["pending"])
        d.add(LISTENER_CLOSED.labels(name, "overloaded"), s.get("errors.overloaded", 0))
        d.add(LISTENER_CLOSED.labels(name, "proxy_untrusted"), s["proxy_untrusted"])
        d.add(LISTENER_CLOSED.labels(name, "proxy_missing"), s["proxy_missing"])
        d.add(LISTENER_CLOSED.labels(name, "proxy_malformed"), s["proxy_malformed"])
        d.add(LISTENER_CLOSED.labels(name, "proxy_timeout"), s["proxy_timeouts"])

    async def run_forever(self) -> None:
        while True:
            try:
                self.sync()
            except Exception:  # metrics must never take a worker down
                log.exception("copying metrics failed")
            await asyncio.sleep(SYNC_SECONDS)


def start_worker_metrics(worker: EdgeWorker) -> WorkerMetrics:
    """Initial values for the series that exist before anything happened."""
    config = worker.config
    set_ca_breaker_state("primary", "closed")  # until the breaker says otherwise
    if config.fallback.directory:
        set_ca_breaker_state("fallback", "closed")
    cas = ("primary", "fallback") if config.fallback.directory else ("primary",)
    for ca in cas:
        for outcome in ("issued", "invalid", "rate_limited", "deferred", "timeout"):
            ACME_ORDERS.labels(ca, outcome)
        ACME_ORDER_DURATION.labels(ca)
    for reason in ("not_registered", "no_sni", "issuance_failing", "suspended"):
        HANDSHAKES.labels("refused", reason)
    for name in ("cname", "caa", "https"):
        for state in ("pass", "fail"):
            CHECKS.labels(name, state)
    WEBHOOKS.labels("dropped")
    metrics = WorkerMetrics(worker)
    metrics.sync()
    return metrics


# -- store-derived gauges (slot 0, at scrape time) -----------------------------------

EXPIRING_SECONDS = 7 * 86400.0
OVERDUE_SECONDS = 86400.0


class StoreCollector:
    """Gauges read from the store, cached for `cache_seconds` (aggregate queries only)."""

    def __init__(
        self,
        store: Any,
        limits: tuple[int, float],
        cache_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._orders_per_window, self._window = limits
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._families: list[Metric] = []
        self._at = float("-inf")

    async def refresh(self) -> None:
        now = self._clock()
        if now - self._at < self._cache_seconds:
            return
        store = self._store
        by_state = await store.count_domains_by_state()
        certs = await store.certificate_summary(now, EXPIRING_SECONDS)
        renewals = await store.renewal_summary(now, OVERDUE_SECONDS)
        used, _oldest = await store.rate_usage("orders", self._window)
        families: list[Metric] = []
        hosts = GaugeMetricFamily(
            "linkedge_hosts", "Registered tracking hosts by lifecycle state", labels=["state"]
        )
        for state in DomainState:
            hosts.add_metric([state.value], by_state.get(state, 0))
        families.append(hosts)
        cert_states = GaugeMetricFamily(
            "linkedge_certificates",
            "Stored certificates: valid, expiring (within 7 days) or expired",
            labels=["state"],
        )
        cert_states.add_metric(["valid"], certs["valid"])
        cert_states.add_metric(["expiring"], certs["expiring"])
        cert_states.add_metric(["expired"], certs["expired"])
        families.append(cert_states)
        if certs["soonest_expiry"] is not None:
            families.append(
                GaugeMetricFamily(
                    "linkedge_certificate_soonest_expiry_timestamp_seconds",
                    "Expiry (Unix time) of the stored certificate that expires first",
                    value=certs["soonest_expiry"],
                )
            )
        renewal = GaugeMetricFamily(
            "linkedge_renewals",
            "Certificates whose renewal is due, overdue (due for more than a day) or whose "
            "last renewal attempt failed",
            labels=["state"],
        )
        for key in ("due", "overdue", "failing"):
            renewal.add_metric([key], renewals[key])
        families.append(renewal)
        families.append(
            GaugeMetricFamily(
                "linkedge_acme_order_budget_remaining",
                "New orders our global limiter still allows in its window (limits.orders_*)",
                value=max(0, self._orders_per_window - used),
            )
        )
        families.append(
            GaugeMetricFamily(
                "linkedge_acme_order_budget_limit",
                "The global limiter's orders per window",
                value=self._orders_per_window,
            )
        )
        self._families = families
        self._at = now

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class _ProcessCollector:
    """This process's own series (single-process mode)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class Exporter:
    """Builds the /metrics answer in the worker that serves it."""

    def __init__(
        self,
        store: Any,
        config: Config,
        worker_metrics: WorkerMetrics | None,
        token: str | None,
    ) -> None:
        self._worker_metrics = worker_metrics
        self.token = token
        self.store_collector = StoreCollector(
            store,
            (config.limits.orders_per_window, config.limits.orders_window_seconds),
            config.metrics.store_cache_seconds,
        )
        self.registry = CollectorRegistry(auto_describe=False)
        path = os.environ.get(MULTIPROC_ENV)
        if path and multiprocess_mode():
            multiprocess.MultiProcessCollector(self.registry, path=path)
        else:
            self.registry.register(_ProcessCollector())
        self.registry.register(self.store_collector)

    async def render(self) -> bytes:
        if self._worker_metrics is not None:
            self._worker_metrics.sync()
        try:
            await self.store_collector.refresh()
        except StoreUnavailable as exc:  # logged once by the store: the last values stand
            log.debug("reading store metrics: %s", exc)
        except Exception:  # a store hiccup: serve the process series with the last values
            log.exception("reading store metrics failed")
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        if self.token is not None and not _bearer_ok(request, self.token):
            return web.Response(
                status=401,
                text="missing or wrong bearer token\n",
                headers={"WWW-Authenticate": 'Bearer realm="linkedge-metrics"'},
            )
        body = await self.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _bearer_ok(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode(), token.encode()
    )


# -- multiprocess mode (the supervisor) ----------------------------------------------


def multiprocess_mode() -> bool:
    """Did this process import prometheus-client with a multiprocess directory?"""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


def prepare_multiprocess(config: Config) -> str | None:
    """Before spawning workers: a fresh directory for their values, named in the env."""
    if not config.metrics.enabled:
        return None
    path = config.metrics.multiproc_dir
    if path:
        os.makedirs(path, mode=0o700, exist_ok=True)
        for name in os.listdir(path):  # values of an earlier run are not this run's
            if name.endswith(".db"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(path, name))
    else:
        path = tempfile.mkdtemp(prefix="linkedge-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


def worker_exited(pid: int | None) -> None:
    """A worker is gone: its live gauges leave the sum (its counters stay)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and pid is not None:
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, path)


def finish_multiprocess(path: str | None, config: Config) -> None:
    if path and not config.metrics.multiproc_dir:
        shutil.rmtree(path, ignore_errors=True)
