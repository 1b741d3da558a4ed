"""Forwarding clicks to the tracking backend.

The edge is transparent for the click: method, path and query (byte for byte),
Host, User-Agent, cookies and bodies pass through; redirects are relayed as the
backend sent them (a 302 stays a 302, never followed); nothing is cached. What
the edge adds is who the client is: X-Forwarded-For/-Proto/-Host and Forwarded
(RFC 7239), built from what the edge itself saw (the client after a PROXY
header, see `proxy/wire/peers.py`). Client-supplied copies are dropped, since anyone
can send them, unless the client is itself a trusted proxy
(`listen.forwarded_trusted`): then its chain is kept and the client appended.

Which backend: `proxy/http/backends.py`. A request moves on to the next healthy
backend only when connecting failed, i.e. nothing of it was sent.

Pooled backend connections are the scarce resource, so no client may hold one
for long: each read of a request body must arrive within `body_timeout` (else
408), a whole forward ends at `deadline` (504, or the response is cut), a
forward is cancelled as soon as its client goes away, and one source may have
at most `max_per_source` forwards in flight (then 429). `Expect: 100-continue`
is answered by the edge's HTTP server and never passed on: a backend that does
not answer `100` would otherwise hold the connection until it times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.counters import Counters
from proxy.http.backends import BackendPool
from proxy.http.lean_client import (
    Answer,
    BackendClosed,
    ConnectFailed,
    Connection,
    LeanClient,
    header_block,
    request_head,
)
from proxy.http.request_target import checked_host, origin_form
from proxy.wire.coarse_timeouts import CoarseTimeouts
from proxy.wire.peers import TrustedNetworks, client_address, source_key

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1 connection-specific fields, plus ones a proxy must not relay
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# answered by the edge itself (aiohttp's expect handler), never relayed
EDGE_ANSWERED = frozenset({"expect"})
TOO_MANY = "Too Many Requests: too many clicks in flight from your address"
GATEWAY_TIMEOUT = "Gateway Timeout: the tracking backend did not answer in time"
BAD_GATEWAY = "Bad Gateway: the tracking backend is unavailable"


class DirectClick(Protocol):
    """What `Forwarder.forward_now` tells the click's connection (the lean click protocol)."""

    def done(self) -> None: ...  # answered: the click is over

    # finish it in a task running `rest()` (not made at all if the task is cancelled first)
    def adopt(self, rest: Callable[[], Coroutine[Any, Any, bool]]) -> None: ...

    def retry(self) -> None: ...  # nothing was answered: forward it again, in a task


class LeanResponder(Protocol):
    """How `Forwarder.handle_lean` answers: the lean click protocol writes it."""

    @property
    def started(self) -> bool: ...  # the answer's head has been taken (cut, not 504)

    @property
    def status(self) -> int: ...  # the status answered (0: none yet)

    async def edge(self, response: web.Response) -> None: ...  # the edge's own answer

    async def relay(self, answer: Answer) -> None: ...  # the backend's answer, streamed

    def cut(self) -> None: ...  # end the connection mid-answer

    def relay_complete(self, answer: Answer) -> bool: ...  # `relay` if no wait is needed


UNTRUSTED_FORWARDING = frozenset(
    h.lower()
    for h in ("Forwarded", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Real-IP")
)


class Forwarder:
    def __init__(
        self,
        backends: BackendPool,
        *,
        connect_timeout: float = 5.0,
        timeout: float = 30.0,
        pool_size: int = 256,
        forwarded_trusted: TrustedNetworks | None = None,
        body_timeout: float = 10.0,
        deadline: float = 60.0,
        max_per_source: int = 64,
        lean_client: bool = False,
        lean_clicks: bool = False,
    ) -> None:
        self._backends = backends
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=timeout
        )
        self._pool_size = pool_size
        self._trusted = forwarded_trusted or TrustedNetworks(())
        self._session: aiohttp.ClientSession | None = None
        self._body_timeout = body_timeout
        self._deadline = deadline
        self._max_per_source = max_per_source
        self._in_flight: dict[str, int] = {}  # source -> forwards
        self._lean_wanted = lean_client  # aiohttp's requests' bodiless GETs too
        # the lean click protocol (proxy/http/click_protocol.py) forwards over it only
        self._lean_clicks = lean_clicks
        self._lean: LeanClient | None = None  # bodiless GETs, when `backend.lean_client`
        # the forward deadline and the lean client's answer timeout: no timer per click
        self._timeouts = CoarseTimeouts()
        self.stats = ForwardStats()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._pool_size, keepalive_timeout=30, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # never keep one recipient's cookies
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )
        if self._lean_wanted or self._lean_clicks:
            self._lean = LeanClient(
                connect_timeout=self._timeout.connect or 5.0,
                timeout=self._timeout.sock_read or 30.0,
                pool_size=self._pool_size,
                timeouts=self._timeouts,
            )

    async def close(self) -> None:
        if self._lean is not None:
            await self._lean.close()
        if self._session is not None:
            await self._session.close()

    def in_flight(self, source: str | None = None) -> int:
        if source is None:
            return sum(self._in_flight.values())
        return self._in_flight.get(source, 0)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None, "Forwarder.start() not awaited"
        source = self._source(request)
        if not self._admit(source):
            return _error(429, TOO_MANY)
        unwatch = self._watch(request.protocol)
        progress = _Progress()
        try:
            async with self._timeouts.timeout(self._deadline):
                return await self._forward(request, progress)
        except TimeoutError:
            self._deadline_reached(request)
            if progress.response is None:
                return _error(504, GATEWAY_TIMEOUT)
            # headers are gone already: cut the connection (a truncated response)
            if request.transport is not None:
                request.transport.close()
            return progress.response
        finally:
            if unwatch is not None:
                unwatch()
            self._leave(source)

    def lean_ready(self) -> bool:
        """Whether `handle_lean` may take a click (the lean client is running)."""
        return self._lean is not None

    async def handle_lean(self, request: web.Request, respond: LeanResponder) -> bool:
        """`handle` for the lean click protocol (a bodiless GET of a known host): the same
        per-source bound, deadline, cancellation, failover and answers, the answer written
        by `respond` instead of an aiohttp response. False: not taken, nothing was sent
        (an https backend: aiohttp's client, so the protocol hands the request to aiohttp)."""
        client: str | None = getattr(request, "client", None)  # the lean protocol's, known
        source = self._source(request, client)
        if not self._admit(source):
            await respond.edge(_error(429, TOO_MANY))
            return True
        unwatch = self._watch(request.protocol)
        try:
            async with self._timeouts.timeout(self._deadline):
                block = self._forwarded_block(request, client)
                path_qs = origin_form(request.raw_path)
                exchanged = await self._lean_exchange(request, block, path_qs)
                if exchanged is None:
                    return False
                if isinstance(exchanged, web.Response):
                    await respond.edge(exchanged)
                    return True
                answer, conn = exchanged
                assert self._lean is not None
                try:
                    await relay_or_refuse(request, respond, answer)
                finally:
                    self._lean.release(conn)
                return True
        except TimeoutError:
            await self._deadline_answer(request, respond)
            return True
        finally:
            if unwatch is not None:
                unwatch()
            self._leave(source)

    def forward_now(
        self,
        request: web.Request,
        respond: LeanResponder,
        click: DirectClick,
        ended: Callable[[], None] = lambda: None,
    ) -> bool:
        """`handle_lean` for a GET without a task, when nothing needs a wait: the source
        is under its bound, the first backend is plain HTTP and has an idle pooled
        connection and a free slot. The answer is relayed from inside the backend
        connection's `data_received` when it is whole; anything else (a body still
        arriving, a failure, the deadline) finishes in a task through `click`. False:
        not taken, nothing done. `ended` is called once the forward is over."""
        lean = self._lean
        if lean is None or request.method != "GET":
            return False
        client: str | None = getattr(request, "client", None)  # the lean protocol's, known
        source = self._source(request, client)
        if self._in_flight.get(source, 0) >= self._max_per_source:
            return False  # handle_lean answers the 429
        candidates = self._backends.next_candidates()
        if not candidates:
            return False
        base = _parsed_base(candidates[0].base)
        if base.scheme != "http":
            return False
        block = self._forwarded_block(request, client)
        head = request_head("GET", backend_target(base, origin_form(request.raw_path)), block)
        forward = _DirectForward(self, lean, request, respond, click, source, ended)
        conn = lean.send_now(base, head, forward)
        if conn is None:
            return False
        self._backends.rotate()  # as `candidates` would have
        self._admit(source)  # under the bound: checked above
        forward.begin(conn)
        return True

    def _forwarded_block(self, request: web.Request, client: str | None) -> str:
        """The header block the backend gets for a lean click (`forwarded_headers`),
        reused from the connection's previous click when it is made from the same
        fields: a browser or a load client sends the same header block with every
        request on a kept-alive connection, and nothing else it depends on changes
        within a connection (the key holds the client, TLS and the trusted networks;
        an absolute-form target, whose authority is the Host, is never reused)."""
        memo: ForwardedMemo | None = getattr(request.protocol, "forwarded_memo", None)
        raw: tuple[tuple[bytes, bytes], ...] | None = getattr(request, "raw_headers", None)
        if memo is None or raw is None or not request.raw_path.startswith("/"):
            return header_block(forwarded_headers(request, self._trusted, client))
        key = (raw, client, request.secure, self._trusted)
        if memo.key != key:
            memo.block = header_block(forwarded_headers(request, self._trusted, client))
            memo.key = key
        return memo.block

    def _admit(self, source: str) -> bool:
        """One more forward for `source`, unless it has `max_per_source` in flight."""
        count = self._in_flight.get(source, 0)
        if count >= self._max_per_source:
            self.stats.per_source_limited += 1
            return False
        self._in_flight[source] = count + 1
        return True

    def _leave(self, source: str) -> None:
        remaining = self._in_flight[source] - 1
        if remaining:
            self._in_flight[source] = remaining
        else:
            del self._in_flight[source]

    def _watch(self, protocol: object) -> Callable[[], None] | None:
        """The client going away cancels the forward, which frees the backend connection."""
        task = asyncio.current_task()
        when_lost = getattr(protocol, "call_when_lost", None)
        if task is None or when_lost is None:
            return None
        unwatch: Callable[[], None] = when_lost(lambda: self._client_left(task))
        return unwatch

    async def _deadline_answer(self, request: web.Request, respond: LeanResponder) -> None:
        """A lean forward reached its deadline: a 504, or the connection cut when the
        answer had started."""
        self._deadline_reached(request)
        if not respond.started:
            await respond.edge(_error(504, GATEWAY_TIMEOUT))
        else:  # headers are gone already: a truncated response
            respond.cut()

    def _deadline_reached(self, request: web.Request) -> None:
        self.stats.deadlines += 1
        log.warning("forward deadline reached for %s %s", request.method, request.raw_path)

    def _client_left(self, task: asyncio.Task[object]) -> None:
        if not task.done():
            self.stats.cancelled += 1
            task.cancel()

    def _source(self, request: web.Request, client: str | None = None) -> str:
        """Whose forwards these are: the client; behind a trusted proxy, the client it names.
        `client`: the request's `client_address`, when the caller knows it."""
        client = client or client_address(request) or ""
        if client and client in self._trusted:
            chain = request.headers.getall("X-Forwarded-For", ())
            named = chain[-1].split(",")[-1].strip() if chain else ""
            if named:
                return "via " + source_key(named)
        return source_key(client)

    async def _forward(self, request: web.Request, progress: _Progress) -> web.StreamResponse:
        assert self._session is not None
        headers = forwarded_headers(request, self._trusted)
        body = _Body(request.content, self._body_timeout) if request.body_exists else None
        path_qs = origin_form(request.raw_path)  # absolute-form: path and query only
        if (
            self._lean is not None
            and body is None
            and request.method == "GET"
            and "Host" in headers
        ):
            answered = await self._forward_lean(request, header_block(headers), path_qs, progress)
            if answered is not None:
                return answered
        for backend in self._backends.candidates():
            url = backend_url(backend.base, path_qs)
            try:
                upstream = await self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=body.stream() if body is not None else None,
                    allow_redirects=False,
                    compress=None,
                )
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Nothing was sent, so the next backend may have the request; unless
                # the body had started to stream (it cannot be read twice).
                log.warning("cannot connect to backend %s: %s", backend.base, exc)
                if isinstance(exc, aiohttp.ClientConnectorError):
                    # Refused, unreachable: the backend's fault. A timeout may also be
                    # our own pool being full (aiohttp's connect timeout includes the
                    # wait for a free connection), so that is left to the health checks.
                    self._backends.connect_failed(backend, exc)
                if body is not None and body.started:
                    break
                continue
            except (TimeoutError, aiohttp.ClientError) as exc:
                if body is not None and body.timed_out:
                    self.stats.body_timeouts += 1
                    return _error(408, "Request Timeout: the request body stopped arriving")
                if isinstance(exc, TimeoutError):
                    log.warning("backend timeout for %s %s", request.method, request.raw_path)
                    return _error(504, GATEWAY_TIMEOUT)
                log.warning("backend error for %s %s: %s", request.method, request.raw_path, exc)
                return _error(502, BAD_GATEWAY)
            async with upstream:
                return await _relay(request, upstream, progress)
        return _error(502, BAD_GATEWAY)

    async def _forward_lean(
        self,
        request: web.Request,
        block: str,
        path_qs: str,
        progress: _Progress,
    ) -> web.StreamResponse | None:
        """`_forward` for a bodiless GET over the lean client: same failover and answers.
        None: an https backend, left to aiohttp's client."""
        exchanged = await self._lean_exchange(request, block, path_qs)
        if exchanged is None or isinstance(exchanged, web.Response):
            return exchanged
        answer, conn = exchanged
        assert self._lean is not None
        try:
            return await _relay(request, answer, progress)  # type: ignore[arg-type]
        finally:
            self._lean.release(conn)

    async def _lean_exchange(
        self, request: web.Request, block: str, path_qs: str
    ) -> tuple[Answer, Connection] | web.Response | None:
        """The backend's answer head over the lean client (the caller releases the
        connection), or the edge's error answer; None: an https backend."""
        assert self._lean is not None
        for backend in self._backends.candidates():
            base = _parsed_base(backend.base)
            if base.scheme != "http":
                return None  # https backends: aiohttp's client
            try:
                answer, conn = await self._lean.exchange(
                    base,  # where to connect; the path is in the head
                    request_head(request.method, backend_target(base, path_qs), block),
                    head_request=request.method == "HEAD",
                )
            except ConnectFailed as exc:
                log.warning("cannot connect to backend %s: %s", backend.base, exc)
                if not exc.timeout:  # as in _forward: a timeout may be our own full pool
                    self._backends.connect_failed(backend, OSError(str(exc)))
                continue
            except TimeoutError:
                log.warning("backend timeout for %s %s", request.method, request.raw_path)
                return _error(504, GATEWAY_TIMEOUT)
            except (aiohttp.ClientError, OSError) as exc:
                log.warning("backend error for %s %s: %s", request.method, request.raw_path, exc)
                return _error(502, BAD_GATEWAY)
            return answer, conn
        return _error(502, BAD_GATEWAY)


class _DirectForward:
    """One `Forwarder.forward_now` click, from its request's `send` to its end.

    The same bounds as `handle_lean`: the forward deadline and the backend's answer
    timeout (one coarse timer for the earlier of the two until the answer's head is
    here), the client leaving (the backend connection is closed), the per-source count,
    and the same answers: the backend's, 504 on a timeout, 502 on a failed or malformed
    answer. A pooled connection that the backend had closed without a byte of answer is
    the one failure that is retried: through `handle_lean`, like `LeanClient.exchange`.
    """

    __slots__ = (
        "_forwarder",
        "_lean",
        "_request",
        "_respond",
        "_click",
        "_source",
        "_ended",
        "_conn",
        "_tick",
        "_unwatch",
        "_started",
        "_over",
    )

    def __init__(
        self,
        forwarder: Forwarder,
        lean: LeanClient,
        request: web.Request,
        respond: LeanResponder,
        click: DirectClick,
        source: str,
        ended: Callable[[], None],
    ) -> None:
        self._forwarder = forwarder
        self._lean = lean
        self._request = request
        self._respond = respond
        self._click = click
        self._source = source
        self._ended = ended
        self._conn: Connection | None = None
        self._tick: int | None = None  # its deadline's, in the forwarder's coarse timeouts
        self._unwatch: Callable[[], None] | None = None
        self._started = 0.0
        self._over = False

    def begin(self, conn: Connection) -> None:
        forwarder = self._forwarder
        loop = asyncio.get_running_loop()
        self._conn = conn
        self._started = loop.time()
        limit = min(forwarder._deadline, self._lean.timeout)  # noqa: SLF001
        self._tick = forwarder._timeouts.add(self, loop, limit)  # noqa: SLF001
        when_lost = getattr(self._request.protocol, "call_when_lost", None)
        if when_lost is not None:
            self._unwatch = when_lost(self._client_left)

    # -- what the backend connection says (AnswerWaiter) ----------------------------------

    def answered(self, message: RawResponseMessage, payload: StreamReader) -> None:
        conn = self._conn
        assert conn is not None
        answer = self._lean.answer(message, payload)
        try:
            whole = self._respond.relay_complete(answer)
        except MalformedAnswer as exc:  # refused before anything was written
            self._lean.discard(conn)
            self._end()
            refused_answer(self._request, exc)
            self._click.adopt(functools.partial(self._answer, _error(502, BAD_GATEWAY)))
            return
        except Exception as exc:  # a bug of ours: the task's handling (logged, 500 or cut)
            self._lean.discard(conn)
            self._end()
            self._click.adopt(functools.partial(failing, exc))
            return
        if whole:  # a click's 302: all here, one write
            self._end()
            self._lean.release(conn)
            self._click.done()
            return
        self._cancel_timer()  # the task keeps the deadline from here
        self._click.adopt(functools.partial(self._relay_rest, answer, conn))

    def failed(self, exc: BackendClosed) -> None:
        conn = self._conn
        assert conn is not None
        self._lean.discard(conn)
        self._end()
        if not conn.got_bytes:  # a kept-alive connection the backend had closed
            self._click.retry()
            return
        request = self._request
        log.warning("backend error for %s %s: %s", request.method, request.raw_path, exc)
        self._click.adopt(functools.partial(self._answer, _error(502, BAD_GATEWAY)))

    # -- the other ends --------------------------------------------------------------------

    def expire(self) -> None:
        """The answer timeout or the deadline (`CoarseTimeouts.add`)."""
        self._tick = None
        conn = self._conn
        assert conn is not None
        self._lean.discard(conn)
        forwarder = self._forwarder
        request = self._request
        if self._lean.timeout < forwarder._deadline:  # noqa: SLF001
            log.warning("backend timeout for %s %s", request.method, request.raw_path)
        else:
            forwarder._deadline_reached(request)  # noqa: SLF001
        self._end()
        self._click.adopt(functools.partial(self._answer, _error(504, GATEWAY_TIMEOUT)))

    def _client_left(self) -> None:
        self._unwatch = None
        if self._over:
            return
        conn = self._conn
        assert conn is not None
        self._forwarder.stats.cancelled += 1
        self._lean.discard(conn)  # its answer is of no use now
        self._end()

    async def _relay_rest(self, answer: Answer, conn: Connection) -> bool:
        """`handle_lean`'s relay for an answer whose body is still arriving."""
        forwarder = self._forwarder
        loop = asyncio.get_running_loop()
        left = self._started + forwarder._deadline - loop.time()  # noqa: SLF001
        respond = self._respond
        # until this task ran, `_client_left` would have released the connection; from
        # here the task's cancellation does (and counts the client leaving)
        self._unwatch_client()
        unwatch = forwarder._watch(self._request.protocol)  # noqa: SLF001
        try:
            async with forwarder._timeouts.timeout(max(left, 0.0)):  # noqa: SLF001
                try:
                    await relay_or_refuse(self._request, respond, answer)
                finally:
                    self._lean.release(conn)
        except TimeoutError:
            await forwarder._deadline_answer(self._request, respond)  # noqa: SLF001
        finally:
            if unwatch is not None:
                unwatch()
            self._end()
        return True

    async def _answer(self, response: web.Response) -> bool:
        await self._respond.edge(response)
        return True

    def _cancel_timer(self) -> None:
        if self._tick is not None:
            self._forwarder._timeouts.remove(self, self._tick)  # noqa: SLF001
            self._tick = None

    def _unwatch_client(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    def _end(self) -> None:
        """The forward is over: its timer, its watch and its count go (once)."""
        if self._over:
            return
        self._over = True
        self._cancel_timer()
        self._unwatch_client()
        self._forwarder._leave(self._source)  # noqa: SLF001
        self._ended()


async def failing(exc: Exception) -> bool:
    """A forwarding that fails with `exc`: a task running it handles a bug of ours found
    outside a task (as any: logged, a 500 if nothing was sent, else the connection cut)."""
    raise exc


@functools.lru_cache(maxsize=64)
def _parsed_base(base: str) -> URL:
    return URL(base)


def backend_target(base: URL, path_qs: str) -> str:
    """`backend_url(base, path_qs).raw_path_qs` without building a URL (the lean client's
    request line): the base's path prefix, then the request's path and query as sent."""
    path, _sep, query = path_qs.partition("?")
    return base.raw_path.rstrip("/") + path + ("?" + query if query else "")


def backend_url(base: str, path_qs: str) -> URL:
    """The backend's scheme and authority, its path prefix, then the request's path and
    query byte for byte (already percent-encoded as the client sent them), built from
    parsed components: whatever the target holds cannot change where the request goes."""
    parsed = _parsed_base(base)
    path, sep, query = path_qs.partition("?")
    return URL.build(
        scheme=parsed.scheme,
        authority=parsed.raw_authority,
        path=parsed.raw_path.rstrip("/") + path,
        query_string=query if sep else "",
        encoded=True,
    )


class ForwardStats(Counters):
    __slots__ = ("per_source_limited", "body_timeouts", "deadlines", "cancelled")

    def __init__(self) -> None:
        self.per_source_limited = 0  # answered 429: the source had max_per_source in flight
        self.body_timeouts = 0  # answered 408: a body read took longer than body_timeout
        self.deadlines = 0  # the forward reached its deadline
        self.cancelled = 0  # the client went away mid-forward


class _RelayedResponse(web.StreamResponse):
    """A relayed answer whose headers leave with its first body bytes (or at its end).

    aiohttp's StreamResponse sends its headers at `prepare()`, so a small answer
    (the 302 of a click) left as two writes: two TLS records, two `send`s. Holding
    them until the first `write()` / `write_eof()` (what aiohttp's own `Response`
    does) puts them in one; the bytes on the wire are the same.
    """

    _send_headers_immediately = False


class _Progress:
    __slots__ = ("response",)

    def __init__(self) -> None:
        self.response: web.StreamResponse | None = None  # once its headers were sent


class _Body:
    """The request body, streamed to a backend at most once, each read bounded in time."""

    __slots__ = ("_content", "_timeout", "started", "timed_out")

    def __init__(self, content: aiohttp.StreamReader, timeout: float) -> None:
        self._content = content
        self._timeout = timeout
        self.started = False
        self.timed_out = False

    async def stream(self) -> AsyncIterator[bytes]:
        self.started = True
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._content.readany()
            except TimeoutError:
                self.timed_out = True
                raise
            if not chunk:
                return
            yield chunk


def connection_listed(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Fields the sender named in Connection: hop-by-hop too (RFC 9110 §7.6.1).

    Host is never dropped this way: the backend needs it to tell customers apart.
    """
    if "Connection" not in headers:  # most requests and answers: no set built
        return _NONE_LISTED
    tokens = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    return frozenset(tokens - {"", "host"})


_NONE_LISTED: frozenset[str] = frozenset()


class ForwardedMemo:
    """One connection's last forwarded header block and what it was made from
    (`Forwarder._forwarded_block`)."""

    __slots__ = ("key", "block")

    def __init__(self) -> None:
        self.key: tuple[object, ...] | None = None
        self.block = ""


def forwarded_headers(
    request: web.Request, trusted: TrustedNetworks | None = None, client: str | None = None
) -> CIMultiDict[str]:
    """The request's headers as the backend gets them.

    The forwarding fields describe the client the edge saw. A client in `trusted`
    is a proxy itself: its X-Forwarded-For and Forwarded chains are kept with the
    client appended, and its X-Forwarded-Proto/-Host and X-Real-IP are kept.
    """
    headers: CIMultiDict[str] = CIMultiDict()
    listed = connection_listed(request.headers)
    client = client or client_address(request) or "unknown"
    keep_chain = trusted is not None and bool(trusted) and client in trusted
    chain: dict[str, list[str]] = {}
    checked = checked_host(request)
    host = str(checked) if checked is not None else ""
    for name, value in request.headers.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname == "content-length" or lname in listed:
            continue
        if lname == "host":  # the one normalised value every decision used
            headers.add(name, host)
            continue
        if lname in EDGE_ANSWERED:
            continue
        if lname in UNTRUSTED_FORWARDING:
            if keep_chain:
                chain.setdefault(lname, []).append(value)
            continue
        headers.add(name, value)
    if request.body_exists and request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    proto = "https" if request.secure else "http"
    if checked is not None and "Host" not in headers:
        headers["Host"] = host  # absolute-form without a Host field
    headers["X-Forwarded-For"] = ", ".join([*chain.get("x-forwarded-for", ()), client])
    headers["X-Forwarded-Proto"] = chain.get("x-forwarded-proto", [proto])[0]
    if "x-forwarded-host" in chain:
        headers["X-Forwarded-Host"] = chain["x-forwarded-host"][0]
    elif host:
        headers["X-Forwarded-Host"] = host
    if "x-real-ip" in chain:
        headers["X-Real-IP"] = chain["x-real-ip"][0]
    element = f"for={_forwarded_node(client)};proto={proto}"
    if host:
        element += f";host={_quote(host)}"
    headers["Forwarded"] = ", ".join([*chain.get("forwarded", ()), element])
    return headers


class MalformedAnswer(ValueError):
    """The backend's answer cannot be relayed as it came: a control character in its
    reason phrase or in a field. aiohttp's answer parser is lenient about them, and its
    serializer refuses them (a header injection otherwise). Answered 502, as any
    malformed answer."""


# What aiohttp's serializer refuses in a status line or a field: controls but HTAB, DEL
_FORBIDDEN_IN_HEAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_relayable(reason: str, fields: list[tuple[str, str]]) -> None:
    """Raise MalformedAnswer when the head could not be written out as it is."""
    if _FORBIDDEN_IN_HEAD.search(reason) or any(
        _FORBIDDEN_IN_HEAD.search(name) or _FORBIDDEN_IN_HEAD.search(value)
        for name, value in fields
    ):
        raise MalformedAnswer("a control character in the answer's head")


def relayed_headers(upstream: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """The backend's answer fields the client gets: all but the hop-by-hop ones."""
    listed = connection_listed(upstream)
    return [
        (name, value)
        for name, value in upstream.items()
        if name.lower() not in HOP_BY_HOP and name.lower() not in listed
    ]


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, progress: _Progress
) -> web.StreamResponse:
    fields = relayed_headers(upstream.headers)
    try:
        check_relayable(upstream.reason or "", fields)
    except MalformedAnswer as exc:
        refused_answer(request, exc)
        return _error(502, BAD_GATEWAY)
    response = _RelayedResponse(status=upstream.status, reason=upstream.reason)
    for name, value in fields:
        response.headers.add(name, value)
    if "Content-Length" not in upstream.headers and request.method != "HEAD":
        response.enable_chunked_encoding()
    await response.prepare(request)
    progress.response = response
    if request.method != "HEAD":
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are gone already: cut the connection so the client sees a
            # truncated response, never a short body that looks complete.
            log.warning("backend failed mid-response for %s: %s", request.raw_path, exc)
            if request.transport is not None:
                request.transport.close()
            return response
    await response.write_eof()
    return response


def refused_answer(request: web.Request, exc: MalformedAnswer) -> None:
    log.warning("backend error for %s %s: %s", request.method, request.raw_path, exc)


async def relay_or_refuse(request: web.Request, respond: LeanResponder, answer: Answer) -> None:
    """`respond.relay`, or the 502 of a malformed answer (refused before anything was
    written)."""
    try:
        await respond.relay(answer)
    except MalformedAnswer as exc:
        refused_answer(request, exc)
        await respond.edge(_error(502, BAD_GATEWAY))


@functools.lru_cache(maxsize=4096)  # per click otherwise: ipaddress parses the string each time
def _forwarded_node(ip: str) -> str:
    try:
        if isinstance(ipaddress.ip_address(ip), ipaddress.IPv6Address):
            return f'"[{ip}]"'
    except ValueError:
        return "unknown"
    return ip


@functools.lru_cache(maxsize=4096)  # the same few hosts on every click: ~5 µs each otherwise
def _quote(value: str) -> str:
    if all(c.isalnum() or c in "-._~" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _error(status: int, text: str) -> web.Response:
    return web.Response(
        status=status,
        text=text + "\n",
        headers={"Cache-Control": "no-store", "Connection": "close"},
    )


class ForwarderSlot:
    """The forwarder in service. A reload swaps in a new one; the old one finishes its requests."""

    def __init__(self, forwarder: Forwarder, backends: BackendPool) -> None:
        self.forwarder = forwarder
        self.backends = backends
        self._active: dict[int, int] = {}  # id(forwarder) -> requests it is handling
        self._idle: dict[int, asyncio.Event] = {}  # set when a retired one has none left
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: dict[int, tuple[Forwarder, BackendPool]] = {}  # not closed yet

    def lean_ready(self) -> bool:
        return self.forwarder.lean_ready()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        forwarder = self.forwarder
        key = id(forwarder)
        self._active[key] = self._active.get(key, 0) + 1
        try:
            return await forwarder.handle(request)
        finally:
            self._done(key)

    def forward_now(self, request: web.Request, respond: LeanResponder, click: DirectClick) -> bool:
        forwarder = self.forwarder
        key = id(forwarder)
        self._active[key] = self._active.get(key, 0) + 1
        try:
            taken = forwarder.forward_now(request, respond, click, lambda: self._done(key))
        except BaseException:
            self._done(key)
            raise
        if not taken:
            self._done(key)
        return taken

    async def handle_lean(self, request: web.Request, respond: LeanResponder) -> bool:
        forwarder = self.forwarder
        key = id(forwarder)
        self._active[key] = self._active.get(key, 0) + 1
        try:
            return await forwarder.handle_lean(request, respond)
        finally:
            self._done(key)

    def _done(self, key: int) -> None:
        left = self._active.get(key, 1) - 1
        if key in self._active:
            self._active[key] = left
        if left == 0 and key in self._idle:
            self._idle[key].set()

    def replace(self, forwarder: Forwarder, backends: BackendPool, grace: float) -> None:
        old = (self.forwarder, self.backends)
        self._retired[id(old[0])] = old
        self.forwarder, self.backends = forwarder, backends
        task = asyncio.get_running_loop().create_task(self._retire(*old, grace))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, forwarder: Forwarder, backends: BackendPool, grace: float) -> None:
        key = id(forwarder)
        idle = self._idle.setdefault(key, asyncio.Event())
        if self._active.get(key, 0) == 0:
            idle.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await idle.wait()
        self._active.pop(key, None)
        self._idle.pop(key, None)
        if self._retired.pop(key, None) is not None:
            await forwarder.close()
            await backends.close()

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for forwarder, backends in [*self._retired.values(), (self.forwarder, self.backends)]:
            await forwarder.close()
            await backends.close()
        self._retired.clear()
