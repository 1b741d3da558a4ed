"""Bounds on established HTTP connections: idle and header deadlines, caps per source.

Both listeners hand their connections to aiohttp's `RequestHandler`; this module
gives them a subclass, `BoundedHandler`, and a per-worker `ConnectionLimits`
that knows every open connection (after the TLS handshake on HTTPS; from accept
on plain HTTP):

* **idle**: aiohttp's own keep-alive timer (`keepalive_timeout`, here
  `listen.idle_timeout`) closes a connection that waits for a request, whether it
  never sent one or finished its last one;
* **headers**: from the first byte of a request, its request line and headers
  must have arrived within `listen.header_timeout`, or the connection is
  aborted (aiohttp 3.x has no such deadline: a slowloris trickling a header byte
  a second would otherwise keep it until the keep-alive timer);
* **caps**: at most `max_per_source` connections of one source (IPv4 address,
  IPv6 /64, the PROXY header's client) and `max_total` in the worker. Over a cap
  the source's *oldest idle* connection is closed (then its oldest one still
  sending headers); over the total cap the same happens to the source holding
  the most connections, so a client from another source is never refused.
  "Oldest" is least recently used: opened or sent its last request longest ago.

Sources in `exempt` (trusted proxies in front of the edge, which carry many
clients) are not capped per source; they still count towards the total.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy.counters import Counters
from proxy.wire.peers import TrustedNetworks, connection_client, source_key

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    idle_timeout: float = 20.0  # keep-alive: waiting for a (first or next) request
    header_timeout: float = 10.0  # first byte of a request -> end of its headers
    max_total: int = 10_000  # established connections per worker
    max_per_source: int = 256  # of one source, per worker


@dataclass
class ConnectionStats(Counters):
    open: int = 0  # right now
    # the most open at once since MemoryTrimmer last looked (a gauge it resets)
    peak_open: int = 0
    opened: int = 0
    header_timeouts: int = 0  # aborted: headers not complete within header_timeout
    evicted_source: int = 0  # closed: its source went over max_per_source
    evicted_total: int = 0  # closed: the worker went over max_total
    refused_source: int = 0  # a new one closed: its source is over the cap, none evictable


def break_transport_cycle(transport: object) -> None:
    """Let a closed socket transport be freed by reference counting.

    asyncio's selector transport keeps its read callback as a bound method of
    itself (`_read_ready_cb`), a cycle that only the cyclic collector breaks, and
    with it the transport's socket objects stay. Once the connection is lost the
    callback is never called again; clearing it frees them at once, so a burst of
    closed connections leaves no garbage waiting for a full collection.
    """
    if getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[attr-defined]


class BoundedHandler(RequestHandler):
    """aiohttp's HTTP/1 protocol with a header deadline, tracked by ConnectionLimits."""

    def __init__(self, limits: ConnectionLimits, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._source = ""
        self._header_timer: asyncio.TimerHandle | None = None
        self._lost_callbacks: list[Callable[[], object]] = []
        self._raw_transport: asyncio.BaseTransport | None = None
        self.opened_at = 0.0
        # the lean click protocol this handler takes the connection over from (its
        # place among the source's connections is this handler's: not a new connection)
        self.taking_over: object | None = None

    # -- what the limits ask ------------------------------------------------------------

    @property
    def source(self) -> str:
        return self._source

    def stage(self) -> int:
        """0: idle (waiting for a request), 1: receiving headers, 2: handling a request."""
        if self._request_in_progress or self._messages:
            return 2
        return 1 if self._header_timer is not None else 0

    def abort(self) -> None:
        """Close now, without a TLS close_notify exchange (evictions, deadlines)."""
        transport = self.transport
        if transport is not None:
            transport.abort()
        self.force_close()

    def call_when_lost(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Run `callback` when the connection goes away; returns the way to unregister it."""
        self._lost_callbacks.append(callback)

        def remove() -> None:
            if callback in self._lost_callbacks:
                self._lost_callbacks.remove(callback)

        return remove

    # -- asyncio protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._source = source_key(connection_client(transport) or "")
        self.opened_at = time.monotonic()
        self._raw_transport = transport
        super().connection_made(transport)
        if self.taking_over is not None:
            self._limits.replace(self.taking_over, self)
            self.taking_over = None
        else:
            self._limits.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        self._limits.closed(self)
        callbacks, self._lost_callbacks = self._lost_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one broken callback must not keep the others from running
                log.exception("connection-lost callback failed")
        super().connection_lost(exc)
        transport, self._raw_transport = self._raw_transport, None
        break_transport_cycle(transport)  # plain HTTP; TLS: _CompactSSLProtocol does it

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._request_in_progress or self._upgraded:
            self._cancel_header_timer()  # a request head is complete (or body bytes came)
            if self._messages:  # a new request
                self._limits.touched(self)
        elif data and self._header_timer is None and not (self._force_close or self._close):
            self._header_timer = self._loop.call_later(
                self._limits.settings.header_timeout, self._header_deadline
            )

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._messages or self._request_in_progress:
            return
        self._limits.stats.header_timeouts += 1
        log.debug("request headers from %s incomplete after the deadline", self._source)
        self.abort()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None


class ConnectionLimits:
    """Every established connection of one worker, by source; enforces the caps."""

    def __init__(self, settings: ConnectionSettings, exempt: TrustedNetworks | None = None) -> None:
        self.settings = settings
        self.stats = ConnectionStats()
        self._exempt = exempt or TrustedNetworks(())
        # source -> its connections, least recently used (opened or sent a request) first
        self._by_source: dict[str, dict[BoundedHandler, None]] = {}
        # size -> sources with that many connections (finds the largest in O(1))
        self._sizes: dict[int, dict[str, None]] = {}
        self._largest = 0

    def protocol_factory(
        self, server: web.Server, **handler_kwargs: Any
    ) -> Callable[[], BoundedHandler]:
        """What the listeners hand connections to, instead of `server` itself."""
        loop = asyncio.get_running_loop()
        kwargs = {"keepalive_timeout": self.settings.idle_timeout, **handler_kwargs}

        def factory() -> BoundedHandler:
            return BoundedHandler(self, server, loop=loop, **kwargs)

        return factory

    def source_count(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    # -- bookkeeping ------------------------------------------------------------------------

    def opened(self, conn: BoundedHandler) -> None:
        source = conn.source
        conns = self._by_source.setdefault(source, {})
        self._resize(source, len(conns), len(conns) + 1)
        conns[conn] = None
        stats = self.stats
        stats.open += 1
        stats.opened += 1
        if stats.open > stats.peak_open:
            stats.peak_open = stats.open
        settings = self.settings
        if len(conns) > settings.max_per_source and source.split("/")[0] not in self._exempt:
            victim = _evictable(conns, conn)
            if victim is None:
                # all its other connections are working on requests: this one waits its turn
                self.stats.refused_source += 1
                self._close(conn)
            else:
                self.stats.evicted_source += 1
                self._close(victim)
        if self.stats.open > settings.max_total:
            largest = next(iter(self._sizes.get(self._largest, {})), source)
            victim = _evictable(self._by_source[largest], conn, busy_too=True)
            if victim is not None:
                self.stats.evicted_total += 1
                self._close(victim)

    def _close(self, conn: BoundedHandler) -> None:
        """Close a connection over a cap, and stop counting it now: its transport lets
        go of it a turn or two of the loop later, and until then it would still be its
        source's oldest, so every newcomer meanwhile "evicted" that same connection and
        stayed (a busy worker reached its descriptor limit that way)."""
        self.closed(conn)
        conn.abort()

    def replace(self, old: object, conn: BoundedHandler) -> None:
        """`conn` serves `old`'s connection from now on, in its place (least recently
        used order, counts); `opened(conn)` if `old` is gone already."""
        conns = self._by_source.get(conn.source)
        if conns is None or old not in conns:
            self.opened(conn)
            return
        self._by_source[conn.source] = {conn if c is old else c: None for c in conns}

    def touched(self, conn: BoundedHandler) -> None:
        """A request arrived: the connection becomes its source's most recently used."""
        conns = self._by_source.get(conn.source)
        if conns is not None and conn in conns:
            del conns[conn]
            conns[conn] = None

    def closed(self, conn: BoundedHandler) -> None:
        source = conn.source
        conns = self._by_source.get(source)
        if conns is None or conn not in conns:
            return
        del conns[conn]
        self._resize(source, len(conns) + 1, len(conns))
        if not conns:
            del self._by_source[source]
        self.stats.open -= 1

    def _resize(self, source: str, old: int, new: int) -> None:
        if old:
            bucket = self._sizes[old]
            del bucket[source]
            if not bucket:
                del self._sizes[old]
        if new:
            self._sizes.setdefault(new, {})[source] = None
        if new > self._largest:
            self._largest = new
        while self._largest and self._largest not in self._sizes:
            self._largest -= 1


def _evictable(
    conns: dict[BoundedHandler, None], newcomer: BoundedHandler, *, busy_too: bool = False
) -> BoundedHandler | None:
    """The oldest idle connection, else the oldest still sending headers (else the oldest)."""
    sending: BoundedHandler | None = None
    oldest: BoundedHandler | None = None
    for conn in conns:  # oldest first
        if conn is newcomer or conn.transport is None:
            continue
        stage = conn.stage()
        if stage == 0:
            return conn
        if stage == 1 and sending is None:
            sending = conn
        if oldest is None:
            oldest = conn
    if sending is not None:
        return sending
    if busy_too:
        return oldest if oldest is not None else newcomer
    return None


# -- memory after bursts ----------------------------------------------------------------

# _asyncio's free list of future iterators (what `await future` creates): FI_FREELIST_MAXLEN
# in CPython 3.8-3.12's Modules/_asynciomodule.c.
_FUTURE_ITER_FREE_LIST = 255


def empty_free_lists(loop: asyncio.AbstractEventLoop) -> None:
    """Empty CPython's free lists, whose objects keep the arenas of a burst allocated.

    pymalloc returns a 1 MiB arena to the OS only once every block in it is free, and
    CPython keeps freed tuples (up to 2,000 of each length), contexts, dicts, floats,
    ... and `await` iterators for reuse instead of freeing them. After 10,000 connections
    closed, those kept are the ones the last connections freed, one or two per arena
    the burst allocated: tracemalloc found ~7,500 blocks allocated during the burst and
    still alive, ~6,600 of them in free lists; emptying them returned ~18 MiB of arenas
    (`tests/benchmarks/bench_idle_memory.py`).

    Only a full collection empties the interpreter's lists; with every object frozen
    it has nothing to traverse (5-8 ms in all after 10,000 connections, where a real
    one held the loop ~280 ms). `unfreeze` puts the objects back in the oldest
    generation. The C asyncio module's list of future iterators is not among them.
    Skipped if something else froze objects (a pre-fork `gc.freeze()`): unfreezing
    would undo it.
    """
    if not gc.get_freeze_count():
        gc.freeze()
        try:
            gc.collect()
        finally:
            gc.unfreeze()
    _renew_future_iterators(loop)


def _renew_future_iterators(loop: asyncio.AbstractEventLoop) -> None:
    """Replace the C asyncio module's free future iterators by new ones, side by side.

    Nothing clears that list, and it only takes back an iterator while it holds fewer
    than its maximum. Taking twice that many at once empties it into `iterators` (its
    old entries, scattered over the burst's arenas, come first) and allocates the rest
    anew, next to each other; freeing the newest first refills the list with those,
    and the old ones, arriving at a full list, are freed for good.
    """
    future = loop.create_future()
    iterators = [future.__await__() for _ in range(2 * _FUTURE_ITER_FREE_LIST)]
    while iterators:
        iterators.pop()


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MemoryTrimmer:
    """Gives memory back to the OS after many connections closed.

    After `min_closed` connections closed since the last look (checked every
    `interval` seconds), and once they have stopped closing (checked every `settle`
    seconds, at most `interval` long), this empties CPython's free lists (see
    `empty_free_lists`: what they keep holds the small-object arenas of the burst)
    and runs glibc's `malloc_trim(0)` in a thread: glibc keeps freed heap memory,
    fragmented between live blocks, rather than returning it (a worker stayed
    hundreds of MiB above its baseline). Releasing while connections still close
    would leave what the rest free behind until the next burst. A full
    `gc.collect()` is not needed: connections leave no cycles behind (see
    `break_transport_cycle`).
    """

    def __init__(
        self,
        stats: ConnectionStats,
        interval: float = 10.0,
        min_closed: int = 500,
        settle: float = 1.0,
    ):
        self._stats = stats
        self._interval = interval
        self._min_closed = min_closed
        self._settle = settle
        self._trim = _load_malloc_trim()
        self._task: asyncio.Task[None] | None = None
        self.trims = 0
        self.releases = 0

    def start(self) -> None:
        if self._interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        stats = self._stats
        peak = stats.open
        while True:
            await asyncio.sleep(self._interval)
            now = stats.open
            # `peak_open` holds a burst that opened and closed between two looks
            peak = max(peak, stats.peak_open)
            stats.peak_open = now
            if peak - now >= self._min_closed:
                now = await self._closing_stopped(now)
                await self.release()
                peak = now
            else:
                peak = max(peak, now)

    async def _closing_stopped(self, now: int) -> int:
        """Wait until the open count stops falling (at most `interval`); the count then."""
        waited = 0.0
        while waited < self._interval:
            await asyncio.sleep(self._settle)
            waited += self._settle
            before, now = now, self._stats.open
            if now >= before:
                break
        return now

    async def release(self) -> None:
        started = time.perf_counter()
        empty_free_lists(asyncio.get_running_loop())
        emptied = time.perf_counter()
        self.releases += 1
        if self._trim is not None:
            # ctypes releases the GIL: the loop runs on meanwhile (objects come from
            # Python's own allocator, so it seldom waits for glibc's arena lock)
            await asyncio.to_thread(self._trim, 0)
            self.trims += 1
        log.info(
            "released memory after a burst of closed connections: free lists %.1f ms,"
            " malloc_trim %.0f ms",
            (emptied - started) * 1000,
            (time.perf_counter() - emptied) * 1000,
        )


__all__ = [
    "BoundedHandler",
    "ConnectionLimits",
    "ConnectionSettings",
    "ConnectionStats",
    "MemoryTrimmer",
    "break_transport_cycle",
    "empty_free_lists",
]
