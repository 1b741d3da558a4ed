"""A fleet of edge nodes on one store: what the fleet tests and bench_fleet.py start.

A node is one `linkedge serve --workers N` process tree (supervisor + workers) on its own
loopback address, in its own process group (so `kill -9` takes the whole node, as a
crashed machine would). Every node has the same store URL and key, the same Pebble, DNS
server and backend; the HTTPS port number is shared (one random port on 127.0.0.2, .3,
.4), the HTTP port is Pebble's HTTP-01 port, as in production where every node listens
on 443 and 80.

Customers CNAME their host to the fleet's one target name (`Fleet.target`); which node
Pebble's validation reaches is whatever that name's A record says (`Fleet.validate_via`),
while a test's click connects to the node it chooses with the host as SNI (no DNS on the
client side). So a test decides that the CA validates through another node than the one
that placed the order.

Nothing here depends on pytest: tests/benchmarks/bench_fleet.py uses it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from certstore import Store, generate_key_text, open_store
from certstore.crypto import parse_key_text
from proxy.demo.backend import HEALTH_PATH, start_backend
from proxy.demo.client import edge_session, verifying_context
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from support.net import FLEET_IPS, free_port, free_port_everywhere

ADMIN_TOKEN = "fleet-admin-token-0123456789abcdef"
_READY = "edge worker ready"
_WORKER_READY = re.compile(r"\[(\d+)\] proxy\.app\.wiring: edge worker ready")
_SERVED_TOKEN = re.compile(r"served ACME challenge token (\S+) \(worker (\d+)\)")
_FINALIZE = "POST /finalize-order/"
_ISSUED_SERIES = re.compile(
    r'^linkedge_acme_orders_total\{[^}]*outcome="issued"[^}]*\} (\S+)$', re.M
)

ROOT = Path(__file__).resolve().parents[2]


class Node:
    """One edge node: `linkedge serve` with its workers, in a process group of its own."""

    def __init__(self, name: str, ip: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.ip = ip
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.workers = int(env["LINKEDGE_WORKERS"])
        self._offset = 0  # where this run's lines start in the log (a node can restart)
        self._terminated = False

    def __repr__(self) -> str:
        return f"Node({self.name} {self.ip})"

    @property
    def https_port(self) -> int:
        return int(self.env["LINKEDGE_LISTEN_HTTPS"].rsplit(":", 1)[1])

    @property
    def admin_url(self) -> str:
        return f"http://{self.env['LINKEDGE_ADMIN_LISTEN']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.env['LINKEDGE_METRICS_LISTEN']}/metrics"

    @property
    def local_copy(self) -> Path:
        """The node's read-through copy of a remote store (store.local_copy)."""
        return Path(self.env["LINKEDGE_STORE_LOCAL_COPY"])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- process control ----------------------------------------------------------

    def launch(self) -> None:
        """Start the process; `wait_ready` waits for its workers."""
        assert not self.running, f"{self} is already running"
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._terminated = False
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", "proxy.app.cli", "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                cwd=ROOT,
                start_new_session=True,  # its own process group: kill() takes the workers too
            )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(_READY) < self.workers:
            assert self.proc is not None and self.proc.poll() is None, self.log()[-4000:]
            assert time.monotonic() < deadline, f"{self} not ready:\n{self.log()[-4000:]}"
            time.sleep(0.05)

    def start(self, timeout: float = 60) -> None:
        self.launch()
        self.wait_ready(timeout)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM (a graceful stop); the exit code, or None if it was not running."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            self.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group(proc.pid)
        return proc.returncode

    def terminate(self) -> None:
        """Send SIGTERM once (a second one while it drains is not what a test means)."""
        if self.proc is not None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """`kill -9` of the whole node (supervisor and workers at once), reaped."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._reap_group(proc.pid)

    def _reap_group(self, pgid: int, timeout: float = 10) -> None:
        """Wait until no process of the node's group runs (workers are the supervisor's
        children, reaped by init once it is gone), so the node's writes are over."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not [p for p in self.worker_pids() if _alive(p)]:
                return
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)

    # -- what it said -------------------------------------------------------------

    def log(self) -> str:
        """This run's log (since the last start)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def full_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> set[int]:
        """This run's worker processes (the ones that said they were ready)."""
        return {int(p) for p in _WORKER_READY.findall(self.log())}

    def served_tokens(self) -> set[str]:
        """HTTP-01 tokens this node answered (over all its runs; Pebble asks for each
        token from several perspectives, so a token can be answered more than once)."""
        return {token for token, _pid in _SERVED_TOKEN.findall(self.full_log())}

    async def orders_issued(self) -> int:
        """Orders this node's workers completed, from its Prometheus counters."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.metrics_url, timeout=aiohttp.ClientTimeout(total=10)) as resp,
        ):
            assert resp.status == 200, resp.status
            text = await resp.text()
        return round(sum(float(v) for v in _ISSUED_SERIES.findall(text)))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


@dataclass(frozen=True)
class Orders:
    """Orders counted three ways: at the CA (Pebble's log), in the store's event log,
    and by the nodes themselves (their `linkedge_acme_orders_total{outcome="issued"}`)."""

    pebble_orders: int  # orders Pebble created
    pebble_certificates: int  # orders Pebble finalized (certificates it issued)
    store_started: int  # `order_started` events
    store_issued: int  # `issued` events
    nodes_issued: int  # sum over the nodes' counters (running nodes only)


@dataclass(frozen=True)
class Mark:
    """Where the counters stood (orders are counted as differences from a mark)."""

    pebble_orders: int
    pebble_certificates: int
    nodes_issued: dict[tuple[str, int], int]  # by (node, supervisor pid): a restart is 0


@dataclass(frozen=True)
class Click:
    """One HTTPS GET on a new connection: its status, or why it failed."""

    status: int | None
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 500


@dataclass
class Fleet:
    """Three (or more) nodes sharing one store; see the module docstring."""

    workdir: Path
    pebble: PebbleServer
    dns: DNSServer
    backend_url: str
    store_url: str
    ips: Sequence[str] = FLEET_IPS
    workers: int = 2
    settings: dict[str, str] = field(default_factory=dict)  # more LINKEDGE_* variables
    target: str = ""
    key_text: str = field(default_factory=generate_key_text)
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.target = self.target or f"edge-{os.getpid()}-{id(self) % 10_000}.fleet.test"
        shared = {self.pebble.http_port}  # every node listens on it, at its own address
        https_port = free_port_everywhere(self.ips, avoid=shared)
        # a node's own ports must not be one the nodes share: those are still free at a
        # fleet address until the nodes start (a fresh-clone CI run once had a node that
        # could not listen on Pebble's HTTP-01 port at 127.0.0.4; a port drawn this way
        # could have taken it)
        taken = {https_port, *shared}

        def own_port(ip: str) -> int:
            port = free_port(ip, avoid=taken)
            taken.add(port)
            return port

        for ip in self.ips:
            name = f"node-{ip.rsplit('.', 1)[1]}"
            env = {
                "LINKEDGE_WORKERS": str(self.workers),
                "LINKEDGE_LISTEN_HTTPS": f"{ip}:{https_port}",
                "LINKEDGE_LISTEN_HTTP": f"{ip}:{self.pebble.http_port}",
                "LINKEDGE_BACKEND_URL": self.backend_url,
                "LINKEDGE_BACKEND_TIMEOUT": "10",
                "LINKEDGE_BACKEND_HEALTH_PATH": HEALTH_PATH,
                "LINKEDGE_EDGE_CNAME_TARGET": self.target,
                "LINKEDGE_ACME_DIRECTORY": self.pebble.directory_url,
                "LINKEDGE_ACME_CA_BUNDLE": str(self.pebble.ca_bundle),
                "LINKEDGE_ACME_ORDER_TIMEOUT": "60",
                "LINKEDGE_STORE_URL": self.store_url,
                "LINKEDGE_STORE_KEY": self.key_text,
                "LINKEDGE_DNS_NAMESERVERS": self.dns.nameserver,
                "LINKEDGE_DNS_TIMEOUT": "5",
                "LINKEDGE_TLS_ISSUANCE_WAIT": "60",
                "LINKEDGE_ADMIN_LISTEN": f"{ip}:{own_port(ip)}",
                "LINKEDGE_ADMIN_TOKEN": ADMIN_TOKEN,
                "LINKEDGE_METRICS_LISTEN": f"{ip}:{own_port(ip)}",
                "LINKEDGE_METRICS_MULTIPROC_DIR": str(self.workdir / f"{name}.metrics"),
                # each node its own read-through copy of a remote store, as on separate
                # machines (the default path is one file every process here would share)
                "LINKEDGE_STORE_LOCAL_COPY": str(self.workdir / f"{name}.local-copy.db"),
                # only clicks order (the background verifier would issue verified hosts
                # on its own): a test knows which node placed each order
                "LINKEDGE_VERIFY_POLL_SECONDS": "0",
                # the tests order hundreds of certificates into one store within minutes
                "LINKEDGE_LIMITS_ORDERS_PER_WINDOW": "100000",
                "LINKEDGE_CHECKS_HTTPS_PORT": str(https_port),
                "LINKEDGE_CHECKS_HTTPS_ADDRESSES": ",".join(self.ips),
                "LINKEDGE_CHECKS_CA_BUNDLE": str(self.pebble.root_path),
                **self.settings,
            }
            self.nodes.append(Node(name, ip, env, self.workdir / f"{name}.log"))
        self.dns.set_a(self.target, list(self.ips))

    # -- lifecycle ------------------------------------------------------------------

    @property
    def https_port(self) -> int:
        return self.nodes[0].https_port

    def start(self, timeout: float = 90) -> None:
        """Start every node at once (as a rollout would) and wait for all workers."""
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready(timeout)

    def stop(self) -> dict[str, int | None]:
        """Stop the nodes that run (gracefully, all at once); their exit codes by name."""
        for node in self.nodes:
            if node.running:
                node.terminate()
        return {node.name: node.stop() for node in self.nodes if node.proc is not None}

    def node(self, ip_or_name: str) -> Node:
        return next(n for n in self.nodes if ip_or_name in (n.ip, n.name))

    def node_of_pid(self, pid: int) -> Node | None:
        """Which node a worker pid belongs to (this run of each node)."""
        return next((n for n in self.nodes if pid in n.worker_pids()), None)

    def others(self, *nodes: Node) -> list[Node]:
        return [n for n in self.nodes if n not in nodes]

    def logs(self) -> str:
        return "\n".join(f"===== {n.name}\n{n.full_log()[-6000:]}" for n in self.nodes)

    # -- DNS and the store ----------------------------------------------------------

    def validate_via(self, *nodes: Node) -> None:
        """The fleet target's A records: where the CA's HTTP-01 requests land."""
        self.dns.set_a(self.target, [n.ip for n in nodes])

    @contextlib.asynccontextmanager
    async def store(self) -> AsyncIterator[Store]:
        """The fleet's store as another process sees it (an operator's CLI, a test)."""
        store = await open_store(self.store_url, parse_key_text(self.key_text, "fleet"))
        try:
            yield store
        finally:
            await store.close()

    async def register(self, store: Store, *hosts: str, account: str = "acct-fleet") -> None:
        """Register hosts and CNAME them to the fleet's target (pending until a click)."""
        for host in hosts:
            await store.add_domain(host, account)
            self.dns.set_cname(host, self.target)

    # -- counting orders --------------------------------------------------------------

    async def mark(self) -> Mark:
        return Mark(self.pebble.order_count(), _finalized(self.pebble), await self._issued())

    async def _issued(self) -> dict[tuple[str, int], int]:
        running = [n for n in self.nodes if n.running]
        counts = await asyncio.gather(*(n.orders_issued() for n in running))
        return {(n.name, n.proc.pid): c for n, c in zip(running, counts, strict=True) if n.proc}

    async def issued_by_node(self, since: Mark) -> dict[str, int]:
        """Orders each running node completed since `since` (its own counters)."""
        return {
            name: count - since.nodes_issued.get((name, pid), 0)
            for (name, pid), count in (await self._issued()).items()
        }

    async def orders(self, store: Store, hosts: Iterable[str], since: Mark) -> Orders:
        """Orders for `hosts` (the store's events) and since `since` (Pebble, nodes)."""
        started = issued = 0
        for host in hosts:
            kinds = [e.kind for e in await store.list_events(host, limit=1000)]
            started += kinds.count("order_started")
            issued += kinds.count("issued")
        return Orders(
            pebble_orders=self.pebble.order_count() - since.pebble_orders,
            pebble_certificates=_finalized(self.pebble) - since.pebble_certificates,
            store_started=started,
            store_issued=issued,
            nodes_issued=sum((await self.issued_by_node(since)).values()),
        )

    # -- clicks ---------------------------------------------------------------------

    async def click(
        self, node: Node, host: str, path: str = "/c/fleet", timeout: float = 90
    ) -> Click:
        """One recipient's click through `node` (strictly verified TLS, new connection)."""
        return await click(node.ip, node.https_port, host, self.pebble.root_path, path, timeout)

    async def click_until(
        self, node: Node, host: str, within: float, *, pause: float = 0.1
    ) -> tuple[Click, float]:
        """Click through `node` until one succeeds or `within` seconds pass: the last
        click and the seconds it took from the first attempt."""
        started = time.monotonic()
        while True:
            left = within - (time.monotonic() - started)
            result = await self.click(node, host, timeout=max(left, 0.5))
            elapsed = time.monotonic() - started
            if result.ok or elapsed >= within:
                return result, elapsed
            await asyncio.sleep(pause)

    async def handshake(self, node: Node, host: str, timeout: float = 10) -> str | None:
        """A bare TLS handshake through `node`: None when served, else the error (e.g.
        `unrecognized_name` for a suspended host)."""
        return await handshake(node.ip, node.https_port, host, self.pebble.root_path, timeout)

    async def until(
        self,
        node: Node,
        host: str,
        *,
        refused: bool,
        within: float,
        since: float | None = None,
        streak: int = 6,
        pause: float = 0.005,
    ) -> float | None:
        """Seconds from `since` (a `time.monotonic()`; default now) until `node` refuses
        (or serves) `host`'s handshakes `streak` times in a row, timed at the end of the
        streak's first handshake (when the change was surely there); None if not within
        `within` seconds.

        A node is reached only when all its workers are, and the kernel picks a worker
        per connection (SO_REUSEPORT): with 2 workers, 6 in a row miss one with ~3 %.
        """
        started = time.monotonic() if since is None else since
        first: float | None = None
        count = 0
        while time.monotonic() - started < within:
            error = await self.handshake(node, host, timeout=5)
            if (error is not None) == refused:
                first = time.monotonic() - started if first is None else first
                count += 1
                if count >= streak:
                    return first
            else:
                first, count = None, 0
            await asyncio.sleep(pause)
        return None

    @contextlib.asynccontextmanager
    async def admin(self, node: Node) -> AsyncIterator[aiohttp.ClientSession]:
        """An admin-API session on `node` (its worker slot 0)."""
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession(base_url=node.admin_url, headers=headers) as session:
            yield session


async def click(
    ip: str, port: int, host: str, root: Path, path: str = "/c/fleet", timeout: float = 90
) -> Click:
    started = time.monotonic()
    try:
        async with (
            edge_session(ip, str(root), timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(f"https://{host}:{port}{path}", allow_redirects=False) as resp,
        ):
            await resp.read()
            return Click(resp.status, seconds=time.monotonic() - started)
    except (aiohttp.ClientError, OSError, TimeoutError, ssl.SSLError) as exc:
        return Click(None, f"{type(exc).__name__}: {exc}", time.monotonic() - started)


async def handshake(ip: str, port: int, host: str, root: Path, timeout: float = 10) -> str | None:
    ctx = verifying_context(str(root))
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(ip, port, ssl=ctx, server_hostname=host), timeout
        )
    except ssl.SSLError as exc:
        return f"{getattr(exc, 'reason', '')} {exc}".lower()
    except (OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    return None


def _finalized(pebble: PebbleServer) -> int:
    return pebble.log_text().count(_FINALIZE)


@contextlib.contextmanager
def running_backend() -> Iterator[str]:
    """The sample backend on its own event loop in a thread (a fleet outlives a test's
    loop); its base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fleet-backend", daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(start_backend(), loop).result(30)
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


@contextlib.contextmanager
def running_fleet(
    workdir: Path,
    pebble: PebbleServer,
    dns: DNSServer,
    backend_url: str,
    store_url: str,
    **options: object,
) -> Iterator[Fleet]:
    """A started fleet, stopped on exit (every node that still runs, gracefully)."""
    fleet = Fleet(workdir, pebble, dns, backend_url, store_url, **options)  # type: ignore[arg-type]
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()
