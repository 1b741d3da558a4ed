"""Sample click-tracking backend that sits behind linkedge in the demo and tests.

It mimics what a real email tracking service does (302 to the landing page with
a cookie) and adds a few diagnostic routes, and it records every request except
health checks exactly as received so tests can check what the proxy forwarded.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler

LANDING_URL = "https://shop.example/landing/{id}?utm=mail"
MAX_SLOW_SECONDS = 300.0
MAX_BIG_BYTES = 1 << 30
_CHUNK = 64 * 1024
HEALTH_PATH = "/healthz"


@dataclass
class RecordedRequest:
    """One request as the backend saw it; headers are raw pairs in wire order."""

    method: str
    path_qs: str  # as yarl normalised it
    headers: list[tuple[str, str]]
    body: bytes
    peer: tuple[str, int] | None  # (host, port) of the connecting client
    raw_path: str = ""  # the request target exactly as received (path and query)


RECORDED_KEY: web.AppKey[list[RecordedRequest] | None] = web.AppKey("recorded")


def _raw_headers(request: web.Request) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]


def _peer(request: web.Request) -> tuple[str, int] | None:
    peername = request.transport.get_extra_info("peername") if request.transport else None
    if not peername:
        return None
    return (str(peername[0]), int(peername[1]))


@web.middleware
async def _record(request: web.Request, handler: Handler) -> web.StreamResponse:
    recorded = request.app[RECORDED_KEY]
    # Health checks come on the checker's own schedule; recording them would
    # interleave with the requests a test looks at.
    if recorded is not None and request.path != HEALTH_PATH:
        body = await request.read()  # cached by aiohttp, handlers can read it again
        recorded.append(
            RecordedRequest(
                method=request.method,
                path_qs=request.path_qs,
                headers=_raw_headers(request),
                body=body,
                peer=_peer(request),
                raw_path=request.raw_path,
            )
        )
    return await handler(request)


async def _click(request: web.Request) -> web.Response:
    click_id = quote(request.match_info["id"], safe="")
    return web.Response(
        status=302,
        text=f"Redirecting to landing page {click_id}\n",
        headers={
            "Location": LANDING_URL.format(id=click_id),
            "Set-Cookie": f"clk={click_id}; Path=/; HttpOnly",
            "Cache-Control": "no-store",
        },
    )


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _cookies(request: web.Request) -> web.Response:
    """Several Set-Cookie fields, which must each reach the client."""
    response = web.Response(text="cookies\n", headers={"Cache-Control": "private, max-age=60"})
    for name in request.query.getall("name", ["a", "b"]):
        response.headers.add("Set-Cookie", f"{name}=1; Path=/; Secure")
    return response


async def _unsubscribe(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"unsubscribed": True, "length": len(body)})


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path_qs": request.path_qs,
            "headers": _raw_headers(request),
            "body": body.decode("utf-8", errors="replace"),
        }
    )


def _number(request: web.Request, name: str, maximum: float) -> float:
    try:
        value = float(request.query.get(name, "0"))
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a number\n") from None
    if not 0 <= value <= maximum:
        raise web.HTTPBadRequest(text=f"{name} must be between 0 and {maximum}\n")
    return value


async def _slow(request: web.Request) -> web.Response:
    seconds = _number(request, "seconds", MAX_SLOW_SECONDS)
    await asyncio.sleep(seconds)
    return web.Response(text=f"slept {seconds}s\n")


async def _big(request: web.Request) -> web.StreamResponse:
    remaining = int(_number(request, "bytes", MAX_BIG_BYTES))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = remaining
    await response.prepare(request)
    if request.method == "HEAD":  # the length of the GET, no body
        remaining = 0
    chunk = b"x" * _CHUNK
    while remaining > 0:
        part = chunk[: min(_CHUNK, remaining)]
        await response.write(part)
        remaining -= len(part)
    await response.write_eof()
    return response


def make_backend_app(recorded: list[RecordedRequest] | None = None) -> web.Application:
    """Build the app; requests are appended to ``recorded`` when a list is given."""
    app = web.Application(middlewares=[_record])
    app[RECORDED_KEY] = recorded
    app.router.add_get("/c/{id}", _click)  # also serves HEAD
    app.router.add_post("/unsubscribe", _unsubscribe)
    app.router.add_route("*", "/echo", _echo)
    app.router.add_get("/cookies", _cookies)
    app.router.add_get(HEALTH_PATH, _health)
    app.router.add_route("*", "/slow", _slow)
    app.router.add_get("/big", _big)
    return app


async def start_backend(
    host: str = "127.0.0.1", port: int = 0, recorded: list[RecordedRequest] | None = None
) -> tuple[web.AppRunner, str]:
    """Serve the backend; returns the runner (call ``cleanup()``) and its base URL."""
    # handler_cancellation: a client giving up on /slow must not keep cleanup waiting.
    runner = web.AppRunner(
        make_backend_app(recorded),
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound_port}"
