"""The HTTPS listener: choose each connection's certificate before the handshake.

`SSLContext.sni_callback` is synchronous and cannot wait for an ACME order, so
we accept the TCP connection ourselves, peek (MSG_PEEK) at the ClientHello until
it is complete, read SNI and ALPN, await the certificate (cache, store or a new
order) and only then hand the untouched socket to asyncio's TLS with the chosen
context and aiohttp as the protocol. Everything here is non-blocking: a slow or
hostile client costs one task and one socket, bounded by `hello_timeout`, and one
source can hold at most `max_pending_per_source` connections awaiting a hello.
Behind a load balancer (`listen.https_proxy_protocol`) the PROXY header is
consumed first (`proxy/listener.py`) and the ClientHello peeked after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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
from .listener import (
    Backoff,
    Listener,
    ListenerStats,
    ProxyProtocolSettings,
    close_cleanly,
    peer_has_finished,
    readable,
)
from .peers import source_key
from .refusals import Refused

log = logging.getLogger(__name__)

_PEEK_BYTES = MAX_CLIENT_HELLO + 4096  # the message plus the record headers around it


ContextSelector = Callable[[ClientHello], Awaitable[ssl.SSLContext]]


class _HelloAbandoned(Exception):
    """The peer closed after sending part of a ClientHello."""


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    hello_timeout: float = 10.0
    selection_timeout: float = 60.0  # includes a possible ACME order
    handshake_timeout: float = 10.0
    max_pending: int = 4096  # connections between accept and handshake
    # Connections of one source (IPv4 address, IPv6 /64) awaiting their ClientHello,
    # so that one client with silent connections cannot take all of max_pending.
    max_pending_per_source: int = 64
    proxy_protocol: ProxyProtocolSettings | None = None  # expect PROXY headers


class TLSListener(Listener):
    def __init__(
        self,
        sock: socket.socket,
        select_context: ContextSelector,
        protocol_factory: Callable[[], asyncio.Protocol],
        settings: ListenerSettings,
    ) -> None:
        super().__init__(
            sock, max_pending=settings.max_pending, proxy_protocol=settings.proxy_protocol
        )
        self._select = select_context
        self._protocol_factory = protocol_factory
        self._settings = settings
        self._awaiting_hello: dict[str, int] = {}  # source_key -> connections

    async def _serve_connection(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        self.stats.pending += 1
        try:
            ctx = await self._choose_context(conn, peer)
        finally:
            self.stats.pending -= 1
        if ctx is None:
            close_cleanly(conn)
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

    async def _choose_context(
        self, conn: socket.socket, peer: tuple[str, int]
    ) -> ssl.SSLContext | None:
        """The context for this connection, or None once the connection was dealt with."""
        client_ip = peer[0]
        if self._proxy is not None:
            info = await self._receive_proxy_header(conn, peer)
            if info is None:
                return None
            client_ip = info.client[0]
        hello = await self._receive_hello(conn, client_ip)
        if hello is None:
            return None
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

    async def _receive_hello(self, conn: socket.socket, client_ip: str) -> ClientHello | None:
        source = source_key(client_ip)
        waiting = self._awaiting_hello.get(source, 0)
        if waiting >= self._settings.max_pending_per_source:
            self.stats.per_source_limited += 1
            log.debug("%s has %d connections awaiting a ClientHello, closed", source, waiting)
            return None
        self._awaiting_hello[source] = waiting + 1
        self.stats.awaiting_hello += 1
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for wraps the coroutine in an
            # extra Task per call, measurable at ~15 us per connection on this path.
            async with asyncio.timeout(self._settings.hello_timeout):
                return await _peek_client_hello(conn)
        except TimeoutError:
            self.stats.hello_timeouts += 1
        except _HelloAbandoned:
            self.stats.hello_abandoned += 1
        except MalformedClientHello as exc:
            self.stats.bad_hello += 1
            log.debug("malformed ClientHello: %s", exc)
            _send_alert(conn, DECODE_ERROR)
        except ClientHelloError as exc:
            self.stats.bad_hello += 1
            log.debug("not TLS: %s", exc)
        except OSError:
            pass
        finally:
            self.stats.awaiting_hello -= 1
            remaining = self._awaiting_hello[source] - 1
            if remaining:
                self._awaiting_hello[source] = remaining
            else:
                del self._awaiting_hello[source]
        return None


async def _peek_client_hello(conn: socket.socket) -> ClientHello | None:
    """Peek until the ClientHello is complete; None if the peer closed first."""
    backoff = Backoff()
    while True:
        # Peek first: the ClientHello usually arrived with the connection, which
        # saves registering a reader and a trip through the event loop.
        try:
            data = conn.recv(_PEEK_BYTES, socket.MSG_PEEK)
        except BlockingIOError:
            await readable(conn)
            continue
        if not data:
            return None
        hello = parse_client_hello(data)
        if hello is not None:
            return hello
        if peer_has_finished(conn):
            raise _HelloAbandoned
        await backoff.wait(len(data))


def _send_alert(conn: socket.socket, alert: int) -> None:
    with contextlib.suppress(OSError):
        conn.send(alert_record(alert))


__all__ = ["ListenerSettings", "ListenerStats", "TLSListener"]
