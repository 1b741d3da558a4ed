"""A lean pooled HTTP/1.1 client for one job: a bodiless GET (or HEAD) forwarded to a backend.

aiohttp's `ClientSession.request` does a lot per request that a click does not need
(a request object, its writer task, tracing hooks, cookie and redirect logic, a
response object): ~70 µs of an ~150 µs keep-alive click. This client keeps what the
forwarder relies on and nothing else:

* one keep-alive connection pool per backend (at most `pool_size` connections in use
  at once, like aiohttp's connector limit; idle ones are closed after `keepalive`);
* the response is parsed by aiohttp's own C parser (llhttp-based `HttpResponseParser`,
  the one `ClientSession` uses), body streamed through aiohttp's `StreamReader`;
* the same timeouts: `connect_timeout` for the pool wait plus the connect, `timeout`
  for the response head and for each body read;
* a connection is reused only when its response was read to the end and the backend
  did not ask to close; anything else (cancellation, a timeout, an error) closes it;
* a pooled connection that the backend had already closed (no byte of the answer
  arrived) is retried once on a new connection: the request is a GET without a body.

The request is written in one `write`: the request line with the path and query as
`forward.backend_url` built them, then the headers exactly as `forward.forwarded_headers`
made them. Only bodiless GETs come here (`Forwarder` decides); HEAD, bodies and
everything else still go through aiohttp's client.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Protocol

from aiohttp import ClientConnectionError, ClientPayloadError
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.wire.coarse_timeouts import CoarseTimeouts

READ_LIMIT = 2**16


class ConnectFailed(ClientConnectionError):
    """Nothing was sent: the connection could not be made (or no pool slot in time)."""

    def __init__(self, text: str, *, timeout: bool) -> None:
        super().__init__(text)
        self.timeout = timeout


class BackendClosed(ClientConnectionError):
    """The connection ended before the head of the answer arrived."""


class AnswerWaiter(Protocol):
    """Who is told about the answer of `LeanClient.send_now`'s request, from inside the
    connection's `data_received` / `connection_lost` (no future, no task wake-up)."""

    def answered(self, message: RawResponseMessage, payload: StreamReader) -> None: ...

    def failed(self, exc: BackendClosed) -> None: ...


class Connection(BaseProtocol):
    __slots__ = (
        "_parser",
        "_head_parser",
        "_head",
        "_waiter",
        "_payload",
        "_got_bytes",
        "_reusable",
        "idle_since",
        "key",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, key: str) -> None:
        super().__init__(loop)
        self.key = key
        self._parser: HttpResponseParser | None = None
        self._head_parser = False  # the parser is for the answer to a HEAD
        self._head: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._waiter: AnswerWaiter | None = None  # instead of `_head`: `send_now`'s
        self._payload: StreamReader | None = None
        self._got_bytes = False
        self._reusable = False
        self.idle_since = 0.0

    # -- one exchange --------------------------------------------------------------

    def send(
        self, data: bytes, *, head_request: bool = False
    ) -> asyncio.Future[tuple[RawResponseMessage, StreamReader]]:
        self._head = self._loop.create_future()
        self._write(data, head_request)
        return self._head

    def send_to(self, data: bytes, waiter: AnswerWaiter) -> None:
        """`send` for a GET whose answer's head goes to `waiter` instead of a future."""
        self._waiter = waiter
        self._write(data, False)

    def _write(self, data: bytes, head_request: bool) -> None:
        loop = self._loop
        if self._parser is None or head_request or self._head_parser:
            # one parser for the connection's life: it is back at a message boundary
            # after each answer read to the end (anything else closes the connection);
            # the answer to a HEAD has no body whatever its fields say: a parser of its own
            self._parser = HttpResponseParser(
                self,
                loop,
                READ_LIMIT,
                payload_exception=ClientPayloadError,
                response_with_body=not head_request,
                read_until_eof=True,
                auto_decompress=False,
            )
            self._head_parser = head_request
        self._payload = None
        self._got_bytes = False
        self._reusable = False
        assert self.transport is not None
        self.transport.write(data)

    def rest(self) -> None:
        """Pooled: any byte from the backend until the next `send` closes the connection."""
        self._head = None
        self._waiter = None
        self._payload = None

    @property
    def got_bytes(self) -> bool:
        return self._got_bytes

    def finished_cleanly(self) -> bool:
        """The whole answer was read and the backend keeps the connection open."""
        payload = self._payload
        return (
            self._reusable
            and payload is not None
            and payload.is_eof()
            and payload.exception() is None
            and self.transport is not None
            and not self.transport.is_closing()
        )

    # -- asyncio protocol ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        parser = self._parser
        idle = self._head is None and self._waiter is None and self._payload is None
        if parser is None or idle:
            if self.transport is not None:  # bytes while idle: the backend is confused;
                self.transport.close()  # drop the connection
            return
        try:
            messages, _upgraded, _tail = parser.feed_data(data)
        except BaseException as exc:  # a malformed answer
            self._fail(exc)
            if self.transport is not None:
                self.transport.close()
            return
        head = self._head
        if self._waiter is None and (head is None or head.done()):
            if messages and self.transport is not None:  # bytes between answers: the
                self.transport.close()  # backend is confused
            return
        for message, payload in messages:
            if 100 <= message.code < 200:  # interim (we never send Expect): skip
                continue
            self._payload = payload
            self._reusable = not message.should_close
            waiter, self._waiter = self._waiter, None
            if waiter is not None:
                waiter.answered(message, payload)  # may release this connection at once
                return
            head = self._head
            if head is not None and not head.done():
                head.set_result((message, payload))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        parser = self._parser
        if parser is not None:
            try:
                parser.feed_eof()  # ends a read-until-close body
            except BaseException as err:
                exc = err
        self._fail(exc)

    def _fail(self, exc: BaseException | None) -> None:
        closed = BackendClosed(str(exc) if exc else "backend closed the connection")
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.failed(closed)
        head = self._head
        if head is not None and not head.done():
            head.set_exception(closed)
        payload = self._payload
        if payload is not None and not payload.is_eof():
            payload.set_exception(ClientPayloadError("backend closed the connection mid-answer"))


class Answer:
    """What `_relay` reads of an answer: status, reason, headers, and the body."""

    __slots__ = ("status", "reason", "headers", "_payload", "_timeout", "_timeouts")

    def __init__(
        self,
        message: RawResponseMessage,
        payload: StreamReader,
        timeout: float,
        timeouts: CoarseTimeouts,
    ) -> None:
        self.status = message.code
        self.reason = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self._payload = payload
        self._timeout = timeout
        self._timeouts = timeouts

    @property
    def content(self) -> Answer:
        return self

    def complete(self) -> bool:
        """The whole body is here (`read_now` gives all of it, then b"")."""
        return self._payload.is_eof()

    def read_now(self) -> bytes | None:
        """The next body bytes if no wait is needed (b"" at the end); None: `read_some`.
        A click's complete 302 is read this way: no coroutine per read."""
        payload = self._payload
        if _buffered(payload):
            return payload.read_nowait(-1)
        if payload.is_eof():
            return b""
        return None

    async def read_some(self) -> bytes:
        """The next body bytes (b"" at the end), each read within `timeout`."""
        payload = self._payload
        if _buffered(payload):  # no wait, no timer
            return await payload.readany()
        if payload.is_eof():
            return b""
        async with self._timeouts.timeout(self._timeout):
            return await payload.readany()

    async def iter_any(self) -> AsyncIterator[bytes]:
        payload = self._payload
        while True:
            if payload.is_eof() and not _buffered(payload):
                return
            async with self._timeouts.timeout(self._timeout):
                chunk = await payload.readany()
            if not chunk:
                return
            yield chunk


def _buffered(payload: StreamReader) -> int:
    """Body bytes the reader holds (StreamReader has no public peek; the empty reader of
    a bodiless answer holds none)."""
    buffer = getattr(payload, "_buffer", None)
    return len(buffer) if buffer else 0


class LeanClient:
    def __init__(
        self,
        *,
        connect_timeout: float,
        timeout: float,
        pool_size: int,
        keepalive: float = 30.0,
        timeouts: CoarseTimeouts | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self.timeout = timeout  # for the answer's head and each body read
        self._slots = _Slots(pool_size)
        self._pool_size = pool_size
        self._keepalive = keepalive
        self._timeouts = timeouts or CoarseTimeouts()
        self._idle: dict[str, collections.deque[Connection]] = {}
        self._live: set[Connection] = set()  # every open connection, idle or in use
        self._closed = False

    async def close(self) -> None:
        """Close every connection, in use or idle (as aiohttp's connector does): a
        forward still waiting on the backend ends with an error (the caller's 502)."""
        self._closed = True
        for conn in list(self._live):
            self._drop(conn)
        self._live.clear()
        self._idle.clear()

    def _take_idle(self, key: str) -> Connection | None:
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            conn = conns.pop()  # most recently used first: least likely closed by the backend
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                if now - conn.idle_since < self._keepalive:
                    return conn
            self._drop(conn)
        return None

    def _give_back(self, conn: Connection) -> None:
        if self._closed:
            self._drop(conn)
            return
        conn.idle_since = time.monotonic()
        conn.rest()
        conns = self._idle.setdefault(conn.key, collections.deque())
        conns.append(conn)
        while len(conns) > self._pool_size:
            self._drop(conns.popleft())

    async def exchange(
        self, url: URL, head: bytes, *, head_request: bool = False
    ) -> tuple[Answer, Connection]:
        """Send the request head; return the answer's head and its connection.

        `ConnectFailed` means nothing was sent (refused, unreachable, or the pool wait
        plus connect took longer than `connect_timeout`): another backend may take the
        request. The caller must `release` the connection when done, whatever happened.
        """
        if url.scheme != "http":
            raise ValueError("the lean client speaks plain HTTP only")
        key = _key(url)
        if not self._slots.take_now():  # all in use: wait for one, bounded
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._slots.take()
            except TimeoutError as exc:
                raise ConnectFailed("no free backend connection in time", timeout=True) from exc
        try:
            conn = self._take_idle(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(url, key)
            try:
                async with self._timeouts.timeout(self.timeout):
                    try:
                        message, payload = await conn.send(head, head_request=head_request)
                    except BackendClosed:
                        if not reused or conn.got_bytes:
                            raise
                        # a kept-alive connection the backend had closed: once more, fresh
                        self._drop(conn)
                        conn = await self._connect(url, key)
                        message, payload = await conn.send(head, head_request=head_request)
            except BaseException:
                self._drop(conn)
                raise
        except BaseException:
            self._slots.give()
            raise
        return self.answer(message, payload), conn

    def answer(self, message: RawResponseMessage, payload: StreamReader) -> Answer:
        return Answer(message, payload, self.timeout, self._timeouts)

    def send_now(self, url: URL, head: bytes, waiter: AnswerWaiter) -> Connection | None:
        """`exchange` for a bodiless GET when it needs no wait: a free slot and an idle
        pooled connection to `url` (else None, nothing done). The answer's head, or the
        connection's failure, goes to `waiter`; the caller must `release` the connection
        (or `discard` it), whatever happened. No retry here: a pooled connection the
        backend had closed fails with nothing received (`Connection.got_bytes`), and the
        caller may try again through `exchange`."""
        key = _key(url)
        if self._closed or not self._idle.get(key) or not self._slots.take_now():
            return None
        conn = self._take_idle(key)
        if conn is None:
            self._slots.give()
            return None
        conn.send_to(head, waiter)
        return conn

    def discard(self, conn: Connection) -> None:
        """Close the connection and free its slot (an exchange given up)."""
        conn.rest()  # its waiter hears nothing more, not even the close
        self._drop(conn)
        self._slots.give()

    async def _connect(self, url: URL, key: str) -> Connection:
        loop = asyncio.get_running_loop()
        host, port = url.raw_host or "", url.port or 80
        try:
            async with asyncio.timeout(self._connect_timeout):
                _transport, conn = await loop.create_connection(
                    lambda: Connection(loop, key), host, port
                )
        except TimeoutError as exc:
            raise ConnectFailed(f"connect to {key} timed out", timeout=True) from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {key}: {exc}", timeout=False) from exc
        if self._closed:
            self._drop(conn)
            raise ConnectFailed("the client is closed", timeout=False)
        self._live.add(conn)
        return conn

    def release(self, conn: Connection) -> None:
        """Pool the connection if its answer was read to the end, else close it."""
        try:
            if conn.finished_cleanly():
                self._give_back(conn)
            else:
                self._drop(conn)
        finally:
            self._slots.give()

    def _drop(self, conn: Connection) -> None:
        self._live.discard(conn)
        if conn.transport is not None:
            conn.transport.close()


def _key(url: URL) -> str:
    return f"{url.raw_host}:{url.port}"


class _Slots:
    """The connections a client may have in use at once: a semaphore that can also be
    taken without awaiting (`take_now`). Waiters are served first come, first served."""

    __slots__ = ("_free", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def take_now(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.take_now():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot just as it was cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to it, `_free` unchanged
                return
        self._free += 1


def header_block(headers: CIMultiDict[str]) -> str:
    """The header block of a forwarded request as aiohttp's client writes it: Host
    first, then the other fields in their order, and the blank line."""
    fields = "".join(
        [f"{name}: {value}\r\n" for name, value in headers.items() if name.lower() != "host"]
    )
    return f"Host: {headers['Host']}\r\n{fields}\r\n"


def request_head(method: str, target: str, block: str) -> bytes:
    """The request line (`target`: path and query, percent-encoded) and the header
    block (`header_block`), as one buffer (UTF-8)."""
    return f"{method} {target} HTTP/1.1\r\n{block}".encode("utf-8", "surrogateescape")
