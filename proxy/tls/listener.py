"""The HTTPS listener: choose each connection's certificate before the handshake.

`SSLContext.sni_callback` is synchronous and cannot wait for an ACME order, so
we accept the TCP connection ourselves, peek (MSG_PEEK) at the ClientHello until
it is complete, read SNI and ALPN, await the certificate (cache, store or a new
order) and only then hand the untouched socket to asyncio's TLS with the chosen
context and aiohttp as the protocol. Everything here is non-blocking: a slow or
hostile client costs one task and one socket, bounded by `hello_timeout`, and one
source can hold at most `max_pending_per_source` connections awaiting a hello: a
further one evicts that source's oldest waiting connection, so a real browser
behind the same address as a slow scanner still gets its handshake. A
connection counts as pending until its handshake is done (`handshake_timeout`).
The TLS protocol is asyncio's with one 32 KiB read buffer shared by all connections
of the thread instead of 256 KiB of heap per connection (`_CompactSSLProtocol`).
Behind a load balancer (`listen.https_proxy_protocol`) the PROXY header is
consumed first (`proxy/tls/accept.py`) and the ClientHello peeked after it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import threading
from asyncio import constants, sslproto
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from proxy.tls.accept import (
    Backoff,
    Listener,
    ListenerStats,
    ProxyProtocolSettings,
    close_cleanly,
    peer_has_finished,
    readable,
)
from proxy.tls.connections import break_transport_cycle
from proxy.tls.refusals import Refused
from proxy.wire.clienthello import (
    DECODE_ERROR,
    INTERNAL_ERROR,
    MAX_CLIENT_HELLO,
    ClientHello,
    ClientHelloError,
    MalformedClientHello,
    alert_record,
    parse_client_hello,
)
from proxy.wire.coarse_timeouts import CoarseTimeouts
from proxy.wire.peers import source_key

log = logging.getLogger(__name__)

_PEEK_BYTES = MAX_CLIENT_HELLO + 4096  # the message plus the record headers around it
# What asyncio's TLS protocol reads from the socket at once. Two full TLS records
# (16 KiB + overhead each) fit in 32 KiB.
TLS_READ_BUFFER = 32 * 1024
_read_buffers = threading.local()
_WRAPPED = sslproto.SSLProtocolState.WRAPPED


def _shared_read_buffer() -> memoryview:
    """This thread's TLS read buffer, shared by all its TLS connections.

    asyncio's TLS protocol copies what the socket put into its buffer into the
    connection's incoming MemoryBIO first thing in `buffer_updated`, before anything
    else can run on the loop: the buffer holds nothing between two reads, so one per
    thread (an event loop runs in one) serves every connection.
    """
    view: memoryview | None = getattr(_read_buffers, "view", None)
    if view is None:
        view = _read_buffers.view = memoryview(bytearray(TLS_READ_BUFFER))
    return view


class _CompactSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol without a read buffer of its own, and with less to do per
    connection on the server side.

    asyncio allocates (and zero-fills, so it is resident) a 256 KiB read buffer per
    connection for its whole life: idle connections cost ~280 KiB each. A private
    32 KiB mapping per connection brought that to one or two resident pages; sharing
    one buffer per thread (`_shared_read_buffer`) leaves nothing per connection, which
    counts most under a burst of thousands of connections at once.
    """

    max_size = TLS_READ_BUFFER

    # asyncio's __init__ sets all of these on each instance. Their first values are
    # immutable, so they are class attributes here, which an assignment shadows: a
    # server connection's __init__ sets only what is its own (~18 µs less per connection:
    # the commit's measurement). `test_tls_read_buffer` holds them to asyncio's.
    _server_hostname = None
    _write_buffer_size = 0
    _app_transport: Any = None
    _app_transport_created = False
    _transport = None
    _conn_lost = 0
    _state = sslproto.SSLProtocolState.UNWRAPPED
    _app_state = sslproto.AppProtocolState.STATE_INIT
    _app_protocol_is_buffer = False
    _ssl_writing_paused = False
    _app_reading_paused = False
    _ssl_reading_paused = False
    _app_writing_paused = False
    _eof_received = False
    _incoming_high_water, _incoming_low_water = sslproto.add_flowcontrol_defaults(
        None, None, constants.FLOW_CONTROL_HIGH_WATER_SSL_READ
    )
    _outgoing_high_water, _outgoing_low_water = sslproto.add_flowcontrol_defaults(
        None, None, constants.FLOW_CONTROL_HIGH_WATER_SSL_WRITE
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app_protocol: asyncio.BaseProtocol,
        sslcontext: ssl.SSLContext,
        waiter: Any,
        server_side: bool = False,
        server_hostname: str | None = None,
        call_connection_made: bool = True,
        ssl_handshake_timeout: Any = None,
        ssl_shutdown_timeout: Any = None,
    ) -> None:
        tls: Any = self  # asyncio's private state, which typeshed only partly knows
        if (
            type(self).max_size != TLS_READ_BUFFER  # a benchmark's stock buffer
            or not server_side
            or sslcontext is None  # asyncio makes a default one
            or not call_connection_made
            or isinstance(app_protocol, asyncio.BufferedProtocol)
            or not (ssl_handshake_timeout or 0) > 0
            or not (ssl_shutdown_timeout or 0) > 0
        ):
            shared = type(self).max_size == TLS_READ_BUFFER
            if shared:  # asyncio's __init__ allocates max_size bytes: none here
                setattr(self, "max_size", 0)  # noqa: B010 (a class variable to typeshed)
            super().__init__(
                loop,
                app_protocol,
                sslcontext,
                waiter,
                server_side,
                server_hostname,
                call_connection_made,
                ssl_handshake_timeout,
                ssl_shutdown_timeout,
            )
            if shared:
                delattr(self, "max_size")
                view = _shared_read_buffer()
                tls._ssl_buffer = view.obj
                tls._ssl_buffer_view = view
            return
        # asyncio's __init__ for a server connection, less the class attributes above
        view = _shared_read_buffer()
        tls._ssl_buffer = view.obj
        tls._ssl_buffer_view = view
        tls._ssl_handshake_timeout = ssl_handshake_timeout
        tls._ssl_shutdown_timeout = ssl_shutdown_timeout
        tls._server_side = True
        tls._sslcontext = sslcontext
        tls._extra = {"sslcontext": sslcontext}
        tls._write_backlog = collections.deque()
        tls._waiter = waiter
        tls._loop = loop
        tls._app_protocol = app_protocol
        tls._incoming = incoming = ssl.MemoryBIO()
        tls._outgoing = outgoing = ssl.MemoryBIO()
        tls._sslobj = sslcontext.wrap_bio(incoming, outgoing, server_side=True)
        tls._get_app_transport()

    def _start_handshake(self) -> None:
        """asyncio's without its first step on the server side: nothing has been read
        yet, so OpenSSL could only say SSLWantReadError (an exception made for nothing);
        the ClientHello's `buffer_updated` takes the first step."""
        tls: Any = self
        if not tls._server_side or tls._loop.get_debug():
            super()._start_handshake()
            return
        tls._set_state(sslproto.SSLProtocolState.DO_HANDSHAKE)
        tls._handshake_timeout_handle = tls._loop.call_later(
            tls._ssl_handshake_timeout, tls._check_handshake_timeout
        )

    def get_buffer(self, n: int) -> memoryview:
        # asyncio's, which only grows a buffer shorter than max_size: ours never is
        view: memoryview = cast(Any, self)._ssl_buffer_view
        return view

    def buffer_updated(self, nbytes: int) -> None:
        """asyncio's for a connection past its handshake with nothing paused or queued:
        the record(s) read and given to the application, then whatever OpenSSL wrote
        meanwhile sent, in one frame instead of asyncio's four; flow control only when
        something is left over. Anything else is asyncio's."""
        tls: Any = self  # asyncio's private state, which typeshed only partly knows
        if (
            tls._state is not _WRAPPED
            or tls._app_reading_paused
            or tls._ssl_reading_paused
            or tls._write_backlog
        ):
            super().buffer_updated(nbytes)
            return
        tls._incoming.write(tls._ssl_buffer_view[:nbytes])
        try:
            self._do_read__copied()
            if tls._write_backlog:  # the application wrote while mid-handshake
                tls._do_write()
            elif not tls._ssl_writing_paused:
                out = tls._outgoing.read()  # what OpenSSL answered (a KeyUpdate, an alert)
                if out:
                    tls._transport.write(out)
            if tls._write_backlog or tls._outgoing.pending or tls._app_writing_paused:
                tls._control_app_writing()
            if tls._incoming.pending or tls._ssl_reading_paused:
                tls._control_ssl_reading()
        except Exception as exc:
            tls._fatal_error(exc, "Fatal error on SSL protocol")

    def _do_read__copied(self) -> None:
        """asyncio's read loop without its last `read`: that one only finds both
        buffers empty and raises SSLWantReadError, ~4 µs for every record a client
        sends (a keep-alive click is one). Stopping when neither the incoming BIO nor
        OpenSSL holds a byte is the same loop: OpenSSL reads a record at a time from
        the BIO (no read-ahead), so whatever it has not read is still in the BIO."""
        sslobj: ssl.SSLObject = self._sslobj  # type: ignore[attr-defined]
        incoming: ssl.MemoryBIO = self._incoming  # type: ignore[attr-defined]
        chunks: list[bytes] = []
        chunk = b"1"
        try:
            while True:
                chunk = sslobj.read(self.max_size)
                if not chunk:
                    break  # close_notify
                chunks.append(chunk)
                if not incoming.pending and not sslobj.pending():
                    break
        except sslproto.SSLAgainErrors:
            pass
        if chunks:
            app = cast(asyncio.Protocol, self._app_protocol)
            app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if not chunk:
            self._peer_closed()

    def _peer_closed(self) -> None:
        """The peer's close_notify was read. asyncio would enter its flush state (a
        timer, a read that finds nothing more), then shut down; with nothing queued the
        shutdown completes at once (the peer's close_notify is in), so here our own
        close_notify goes out and the transport closes in one frame. Anything else (a
        backlog, paused reading or writing, a shutdown that would wait) is asyncio's."""
        tls: Any = self  # asyncio's private state, which typeshed only partly knows
        tls._call_eof_received()
        if (
            tls._state is not _WRAPPED
            or tls._write_backlog
            or tls._ssl_writing_paused
            or tls._app_reading_paused
        ):
            tls._start_shutdown()
            return
        if tls._app_transport is not None:
            tls._app_transport._closed = True
        tls._set_state(sslproto.SSLProtocolState.FLUSHING)
        tls._set_state(sslproto.SSLProtocolState.SHUTDOWN)
        try:
            tls._sslobj.unwrap()
        except sslproto.SSLAgainErrors:  # cannot be after a close_notify: asyncio's wait
            tls._shutdown_timeout_handle = tls._loop.call_later(
                tls._ssl_shutdown_timeout, tls._check_shutdown_timeout
            )
            tls._process_outgoing()
            return
        except ssl.SSLError as exc:
            tls._on_shutdown_complete(exc)
            return
        out = tls._outgoing.read()
        if out:
            tls._transport.write(out)
        tls._loop.call_soon(tls._transport.close)

    def _write_appdata(self, list_of_data: list[bytes]) -> None:
        """asyncio's write for the usual case in one frame: one buffer (a click's whole
        answer) on a connection with nothing queued and no writing paused is encrypted
        and written at once; asyncio's chain (backlog, `_do_write`, `_process_outgoing`,
        flow control) would do the same in five. Anything else is asyncio's."""
        tls: Any = self  # asyncio's private state, which typeshed only partly knows
        if (
            len(list_of_data) != 1
            or tls._state is not _WRAPPED
            or tls._write_backlog
            or tls._ssl_writing_paused
            or tls._app_writing_paused
        ):
            super()._write_appdata(list_of_data)
            return
        data = list_of_data[0]
        try:
            written = tls._sslobj.write(data)
        except sslproto.SSLAgainErrors:
            written = 0
        except Exception as exc:
            tls._fatal_error(exc, "Fatal error on SSL protocol")
            return
        if written < len(data):  # mid-handshake (renegotiation): asyncio's backlog
            tls._write_backlog.append(data[written:])
            tls._write_buffer_size += len(data) - written
        out = tls._outgoing.read()
        if out:
            tls._transport.write(out)
        if tls._write_backlog:
            tls._control_app_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        transport = self._transport
        super().connection_lost(exc)
        break_transport_cycle(transport)


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
    # so that one client with silent connections cannot take all of max_pending;
    # a further one evicts the source's oldest.
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
        # source_key -> the tasks of its connections awaiting a hello, oldest first
        self._awaiting_hello: dict[str, dict[asyncio.Task[None], None]] = {}
        self._evicted: set[asyncio.Task[None]] = set()
        self._timeouts = CoarseTimeouts()  # the hello's and the selection's deadlines

    async def _serve_connection(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        self.stats.pending += 1
        try:
            ctx = await self._choose_context(conn, peer)
        except BaseException:
            conn.close()
            raise
        finally:
            self.stats.pending -= 1
        if ctx is None:
            close_cleanly(conn)
            return
        # still pending during the handshake: bounded by max_pending and handshake_timeout
        self.stats.pending += 1
        self.stats.handshakes_started += 1
        try:
            await self._handshake(conn, ctx)
        finally:
            self.stats.pending -= 1

    async def _handshake(self, conn: socket.socket, ctx: ssl.SSLContext) -> None:
        """TLS on the untouched socket, aiohttp on top (what `connect_accepted_socket(ssl=)`
        does, with the compact TLS protocol); returns once the handshake is over."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        tls = _CompactSSLProtocol(
            loop,
            self._protocol_factory(),
            ctx,
            waiter,
            server_side=True,
            ssl_handshake_timeout=self._settings.handshake_timeout,
            ssl_shutdown_timeout=self._settings.handshake_timeout,
        )
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: tls, conn)
        except OSError as exc:
            self.stats.handshake_failures += 1
            log.debug("TLS hand-off failed: %r", exc)
            conn.close()
            return
        try:
            await waiter
        except (TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            # the TLS protocol has closed the transport (and so the socket) already
            self.stats.handshake_failures += 1
            log.debug("TLS handshake failed: %r", exc)
            transport.close()
        except BaseException:
            transport.close()
            raise

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
            async with self._timeouts.timeout(self._settings.selection_timeout):
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
        task = asyncio.current_task()
        assert task is not None
        waiting = self._awaiting_hello.setdefault(source, {})
        if len(waiting) >= self._settings.max_pending_per_source:
            # Evict the source's oldest waiting connection rather than refusing this one:
            # a hostile scanner's silent connections then cannot shut out a browser
            # behind the same address (NAT), whose ClientHello arrives at once.
            oldest = next(iter(waiting))
            del waiting[oldest]
            self._evicted.add(oldest)
            oldest.cancel()
            self.stats.per_source_limited += 1
            log.debug("%s: too many connections awaiting a ClientHello, oldest closed", source)
        waiting[task] = None
        self.stats.awaiting_hello += 1
        try:
            # not wait_for: on 3.11 it wraps the coroutine in an extra Task per call
            # (~15 us per connection); not asyncio.timeout: a timer per connection
            async with self._timeouts.timeout(self._settings.hello_timeout):
                return await _peek_client_hello(conn)
        except asyncio.CancelledError:
            if task not in self._evicted:
                raise
            self._evicted.discard(task)
            task.uncancel()
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
            waiting = self._awaiting_hello.get(source, {})
            waiting.pop(task, None)
            if not waiting:
                self._awaiting_hello.pop(source, None)
            self._evicted.discard(task)
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
