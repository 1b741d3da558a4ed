"""Accepting connections ourselves: the accept loop, the PROXY protocol, peeking.

Both listeners share this when they need to see a connection's first bytes before
asyncio and aiohttp take it over: the HTTPS listener always (it chooses the
certificate from the ClientHello, see `proxy/tls/listener.py`), the HTTP listener
only when it expects a PROXY protocol header (otherwise `loop.create_server`
serves it). Everything here is non-blocking; a slow or hostile client costs one
task and one socket, bounded in time by the listener's timeouts and in number by
`max_pending`. Once handed off, connections are bounded by
`proxy/tls/connections.py`; `descriptor_budget` sizes both bounds from the
descriptor limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.counters import Counters
from proxy.wire.peers import ConnectionInfo, TrustedNetworks, set_connection_info
from proxy.wire.proxy_protocol import (
    MAX_HEADER,
    MalformedProxyHeader,
    NotProxyProtocol,
    ProxyHeader,
    parse_proxy_header,
)

log = logging.getLogger(__name__)

# Enough for any v1 line and a v2 header with its addresses and usual TLVs; a
# longer v2 header makes the next peek ask for the maximum.
_PROXY_PEEK = 536
_DISCARD_BYTES = 65536
# Connections taken per wake of the listening socket: a burst is drained in a few turns
# of the loop, and what is already accepted gets served between them.
ACCEPT_BATCH = 64
ACCEPT_PAUSE = 0.1  # seconds without accepting after an error (out of descriptors)


@dataclass
class ListenerStats(Counters):
    accepted: int = 0
    pending: int = 0  # between accept and hand-off right now
    # PROXY protocol (listeners that expect it)
    proxy_untrusted: int = 0  # from outside listen.proxy_protocol_trusted: closed at accept
    proxy_missing: int = 0  # bytes arrived that are no PROXY header
    proxy_malformed: int = 0  # a broken header, or the peer left in the middle of one
    proxy_timeouts: int = 0
    # TLS (the HTTPS listener)
    awaiting_hello: int = 0  # right now
    per_source_limited: int = 0  # over max_pending_per_source: its oldest waiting one closed
    handshakes_started: int = 0
    refused: int = 0
    bad_hello: int = 0
    hello_timeouts: int = 0
    hello_abandoned: int = 0  # the peer closed after part of a ClientHello
    selection_timeouts: int = 0
    handshake_failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProxyProtocolSettings:
    trusted: TrustedNetworks  # only these peers may send a header; others are closed
    timeout: float = 5.0  # to receive the header


def inherited_options(sock: socket.socket) -> None:
    """SO_KEEPALIVE and TCP_NODELAY on a listening socket: Linux copies both to every
    socket accept() returns, so no connection sets them itself (aiohttp's handler set
    SO_KEEPALIVE per connection through the transport: ~2 % of a new connection's CPU)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Listener:
    """Accept loop with a bound on connections in flight; subclasses serve each one."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_pending: int,
        proxy_protocol: ProxyProtocolSettings | None,
    ) -> None:
        self._sock = sock
        self._max_pending = max_pending
        self._proxy = proxy_protocol
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False  # the listening socket's reader is registered
        self._resume: asyncio.TimerHandle | None = None  # after an accept error's pause
        self.stats = ListenerStats()

    def start(self) -> None:
        self._sock.setblocking(False)
        inherited_options(self._sock)
        self._loop = asyncio.get_running_loop()
        self._watch()

    async def close(self) -> None:
        self._unwatch()
        self._sock.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop_accepting(self) -> None:
        """Close the listening socket; connections already accepted carry on (graceful stop)."""
        self._unwatch()
        self._sock.close()

    async def wait_idle(self, seconds: float) -> None:
        """Wait up to `seconds` for the accepted connections to be handed over (or closed)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=seconds)

    # A reader on the listening socket and a batch of accept() calls per wake, as
    # asyncio's own servers do, rather than `await loop.sock_accept()` per connection:
    # that costs a future, a task step and, whenever no connection is queued, a reader
    # registered and removed again (two epoll_ctl, more under uvloop) for each one.

    def _watch(self) -> None:
        assert self._loop is not None
        self._resume = None
        if self._sock.fileno() >= 0 and not self._watching:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)
            self._watching = True

    def _unwatch(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._watching and self._loop is not None:
            self._watching = False
            self._loop.remove_reader(self._sock.fileno())

    def _accept_ready(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # reset by the client while queued: next one
                continue
            except OSError as exc:  # EMFILE and friends: pause instead of spinning
                log.warning("accept failed: %s", exc)
                assert self._loop is not None
                self._unwatch()
                self._resume = self._loop.call_later(ACCEPT_PAUSE, self._watch)
                return
            self._accepted(conn, peer)

    def _accepted(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        self.stats.accepted += 1
        # every accepted connection not yet handed off has its task, including those of
        # this batch that have not started: the bound holds within a batch too
        if len(self._tasks) >= self._max_pending:
            conn.close()
            self._count("overloaded")
            return
        if self._proxy is not None and peer[0] not in self._proxy.trusted:
            # Anyone else could claim any client address.
            self.stats.proxy_untrusted += 1
            log.debug("PROXY listener: %s is not a trusted balancer, closed", peer[0])
            conn.close()
            return
        conn.setblocking(False)  # SO_KEEPALIVE, TCP_NODELAY: from the listening socket
        assert self._loop is not None
        task = self._loop.create_task(self._serve_connection(conn, peer[:2]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_connection(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        raise NotImplementedError

    async def _receive_proxy_header(
        self, conn: socket.socket, peer: tuple[str, int]
    ) -> ConnectionInfo | None:
        """Consume the PROXY header and record the client; None: the connection is done."""
        assert self._proxy is not None
        try:
            async with asyncio.timeout(self._proxy.timeout):
                header = await _read_proxy_header(conn)
        except TimeoutError:
            self.stats.proxy_timeouts += 1
            return None
        except NotProxyProtocol as exc:
            self.stats.proxy_missing += 1
            log.info("PROXY header missing from %s: %s", peer[0], exc)
            return None
        except MalformedProxyHeader as exc:
            self.stats.proxy_malformed += 1
            log.info("malformed PROXY header from %s: %s", peer[0], exc)
            return None
        except OSError:
            return None
        if header is None:
            # Closed without a byte: what TCP health checks of a balancer do. Not an error.
            return None
        info = ConnectionInfo(client=header.source or peer, balancer=peer)
        set_connection_info(info)
        return info

    def _count(self, key: str) -> None:
        self.stats.errors[key] = self.stats.errors.get(key, 0) + 1


class PlainListener(Listener):
    """The HTTP listener when it expects PROXY headers: header, then aiohttp."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        proxy_protocol: ProxyProtocolSettings,
        max_pending: int = 4096,
    ) -> None:
        super().__init__(sock, max_pending=max_pending, proxy_protocol=proxy_protocol)
        self._protocol_factory = protocol_factory

    async def _serve_connection(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        self.stats.pending += 1
        try:
            info = await self._receive_proxy_header(conn, peer)
        finally:
            self.stats.pending -= 1
        if info is None:
            close_cleanly(conn)
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._protocol_factory, conn)
        except OSError as exc:
            log.debug("hand-off to HTTP failed: %r", exc)
            conn.close()


async def _read_proxy_header(conn: socket.socket) -> ProxyHeader | None:
    """Peek until the header is complete, then consume exactly its bytes.

    None if the peer closed before sending anything.
    """
    size = _PROXY_PEEK
    backoff = Backoff()
    while True:
        try:
            data = conn.recv(size, socket.MSG_PEEK)
        except BlockingIOError:
            await readable(conn)
            continue
        if not data:
            return None
        header = parse_proxy_header(data)
        if header is not None:
            consumed = conn.recv(header.length)  # already buffered: all of it arrives
            if len(consumed) != header.length:
                raise MalformedProxyHeader("PROXY header shorter than peeked")
            return header
        if len(data) == size and size < MAX_HEADER:
            size = MAX_HEADER  # a v2 header with large TLVs
            continue
        if peer_has_finished(conn):
            raise MalformedProxyHeader("peer closed in the middle of the PROXY header")
        await backoff.wait(len(data))


class Backoff:
    """Waits between peeks at an incomplete message.

    Bytes that arrived but are not yet enough leave the socket readable, so
    waiting for readability would spin; back off instead (1 ms doubling to 50 ms,
    reset whenever more bytes arrived).
    """

    __slots__ = ("_delay", "_seen")

    def __init__(self) -> None:
        self._delay = 0.001
        self._seen = 0

    async def wait(self, received: int) -> None:
        if received > self._seen:
            self._seen = received
            self._delay = 0.001
        else:
            self._delay = min(self._delay * 2, 0.05)
        await asyncio.sleep(self._delay)


async def readable(conn: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


_POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # Linux


def peer_has_finished(conn: socket.socket) -> bool:
    """Has the peer shut down its sending side (FIN, or a reset)?

    Needed while bytes sit unread in the kernel: a peek then keeps returning them
    and never the empty read that signals end of stream. Linux reports the FIN
    as POLLRDHUP even with data still queued; elsewhere this answers False and
    the listener's timeout ends the connection instead.
    """
    if not _POLLRDHUP:
        return False
    poller = select.poll()
    poller.register(conn.fileno(), _POLLRDHUP)
    return bool(poller.poll(0))


def close_cleanly(conn: socket.socket, max_reads: int = 8) -> None:
    """Close with a FIN rather than a RST.

    We only peeked, so the first bytes are still unread in the kernel's buffer, and
    closing a socket with unread input sends RST, which lets the peer's TCP stack
    drop an alert we just sent (Windows does). Discard what has arrived first;
    bounded, so a peer that keeps sending cannot keep us here.
    """
    with contextlib.suppress(OSError):
        for _ in range(max_reads):
            if not conn.recv(_DISCARD_BYTES):
                break
    conn.close()


@dataclass(frozen=True, slots=True)
class DescriptorBudget:
    """How the worker's file descriptors are shared out (see `descriptor_budget`)."""

    limit: int  # RLIMIT_NOFILE (soft) after raising it
    reserve: int  # store, backend pool, health checks, the CA, logs, ...
    max_pending: int  # per listener with its own accept loop: accept -> handshake done
    max_connections: int  # established connections (both listeners)


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as fh:
                target = int(fh.read())
        except (OSError, ValueError):
            target = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def descriptor_budget(
    limit: int,
    *,
    reserve: int,
    accept_loops: int,
    max_connections: int = 0,
    max_pending: int = 4096,
) -> DescriptorBudget:
    """Share `limit` descriptors so that connections alone never exhaust it.

    `reserve` stays free for everything that is not a client connection. Of the
    rest, a quarter (at most `max_pending` each) goes to connections still in
    an accept loop (PROXY header, ClientHello, handshake), the remainder to
    established connections (`max_connections` lowers it; 0: all of it).
    """
    available = max(limit - reserve, 32)
    if limit - reserve < 32:
        log.warning(
            "descriptor limit %d leaves almost nothing for connections (%d reserved): "
            "raise LimitNOFILE",
            limit,
            reserve,
        )
    pending = max(8, min(max_pending, available // 4 // max(accept_loops, 1)))
    connections = max(16, available - pending * max(accept_loops, 1))
    if max_connections:
        connections = min(connections, max_connections)
    return DescriptorBudget(limit, reserve, pending, connections)


__all__ = [
    "Backoff",
    "DescriptorBudget",
    "Listener",
    "ListenerStats",
    "PlainListener",
    "inherited_options",
    "ProxyProtocolSettings",
    "close_cleanly",
    "descriptor_budget",
    "peer_has_finished",
    "raise_descriptor_limit",
    "readable",
]
