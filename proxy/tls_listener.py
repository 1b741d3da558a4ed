"""The HTTPS listener: choose each connection's certificate before the handshake.

`SSLContext.sni_callback` is synchronous and cannot wait for an ACME order, so
we accept the TCP connection ourselves, peek (MSG_PEEK) at the ClientHello until
it is complete, read SNI and ALPN, await the certificate (cache, store or a new
order) and only then hand the untouched socket to asyncio's TLS with the chosen
context and aiohttp as the protocol. Everything here is non-blocking: a slow or
hostile client costs one task and one socket, bounded by `hello_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .clienthello import (
    DECODE_ERROR,
    INTERNAL_ERROR,
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloError,
    MalformedClientHello,
    alert_record,
    parse_client_hello,
)
from .refusals import Refused

log = logging.getLogger(__name__)

_PEEK_BYTES = MAX_CLIENT_HELLO + 4096  # the message plus the record headers around it


ContextSelector = Callable[[ClientHello], Awaitable[ssl.SSLContext]]


@dataclass
class ListenerStats:
    accepted: int = 0
    handshakes_started: int = 0
    refused: int = 0
    bad_hello: int = 0
    hello_timeouts: int = 0
    selection_timeouts: int = 0
    handshake_failures: int = 0
    pending: int = 0
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    hello_timeout: float = 10.0
    selection_timeout: float = 60.0  # includes a possible ACME order
    handshake_timeout: float = 10.0
    max_pending: int = 4096  # connections between accept and handshake


class TLSListener:
    def __init__(
        self,
        sock: socket.socket,
        select_context: ContextSelector,
        protocol_factory: Callable[[], asyncio.Protocol],
        settings: ListenerSettings,
    ) -> None:
        self._sock = sock
        self._select = select_context
        self._protocol_factory = protocol_factory
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None
        self.stats = ListenerStats()

    def start(self) -> None:
        self._sock.setblocking(False)
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        self._sock.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _addr = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self.stats.accepted += 1
            if self.stats.pending >= self._settings.max_pending:
                conn.close()
                self._count("overloaded")
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._serve_connection(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve_connection(self, conn: socket.socket) -> None:
        self.stats.pending += 1
        try:
            ctx = await self._choose_context(conn)
        finally:
            self.stats.pending -= 1
        if ctx is None:
            _close_cleanly(conn)
            return
        self.stats.handshakes_started += 1
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                self._protocol_factory,
                conn,
                ssl=ctx,
                ssl_handshake_timeout=self._settings.handshake_timeout,
            )
        except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            # asyncio has closed the transport (and so the socket) already
            self.stats.handshake_failures += 1
            log.debug("TLS handshake failed: %r", exc)
            conn.close()

    async def _choose_context(self, conn: socket.socket) -> ssl.SSLContext | None:
        """The context for this connection, or None once the connection was dealt with."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for wraps the coroutine in an
        # extra Task per call, measurable at ~15 us per connection on this path.
        try:
            async with asyncio.timeout(self._settings.hello_timeout):
                hello = await _peek_client_hello(conn)
        except TimeoutError:
            self.stats.hello_timeouts += 1
            return None
        except MalformedClientHello as exc:
            self.stats.bad_hello += 1
            log.debug("malformed ClientHello: %s", exc)
            _send_alert(conn, DECODE_ERROR)
            return None
        except ClientHelloError as exc:
            self.stats.bad_hello += 1
            log.debug("not TLS: %s", exc)
            return None
        except OSError:
            return None
        if hello is None:
            return None  # the peer closed before sending a ClientHello
        try:
            async with asyncio.timeout(self._settings.selection_timeout):
                return await self._select(hello)
        except Refused as exc:
            self.stats.refused += 1
            _send_alert(conn, exc.alert)
        except TimeoutError:
            self.stats.selection_timeouts += 1
            _send_alert(conn, INTERNAL_ERROR)
        return None

    def _count(self, key: str) -> None:
        self.stats.errors[key] = self.stats.errors.get(key, 0) + 1


async def _peek_client_hello(conn: socket.socket) -> ClientHello | None:
    """Peek until the ClientHello is complete; None if the peer closed first.

    A partial ClientHello leaves the socket readable, so between peeks we back off
    (1 ms doubling to 50 ms) instead of spinning on readiness.
    """
    delay = 0.001
    seen = 0
    while True:
        # Peek first: the ClientHello usually arrived with the connection, which
        # saves registering a reader and a trip through the event loop.
        try:
            data = conn.recv(_PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            await _readable(conn)
            continue
        if not data:
            return None
        hello = parse_client_hello(data)
        if hello is not None:
            return hello
        if len(data) > seen:
            seen = len(data)
            delay = 0.001
        else:
            delay = min(delay * 2, 0.05)
        await asyncio.sleep(delay)


async def _readable(conn: socket.socket) -> None:
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


def _send_alert(conn: socket.socket, alert: int) -> None:
    with contextlib.suppress(OSError):
        conn.send(alert_record(alert))


def _close_cleanly(conn: socket.socket, max_reads: int = 8) -> None:
    """Close with a FIN rather than a RST.

    We only peeked, so the ClientHello is still unread in the kernel's buffer, and
    closing a socket with unread input sends RST, which lets the peer's TCP stack
    drop the alert we just sent (Windows does). Discard what has arrived first;
    bounded, so a peer that keeps sending cannot keep us here.
    """
    with contextlib.suppress(OSError):
        for _ in range(max_reads):
            if not conn.recv(_PEEK_BYTES):
                break
    conn.close()


__all__ = ["ListenerSettings", "TLSListener"]
