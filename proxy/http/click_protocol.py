"""The lean click protocol: the common click served without aiohttp's server machinery.

Most of what reaches the edge is one kind of request: a bodiless `GET /c/<id>` for a
known, serving host, which the backend answers with a small 302. aiohttp's server
spends most of a keep-alive click's Python time on that (a Request and a Response
object, middlewares, the handler task's bookkeeping, a payload writer). This protocol
sits in front of aiohttp's `RequestHandler` on each connection of the click listeners
and serves exactly that kind of request itself:

* a request whose head arrived whole in the bytes at hand (nothing after it) is parsed
  by aiohttp's own C request parser (llhttp), with the same limits as aiohttp's;
* it is a lean click when it is a `GET` or `HEAD` in HTTP/1.1 without a body (no
  Content-Length, Transfer-Encoding, Expect or Upgrade) and the edge's checks
  (`app.decide`: Host, target, ACME challenge, 421, suspension) and the host's policy
  (`HostPolicy.forwards`: association files, HTTPS upgrade; a host whose view is not in
  memory is read first, single-flight, as aiohttp's handler would read it) say
  "forward". The forward is `Forwarder.handle_lean`: the same per-source bound,
  deadline, cancellation when the client leaves, headers, failover and error answers
  as aiohttp's path, over the lean client; HSTS comes from `HostPolicy.hsts`. When
  nothing needs a wait (the host's view and HSTS in memory, an idle pooled backend
  connection, a free slot), `Forwarder.forward_now` forwards a GET without a task:
  the request leaves from this `data_received`, and a whole answer is written from the
  backend connection's (`_DirectClick`); the rest of such a click (a body still
  arriving, a failure, a timeout) finishes in a task, as `handle_lean` would;
* the answer leaves in one write when the backend's answer is complete (a click's
  302), framed as aiohttp frames a relayed answer (`_RelayedResponse`): the same
  fields in the same order, Date, `Server: linkedge` unless the backend sent one,
  chunked when the backend gave no length.

Anything else — a partial head, pipelined requests, a body, HTTP/1.0, Expect,
upgrades, challenges, association files, redirects the edge makes itself, 400s, 421s,
503s, an https backend, an access log being written — is
handed, at that request's first byte, to aiohttp's `RequestHandler` (the listeners'
`BoundedHandler`) on the same transport, which then serves the connection to its end:
behaviour stays exactly aiohttp's. Because a lean click never waits for more header
bytes, the header deadline is the handler's; the idle timeout (`listen.idle_timeout`,
from the connection's start and after each answer), the per-source and per-worker
caps (the connection registers with `ConnectionLimits` like a handler; it is idle
between clicks and busy during one) and the drain on SIGTERM (it registers with
aiohttp's `web.Server` like a handler) hold on the lean path too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

from aiohttp import HttpVersion11, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time, should_remove_content_length
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http import app as http_app
from proxy.http.app import MAX_HEADERS, Step, decide
from proxy.http.forward import (
    HOP_BY_HOP,
    DirectClick,
    ForwardedMemo,
    LeanResponder,
    MalformedAnswer,
    connection_listed,
    failing,
)
from proxy.http.host_policy import HSTS, HostPolicy
from proxy.http.lean_client import Answer
from proxy.wire.peers import connection_client, source_key

log = logging.getLogger(__name__)

# The backend's HSTS field, as the relay's one pass meets it (the edge sets its own).
_HSTS_LOWER = HSTS.lower()
# Fields that make a GET more than a lean click (a body, a 100-continue, an upgrade).
_NOT_LEAN = ("Content-Length", "Transfer-Encoding", "Expect", "Upgrade")
# Bytes buffered while a click is being answered (pipelined requests) before reading pauses.
_MAX_BUFFERED = 2**16
# A request line read without aiohttp's parser, behind a header block it accepted before:
# GET or HEAD, an origin-form target of RFC 3986's characters only (no fragment, nothing
# llhttp could refuse or read differently), HTTP/1.1. Anything else goes to the parser.
_LEAN_REQUEST_LINE = re.compile(rb"(GET|HEAD) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*) HTTP/1\.1")
# The longest header block kept for the connection's next request (a browser's is ~1 KiB).
_MAX_KEPT_BLOCK = 8192


class LeanForwarding(Protocol):
    def lean_ready(self) -> bool: ...

    def forward_now(
        self, request: web.Request, respond: LeanResponder, click: DirectClick
    ) -> bool: ...

    async def handle_lean(self, request: web.Request, respond: LeanResponder) -> bool: ...


class ConnectionBook(Protocol):
    """`proxy/tls/connections.ConnectionLimits`, as far as this protocol uses it."""

    def opened(self, conn: Any) -> None: ...

    def touched(self, conn: Any) -> None: ...

    def closed(self, conn: Any) -> None: ...


class ClickPaths:
    """What every lean connection of a worker shares (built once by the wiring)."""

    def __init__(
        self,
        *,
        forwarding: LeanForwarding,
        is_suspended: Callable[[str], bool],
        policy: HostPolicy | None,
        fallback: Callable[[], asyncio.Protocol],
        limits: ConnectionBook,
        server: web.Server,
        idle_timeout: float,
        access_logged: Callable[[], bool] = lambda: False,
        release_transport: Callable[[object], None] = lambda _transport: None,
    ) -> None:
        self.forwarding = forwarding
        self.is_suspended = is_suspended
        self.policy = policy
        self.fallback = fallback
        self.limits = limits
        self.server = server
        self.idle_timeout = idle_timeout
        self.access_logged = access_logged  # aiohttp writes the access log: hand off all
        self.release_transport = release_transport
        self.stats = ClickStats()

    def protocol_factory(self) -> Callable[[], asyncio.Protocol]:
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            return LeanClickProtocol(self, loop)

        return factory


class ClickStats:
    __slots__ = ("lean", "direct", "handed_off")

    def __init__(self) -> None:
        self.lean = 0  # clicks answered by the lean protocol
        self.direct = 0  # clicks forwarded without a task (`Forwarder.forward_now`)
        self.handed_off = 0  # connections handed to aiohttp's RequestHandler


class _Head(dict[Any, Any]):
    """A request as the shared rule functions read it (`app.decide`, `checked_host`,
    `forwarded_headers`, `HostPolicy`, the forwarder): the attributes of `web.Request`
    they use, from the parsed head. A dict, as `checked_host` caches on the request."""

    __slots__ = (
        "method",
        "raw_path",
        "version",
        "headers",
        "transport",
        "protocol",
        "secure",
        "host",
        "read_view",
        "keep_alive",
        "client",
        "raw_headers",
    )

    body_exists = False
    content_length = None

    def __init__(self, method: str, path: str, fields: _Fields, conn: LeanClickProtocol) -> None:
        super().__init__()
        self.method = method
        self.raw_path = path
        self.version = HttpVersion11
        self.headers: CIMultiDictProxy[str] = fields.headers
        self.transport = conn.transport
        self.protocol = conn
        self.secure = conn.secure
        self.keep_alive = fields.keep_alive  # no `Connection: close` from the client
        self.client = conn.client  # `client_address`, once per connection
        self.raw_headers = fields.raw_headers  # the key of `forwarded_memo`
        self.host = ""  # the checked host's lookup name (app.decide)
        self.read_view = False  # its view must be read before the policy can say


class _Fields:
    """A lean click's header block as aiohttp's parser read it, kept for the connection's
    next request: a client sends the same block with every request on a kept-alive
    connection, and a request whose block is byte for byte the same needs only its
    request line read (`_lean_click`)."""

    __slots__ = ("block", "headers", "raw_headers", "keep_alive")

    def __init__(self, block: bytes, message: RawRequestMessage) -> None:
        self.block = block  # from the request line's CRLF to the blank line's end
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw_headers = message.raw_headers
        self.keep_alive = not message.should_close


class LeanClickProtocol(asyncio.Protocol):
    def __init__(self, paths: ClickPaths, loop: asyncio.AbstractEventLoop) -> None:
        self._paths = paths
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.secure = False
        self._source = ""
        self.client: str | None = None  # the client's address (after a PROXY header)
        self._parser: HttpRequestParser | None = None
        self._fields: _Fields | None = None  # the last lean click's header block, parsed
        self._buffer = b""  # what arrived while a click was being answered
        self._paused = False
        self._busy = False
        self._closing = False  # drain: close after the click in progress
        self._handed_off = False
        self._task: asyncio.Task[None] | None = None
        self._direct: _DirectClick | None = None  # a click forwarded without a task
        self._idle_handle: asyncio.TimerHandle | None = None
        self._last_used = 0.0
        self._lost_callbacks: list[Callable[[], object]] = []
        self.forwarded_memo = ForwardedMemo()  # the last click's header block (Forwarder)
        self._task_handler = None  # web.Server.connection_lost looks for a handler task
        self.opened_at = 0.0

    # -- what ConnectionLimits and web.Server ask -----------------------------------------

    @property
    def source(self) -> str:
        return self._source

    def stage(self) -> int:
        """0: idle (waiting for a request), 2: answering one (never 1: a partial request
        head is aiohttp's, with its header deadline)."""
        return 2 if self._busy else 0

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def call_when_lost(self, callback: Callable[[], object]) -> Callable[[], None]:
        self._lost_callbacks.append(callback)

        def remove() -> None:
            if callback in self._lost_callbacks:
                self._lost_callbacks.remove(callback)

        return remove

    def close(self) -> None:
        """Drain: close now if idle, else after the click in progress."""
        self._closing = True
        if not self._busy and self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 (web.Server's call)
        direct = self._direct
        if direct is not None:  # may go on in a task (then awaited below)
            await asyncio.wait({direct.over()}, timeout=timeout)
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()

    # -- asyncio protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        paths = self._paths
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        if paths.access_logged():  # the access log is aiohttp's: everything goes there
            self._hand_off(b"", registered=False)
            return
        self.secure = transport.get_extra_info("sslcontext") is not None
        self.client = connection_client(transport)
        self._source = source_key(self.client or "")
        self.opened_at = self._last_used = self._loop.time()
        paths.server.connection_made(self, transport)  # type: ignore[arg-type]
        self._idle_handle = self._loop.call_at(
            self._last_used + paths.idle_timeout, self._idle_check
        )
        paths.limits.opened(self)  # may close this connection at once (over a cap)

    def data_received(self, data: bytes) -> None:
        if self._handed_off or self._closing:
            return
        if self._busy:  # pipelined: aiohttp's, once this click is answered
            self._buffer += data
            if len(self._buffer) > _MAX_BUFFERED and not self._paused and self.transport:
                self._paused = True
                self.transport.pause_reading()
            return
        self._serve_bytes(data)

    def eof_received(self) -> bool | None:
        return None  # close, as aiohttp's handler does

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._handed_off:
            return
        self._busy = False
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        paths = self._paths
        paths.limits.closed(self)
        paths.server.connection_lost(self, exc)  # type: ignore[arg-type]
        callbacks, self._lost_callbacks = self._lost_callbacks, []
        for callback in callbacks:  # the forward in flight is cancelled
            try:
                callback()
            except Exception:
                log.exception("connection-lost callback failed")
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        if self._direct is not None:  # its forward was called off by the callbacks above
            self._direct.finished()
        transport, self.transport = self.transport, None
        paths.release_transport(transport)

    # -- one click -------------------------------------------------------------------------

    def _serve_bytes(self, data: bytes) -> None:
        head = self._lean_click(data)
        if head is None:
            self._hand_off(data)
            return
        self._busy = True
        paths = self._paths
        paths.limits.touched(self)
        respond = _Responder(self, head)
        forwarding: Callable[[], Coroutine[Any, Any, bool]] | None = None
        if not head.read_view:
            click = _DirectClick(self, head, data, respond)
            try:
                if paths.forwarding.forward_now(cast(web.Request, head), respond, click):
                    self._direct = click
                    paths.stats.direct += 1
                    return
            except Exception as exc:  # a bug of ours: the task's handling (logged, 500)
                forwarding = functools.partial(failing, exc)
        if forwarding is None:
            forwarding = functools.partial(self._forward, head, respond)
        self._task = self._loop.create_task(self._complete(forwarding, data, respond))

    def _lean_click(self, data: bytes) -> _Head | None:
        """The parsed request when it is a lean click, else None (aiohttp's)."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or end + 4 != len(data):  # partial, pipelined or with a body
            return None
        line_end = data.find(b"\r\n")
        fields = self._fields
        if fields is not None and data[line_end:] == fields.block:
            line = _LEAN_REQUEST_LINE.fullmatch(data, 0, line_end)
            if line is not None:  # the block was accepted as it is: only the line is new
                return self._decided(_Head(line[1].decode(), line[2].decode(), fields, self))
        parser = self._parser
        if parser is None:
            parser = self._parser = HttpRequestParser(
                BaseProtocol(self._loop),  # would pace a body's stream: lean clicks have none
                self._loop,
                2**16,
                max_headers=MAX_HEADERS,  # aiohttp's own limits: a refusal is its 400
                payload_exception=HttpProcessingError,
            )
        try:
            messages, upgraded, _tail = parser.feed_data(data)
        except HttpProcessingError:
            self._parser = None  # its state is unknown now; aiohttp answers the 400
            return None
        if len(messages) != 1 or upgraded:
            return None
        message = messages[0][0]
        if (
            message.method not in ("GET", "HEAD")
            or message.version != HttpVersion11
            or message.upgrade
            or message.chunked
        ):
            return None
        headers = message.headers
        for name in _NOT_LEAN:
            if name in headers:
                return None
        block = data[line_end:]
        fields = _Fields(block, message)
        self._fields = fields if len(block) <= _MAX_KEPT_BLOCK else None
        return self._decided(_Head(message.method, message.path, fields, self))

    def _decided(self, head: _Head) -> _Head | None:
        """The request when the edge's checks and the host's policy say "forward"."""
        request = cast(web.Request, head)  # the attributes the rule functions read
        paths = self._paths
        step, host = decide(request, paths.is_suspended)
        if step is not Step.FORWARD:
            return None
        if paths.policy is not None:
            forwards = paths.policy.forwards(request, host)
            if forwards is False:
                return None
            head.host = host
            head.read_view = forwards is None  # not in memory: read first, as aiohttp would
        if not paths.forwarding.lean_ready():
            return None
        return head

    async def _forward(self, head: _Head, respond: _Responder) -> bool:
        """The click forwarded in this task: False, nothing sent (aiohttp's then)."""
        request = cast(web.Request, head)
        paths = self._paths
        if head.read_view and paths.policy is not None:
            # the host's view was not in memory (a first click, a change): read it
            # (single-flight) and decide again; nothing was sent yet
            if not await paths.policy.forwards_after_reading(request, head.host):
                return False
        return await paths.forwarding.handle_lean(request, respond)

    async def _complete(
        self, forwarding: Callable[[], Coroutine[Any, Any, bool]], data: bytes, respond: _Responder
    ) -> None:
        """Run the click's forwarding (this task's), then end the click as it says."""
        try:
            taken = await forwarding()
        except asyncio.CancelledError:
            return  # the client left (connection_lost) or the drain's deadline
        except Exception:
            # a bug of ours, as aiohttp would log a handler's exception: a 500 if we can
            log.exception("Error handling request (lean click)")
            if not respond.started:
                await respond.edge(web.Response(status=500, text="500 Internal Server Error"))
            respond.cut()
            return
        finally:
            self._task = None
        if not taken:  # nothing was sent: aiohttp's client (an https backend)
            self._busy = False
            self._hand_off(data + self._buffer)
            return
        self._answered(respond)

    def _answered(self, respond: _Responder) -> None:
        """A click is answered: the connection waits for the next one (or closes)."""
        self._paths.stats.lean += 1
        self._busy = False
        transport = self.transport
        if transport is None:
            return
        if respond.close_after or self._closing:
            transport.close()
            return
        self._last_used = self._loop.time()
        if self._buffer:
            data, self._buffer = self._buffer, b""
            if self._paused:
                self._paused = False
                transport.resume_reading()
            self._serve_bytes(data)

    def _idle_check(self) -> None:
        """aiohttp's keep-alive timer: one handle re-armed lazily, not one per click."""
        self._idle_handle = None
        transport = self.transport
        if transport is None or self._handed_off:
            return
        now = self._loop.time()
        due = self._last_used + self._paths.idle_timeout
        if self._busy:  # a click in progress is bounded by the forward's deadline
            due = now + self._paths.idle_timeout
        if now < due:
            self._idle_handle = self._loop.call_at(due, self._idle_check)
            return
        transport.close()

    def _hand_off(self, data: bytes, *, registered: bool = True) -> None:
        """aiohttp's RequestHandler serves this connection from here on, starting with
        `data` (a request's first bytes, or nothing)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client left meanwhile
        self._handed_off = True
        self._paths.stats.handed_off += 1
        handler = self._paths.fallback()
        if registered:
            if self._idle_handle is not None:
                self._idle_handle.cancel()
                self._idle_handle = None
            # the handler takes this connection's place in ConnectionLimits (a new
            # connection there could evict another one)
            handler.taking_over = self  # type: ignore[attr-defined]
            self._paths.server.connection_lost(self, None)  # type: ignore[arg-type]
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data and not transport.is_closing():
            handler.data_received(data)
        if self._paused:
            self._paused = False
            transport.resume_reading()
        self.transport = None


class _DirectClick:
    """A click `Forwarder.forward_now` took (no task): what became of it."""

    __slots__ = ("_conn", "_head", "_data", "_respond", "_over")

    def __init__(
        self, conn: LeanClickProtocol, head: _Head, data: bytes, respond: _Responder
    ) -> None:
        self._conn = conn
        self._head = head
        self._data = data
        self._respond = respond
        self._over: asyncio.Future[None] | None = None  # made if the drain waits for it

    def done(self) -> None:
        self.finished()
        self._conn._answered(self._respond)  # noqa: SLF001 (the connection's own)

    def adopt(self, rest: Callable[[], Coroutine[Any, Any, bool]]) -> None:
        conn = self._conn
        self.finished()
        finish = conn._complete(rest, self._data, self._respond)  # noqa: SLF001
        conn._task = conn._loop.create_task(finish)  # noqa: SLF001

    def retry(self) -> None:
        self.adopt(functools.partial(self._conn._forward, self._head, self._respond))  # noqa: SLF001

    def over(self) -> asyncio.Future[None]:
        """Done once the connection is no longer waiting on this click without a task."""
        if self._over is None:
            self._over = self._conn._loop.create_future()  # noqa: SLF001
            if self._conn._direct is not self:  # noqa: SLF001
                self._over.set_result(None)
        return self._over

    def finished(self) -> None:
        if self._conn._direct is self:  # noqa: SLF001
            self._conn._direct = None  # noqa: SLF001
        if self._over is not None and not self._over.done():
            self._over.set_result(None)


class _Responder:
    """Writes a lean click's answer as aiohttp would have framed it (see the module doc)."""

    __slots__ = ("_conn", "_head", "started", "close_after", "status")

    def __init__(self, conn: LeanClickProtocol, head: _Head) -> None:
        self._conn = conn
        self._head = head
        self.started = False
        self.close_after = False
        self.status = 0

    async def _hsts(self) -> str | None:
        policy = self._conn._paths.policy  # noqa: SLF001 (the connection's own paths)
        return await policy.hsts(cast(web.Request, self._head)) if policy is not None else None

    async def edge(self, response: web.Response) -> None:
        """The edge's own short answer (429, 502, 504, 500): `web.Response`'s framing."""
        body = response.body if isinstance(response.body, bytes) else b""
        headers: CIMultiDict[str] = CIMultiDict(response.headers)
        headers["Content-Length"] = str(len(body))
        if self._head.method == "HEAD":  # the length of the GET's answer, no body
            body = b""
        self._finish_headers(headers, response.status, bool(body))
        hsts = await self._hsts()
        self._add_hsts(headers, hsts)
        self.status = response.status
        self.started = True
        # these answers say `Connection: close`: the connection ends after them
        if headers.get("Connection", "").lower() == "close":
            self.close_after = True
        self._write(_head_bytes(response.status, response.reason, headers) + body)

    def relay_complete(self, answer: Answer) -> bool:
        """`relay` without waiting, when the whole answer is here and its HSTS is known
        from memory: True once written; False, nothing done (then `relay`)."""
        if not answer.complete():
            return False
        policy = self._conn._paths.policy  # noqa: SLF001 (the connection's own paths)
        known, hsts = policy.hsts_now(cast(web.Request, self._head)) if policy else (True, None)
        if not known:
            return False
        parts, empty, framed = self._relayed_head(answer, hsts)
        while chunk := answer.read_now():
            if not empty:
                parts.append(b"%x\r\n%b\r\n" % (len(chunk), chunk) if framed else chunk)
        if framed:
            parts.append(b"0\r\n\r\n")
        self._write(b"".join(parts))
        return True

    def _relayed_head(self, answer: Answer, hsts: str | None) -> tuple[list[bytes], bool, bool]:
        """The answer's head as aiohttp frames it (`_relay`, then `_finish_headers` and
        `_add_hsts` on its fields: the same fields in the same order, made in one pass
        over the backend's); whether its body is dropped, chunked."""
        status = answer.status
        method = self._head.method
        upstream = answer.headers
        empty = must_be_empty_body(method, status)
        # `_relay` enables chunking when the backend gave no length (not for HEAD)
        chunked = not empty and "Content-Length" not in upstream and method != "HEAD"
        drop_length = empty and should_remove_content_length(method, status)
        listed = connection_listed(upstream)
        fields: list[tuple[str, str]] = []
        length: str | None = None
        typed = dated = served = False
        for name, value in upstream.items():
            lname = name.lower()
            if lname in HOP_BY_HOP or lname in listed or lname == _HSTS_LOWER:
                continue  # Transfer-Encoding among them; the HSTS is the edge's
            if lname == "content-length":
                if drop_length:
                    continue
                if length is None:
                    length = value
            elif lname == "content-type":
                typed = True
            elif lname == "date":
                dated = True
            elif lname == "server":
                served = True
            fields.append((name, value))
        if chunked:
            fields.append(("Transfer-Encoding", "chunked"))
        if not empty and not typed and (chunked or length != "0"):
            fields.append(("Content-Type", "application/octet-stream"))
        if not dated:
            fields.append(("Date", rfc822_formatted_time()))
        if not served:
            fields.append(("Server", http_app.SERVER))
        if not self._head.keep_alive:
            self.close_after = True
            fields.append(("Connection", "close"))
        if hsts is not None:
            fields.append((HSTS, hsts))
        try:
            head = _head_bytes(status, answer.reason, _FieldList(fields))
        except ValueError:  # a control character, which the serializer refuses
            raise MalformedAnswer("a control character in the answer's head") from None
        self.started = True  # from here a failure cuts the connection (as `_relay`'s)
        self.status = status
        return [head], empty, chunked

    async def relay(self, answer: Answer) -> None:
        """The backend's answer, streamed; one write when it is complete already."""
        parts, empty, framed = self._relayed_head(answer, await self._hsts())
        try:
            while True:
                chunk = answer.read_now()
                if chunk is None:  # the rest is not here yet: send what is, then wait
                    if parts:
                        self._write(b"".join(parts))
                        parts = []
                    chunk = await answer.read_some()
                if not chunk:
                    break
                if empty:
                    continue
                parts.append(b"%x\r\n%b\r\n" % (len(chunk), chunk) if framed else chunk)
        except Exception as exc:  # ClientPayloadError, TimeoutError, ...
            # as `_relay`: the head is out, so cut the connection (a truncated answer)
            log.warning("backend failed mid-response for %s: %s", self._head.raw_path, exc)
            if parts:
                self._write(b"".join(parts))
            self.cut()
            return
        if framed:
            parts.append(b"0\r\n\r\n")
        if parts:
            self._write(b"".join(parts))

    def cut(self) -> None:
        self.close_after = True
        transport = self._conn.transport
        if transport is not None:
            transport.close()

    def _finish_headers(self, headers: CIMultiDict[str], status: int, has_body: bool) -> None:
        # aiohttp's StreamResponse._prepare_headers for an HTTP/1.1 request, then the
        # app's on_response_prepare hooks (Server; HSTS in _add_hsts)
        if has_body:
            headers.setdefault("Content-Type", "application/octet-stream")
        if "Date" not in headers:
            headers["Date"] = rfc822_formatted_time()
        headers.setdefault("Server", http_app.SERVER)
        if not self._head.keep_alive:
            self.close_after = True
            if "Connection" not in headers:
                headers["Connection"] = "close"

    @staticmethod
    def _add_hsts(headers: CIMultiDict[str], value: str | None) -> None:
        headers.popall(HSTS, None)
        if value is not None:
            headers[HSTS] = value

    def _write(self, data: bytes) -> None:
        transport = self._conn.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)


class _FieldList(list[tuple[str, str]]):
    """Header fields as aiohttp's serializer reads them (it only calls `items`): the
    relayed head needs no multidict built to be written out."""

    __slots__ = ()

    def items(self) -> _FieldList:
        return self


def _head_bytes(status: int, reason: str, headers: CIMultiDict[str] | _FieldList) -> bytes:
    # aiohttp's own serializer (the C one when built): the same bytes as its answers;
    # it refuses control characters, which aiohttp's lenient answer parser lets through
    serialize = cast(Callable[[str, object], bytes], _serialize_headers)
    return serialize(f"HTTP/1.1 {status} {reason}", headers)


__all__ = ["ClickPaths", "ClickStats", "LeanClickProtocol"]
