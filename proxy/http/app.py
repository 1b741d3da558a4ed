"""The HTTP application shared by both listeners.

Plain HTTP stays useful forever: links in mail already sent are `http://`, and the
CA's HTTP-01 validation arrives here. Challenge answers come from the store, so
whichever worker process the CA reaches can answer for an order another placed; the
worker whose order published an answer has it in memory (`acme_client.PublishedAnswers`,
passed in as `store`), so the CA's repeated fetches of a token cost no store reads there.
What the edge answers itself for a host (app association files, HTTPS upgrade,
HSTS) is decided in `proxy/http/host_policy.py`.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import HttpVersion10, HttpVersion11, web, web_response
from aiohttp.http_exceptions import HttpProcessingError

from certstore import ChallengeStore
from certstore.errors import StoreUnavailable
from proxy.counters import LogBudget
from proxy.http.forward import Forwarder
from proxy.http.host_policy import HostPolicy
from proxy.http.request_target import BadRequest, checked_host, misdirected, origin_form

log = logging.getLogger(__name__)
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
_HTTP1 = (HttpVersion10, HttpVersion11)
SERVER = "linkedge"  # the edge's own Server header: no versions
# header fields a request may have: aiohttp's default of 128 less room for the four
# forwarding fields the edge adds, so a request the edge accepts also fits a backend
# with that common limit (instead of becoming the backend's 400 and its log line)
MAX_HEADERS = 120


class ClickForwarder(Protocol):
    async def handle(self, request: web.Request) -> web.StreamResponse: ...


def make_http_app(
    store: ChallengeStore,
    forwarder: Forwarder | ClickForwarder,
    is_suspended: Callable[[str], bool] = lambda _host: False,
    policy: HostPolicy | None = None,
) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        step, detail = decide(request, is_suspended)
        if step is Step.BAD:
            return bad_request(request, detail)
        if step is Step.CHALLENGE:
            return await _challenge(store, detail)
        if step is Step.MISDIRECTED:
            return web.Response(
                status=421,
                text=f"Misdirected Request: this connection is for {detail}.\n",
                headers={"Cache-Control": "no-store"},
            )
        if step is Step.SUSPENDED:
            # the operator's kill switch; also reaches keep-alive HTTPS connections
            return web.Response(
                status=503,
                text=f"{detail} is suspended on this edge.\n",
                headers={"Cache-Control": "no-store"},
            )
        if policy is not None:  # association files, HTTPS upgrade
            own = await policy.answer(request, detail)
            if own is not None:
                return own
        return await forwarder.handle(request)

    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_response_prepare.append(_server_header)
    if policy is not None:
        policy.install(app)  # HSTS
    return app


class Step(enum.Enum):
    """What the edge does with a request, before the host's policy (`decide`)."""

    BAD = "bad"  # 400; detail: why
    CHALLENGE = "challenge"  # an ACME HTTP-01 answer; detail: the token
    MISDIRECTED = "misdirected"  # 421; detail: the host the TLS connection is for
    SUSPENDED = "suspended"  # 503; detail: the host
    FORWARD = "forward"  # the host's policy, then the backend; detail: the host ("" none)


def decide(request: web.Request, is_suspended: Callable[[str], bool]) -> tuple[Step, str]:
    """The one order of the edge's checks, for aiohttp's handler and the lean click
    protocol (proxy/http/click_protocol.py) alike. Nothing is counted or logged here."""
    if request.version not in _HTTP1:  # "GET / HTTP/2.0" is not HTTP/2
        return Step.BAD, f"HTTP/{request.version[0]}.{request.version[1]}"
    try:
        host = checked_host(request)
        path = origin_form(request.raw_path).partition("?")[0]
    except BadRequest as exc:
        return Step.BAD, str(exc)
    if path.startswith(CHALLENGE_PREFIX) and request.method in ("GET", "HEAD"):
        return Step.CHALLENGE, path[len(CHALLENGE_PREFIX) :]
    certified = misdirected(host)
    if certified is not None:
        return Step.MISDIRECTED, certified
    name = host.lookup if host is not None else ""
    if name and is_suspended(name):
        return Step.SUSPENDED, name
    return Step.FORWARD, name


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    # a backend's own Server is relayed as it is; the edge's answers name no versions
    response.headers.setdefault("Server", SERVER)


def bad_request(request: web.Request, reason: str) -> web.Response:
    """A client's malformed request: a 400, counted, and logged at DEBUG only."""
    MALFORMED.count += 1
    log.debug("400 for %s %r: %s", request.method, request.raw_path[:200], reason)
    response = web.Response(
        status=400, text=f"Bad Request: {reason}.\n", headers={"Cache-Control": "no-store"}
    )
    response.force_close()  # what follows on this connection cannot be trusted either
    return response


class _Malformed:
    """Requests refused as malformed (the edge's 400s and aiohttp's parser errors)."""

    count = 0


MALFORMED = _Malformed()


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger for the edge's listeners.

    aiohttp logs every request its parser rejects (bad request line, header bytes,
    framing) as "Error handling request" at ERROR with a traceback. Those are the
    client's fault and anyone can send thousands: they are counted and logged at
    DEBUG. Everything else (a handler failing: our bug) stays an ERROR with its
    traceback.
    """

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            MALFORMED.count += 1
            self.logger.debug("%s: %s", str(msg) % args if args else msg, exc)
            return
        self.logger.error(msg, *args, exc_info=exc_info, **kw)


def server_log() -> ServerLog:
    return ServerLog(logging.getLogger("linkedge.http"), {})


def hide_server_version() -> None:
    """aiohttp's own answers (its parser's 400s) say `Server: Python/3.x aiohttp/3.x`
    unless a Server header is set; make the default the edge's name, no versions.
    Responses that carry their own Server (a backend's, relayed) keep it."""
    web_response.SERVER_SOFTWARE = SERVER


async def _challenge(store: ChallengeStore, token: str) -> web.Response:
    try:
        answer = await store.get_challenge(token) if _is_token(token) else None
    except StoreUnavailable as exc:
        # the store is away and this node's local copy does not know the token: say so
        # (the CA retries or fails this validation; an order cannot finish meanwhile anyway)
        if _UNAVAILABLE.due():
            log.warning(
                "ACME challenge token %r not answered (worker %d; %d more since the last line): %s",
                token[:64],
                os.getpid(),
                _UNAVAILABLE.take_suppressed(),
                exc,
            )
        return web.Response(
            status=503, text="challenge store unavailable\n", headers={"Retry-After": "5"}
        )
    if answer is None:
        # anyone can ask for made-up tokens: at most one INFO line per interval
        if _UNKNOWN_TOKENS.due():
            log.info(
                "unknown ACME challenge token %r (worker %d; %d more since the last line)",
                token[:64],
                os.getpid(),
                _UNKNOWN_TOKENS.take_suppressed(),
            )
        return web.Response(status=404, text="no such challenge\n")
    log.info("served ACME challenge token %s (worker %d)", token, os.getpid())
    return web.Response(text=answer, content_type="application/octet-stream")


_UNKNOWN_TOKENS = LogBudget(10.0)
_UNAVAILABLE = LogBudget(10.0)


def _is_token(token: str) -> bool:
    # RFC 8555 §8.3: base64url, at least 128 bits of entropy
    return 0 < len(token) <= 256 and all(c.isalnum() or c in "-_" for c in token)
