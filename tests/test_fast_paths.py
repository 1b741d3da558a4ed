"""Issue 12: the fast paths keep every forwarding rule.

* `listen.lean_clicks` (on by default): the rerun tests below count the clicks the lean
  click protocol answered (its own tests: test_click_protocol.py; the same tests with it
  off: test_lean_clicks_off.py);
* `backend.lean_client`: every test of test_forwarding.py, test_forward_bounds.py and
  test_reload_units.py runs again here with the lean client forced on (bodiless GETs go through
  `proxy/lean_client.py`; HEAD and bodies still through aiohttp's client), plus its own
  pooling and retry checks;
* `edge.event_loop = "uvloop"`: a `linkedge serve` process on uvloop (with the lean
  client) orders a certificate at the first HTTPS click, serves keep-alive clicks, and
  stops gracefully.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_process_signals as signals_test
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from proxy.demo.client import edge_session
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.http.click_protocol import ClickPaths
from proxy.http.forward import Forwarder, backend_target, backend_url
from proxy.http.lean_client import ConnectFailed, LeanClient, header_block, request_head

USED = {"exchanges": 0}
CLICKS: list[ClickPaths] = []  # every lean click protocol of the rerun tests' edges


@pytest.fixture(autouse=True)
def lean_forced(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every Forwarder made in this module's tests uses the lean client."""
    original_init = Forwarder.__init__
    original_exchange = LeanClient.exchange

    def init(self: Forwarder, *args: Any, **kwargs: Any) -> None:
        kwargs["lean_client"] = True
        original_init(self, *args, **kwargs)

    async def exchange(self: LeanClient, url: URL, head: bytes, **kwargs: Any) -> Any:
        USED["exchanges"] += 1
        return await original_exchange(self, url, head, **kwargs)

    original_paths = ClickPaths.__init__

    def paths(self: ClickPaths, *args: Any, **kwargs: Any) -> None:
        original_paths(self, *args, **kwargs)
        CLICKS.append(self)

    monkeypatch.setattr(Forwarder, "__init__", init)
    monkeypatch.setattr(LeanClient, "exchange", exchange)
    monkeypatch.setattr(ClickPaths, "__init__", paths)
    yield


# test_forwarding.py, test_forward_bounds.py and test_reload_units.py again (with their
# fixtures), the lean client on
from test_forward_bounds import *  # noqa: E402, F403
from test_forwarding import *  # noqa: E402, F403
from test_reload_units import *  # noqa: E402, F403

# -- the lean client on its own ---------------------------------------------------------


async def _backend(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def _get(client: LeanClient, url: URL) -> tuple[int, bytes]:
    headers: CIMultiDict[str] = CIMultiDict({"Host": "links.example.test", "X-Test": "1"})
    answer, conn = await client.exchange(
        url, request_head("GET", url.raw_path_qs, header_block(headers))
    )
    try:
        body = b"".join([chunk async for chunk in answer.content.iter_any()])
    finally:
        client.release(conn)
    return answer.status, body


async def test_lean_client_reuses_connections_and_streams_bodies() -> None:
    peers: list[Any] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        if request.path == "/chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for i in range(3):
                await response.write(b"part%d " % i)
            await response.write_eof()
            return response
        return web.Response(status=302, headers={"Location": "https://shop.test/"}, body=b"x")

    runner, base = await _backend(handle)
    client = LeanClient(connect_timeout=2, timeout=2, pool_size=4)
    try:
        assert await _get(client, URL(base + "/c/1")) == (302, b"x")
        assert await _get(client, URL(base + "/chunked")) == (200, b"part0 part1 part2 ")
        assert await _get(client, URL(base + "/c/2")) == (302, b"x")
        assert len(set(peers)) == 1  # one pooled connection for all three
    finally:
        await client.close()
        await runner.cleanup()


async def test_lean_client_survives_the_backend_closing_idle_connections() -> None:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    client = LeanClient(connect_timeout=2, timeout=2, pool_size=4)
    try:
        assert await _get(client, URL(base + "/c/1")) == (200, b"ok")
        await asyncio.sleep(0.6)  # the backend has closed the pooled connection meanwhile
        assert await _get(client, URL(base + "/c/2")) == (200, b"ok")
    finally:
        await client.close()
        await runner.cleanup()


async def test_lean_client_connect_failures_say_nothing_was_sent() -> None:
    client = LeanClient(connect_timeout=1, timeout=1, pool_size=1)
    try:
        with pytest.raises(ConnectFailed) as info:
            await _get(client, URL("http://127.0.0.1:9/c/1"))  # discard port: refused
        assert not info.value.timeout
    finally:
        await client.close()


async def test_lean_client_times_out_a_silent_backend() -> None:
    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    runner, base = await _backend(handle)
    client = LeanClient(connect_timeout=1, timeout=0.3, pool_size=1)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await _get(client, URL(base + "/c/1"))
        assert time.monotonic() - started < 2
        # the slot came back: the next request is not stuck behind the first
        with pytest.raises(TimeoutError):
            await _get(client, URL(base + "/c/2"))
    finally:
        await client.close()
        await runner.cleanup()


def test_the_lean_client_was_used_by_the_rerun_tests() -> None:
    # runs after the rerun tests of this module (pytest keeps definition order)
    assert USED["exchanges"] > 10
    # most of the rerun tests' GETs are lean clicks (their first click on a new host,
    # and every request of other kinds, are aiohttp's)
    assert sum(paths.stats.lean for paths in CLICKS) > 10


# -- uvloop ---------------------------------------------------------------------------


async def test_serve_on_uvloop_with_the_lean_client(
    tmp_path: Path, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    pytest.importorskip("uvloop")
    backend = signals_test.Backend("backend-A")
    await backend.start()
    serve = signals_test.Serve(
        tmp_path, pebble, http_port=pebble.http_port
    )  # Pebble validates there
    serve.dns = dns_server.nameserver
    dns_server.set_a(signals_test.TARGET, [signals_test.IP])
    host = "links.fast-paths.test"
    dns_server.set_cname(host, signals_test.TARGET)
    try:
        serve.write_config(backend.url, extra="log_level = 'info'")
        text = serve.config_path.read_text()
        text = text.replace("[edge]\n", '[edge]\nevent_loop = "uvloop"\n')
        text = text.replace("[backend]\n", "[backend]\nlean_client = true\n")
        serve.config_path.write_text(text)
        serve.start()
        await serve.wait_log("edge worker ready")
        from certstore import open_store
        from certstore.crypto import parse_key_text

        store = await open_store(
            str(tmp_path / "store.db"), parse_key_text(serve.store_key, "test")
        )
        try:
            await store.add_domain(host, "shop")
        finally:
            await store.close()
        url = f"https://{host}:{serve.https_port}"
        async with edge_session(signals_test.IP, str(pebble.root_path)) as session:
            for i in range(3):  # the order happens at the first; then keep-alive
                async with session.get(f"{url}/c/{i}") as resp:
                    assert (resp.status, await resp.text()) == (200, f"backend-A /c/{i}")
        conn = await signals_test.KeepAlive.open(serve.http_port)
        try:
            for i in range(3):
                assert await conn.get(f"/c/plain{i}") == (200, f"backend-A /c/plain{i}")
        finally:
            conn.close()
        serve.signal(signal.SIGTERM)
        assert await serve.wait_exit(15) == 0, serve.log()
        assert "Traceback" not in serve.log()
    finally:
        serve.stop()
        await backend.stop()


# -- the lean client's request line ------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(
        [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://b.test/prefix/",
            "http://[::1]:81/p",
        ]
    ),
    path=st.text(alphabet="/abc.%2e;~-_é ", max_size=20),
    query=st.none() | st.text(alphabet="ab=&%20?é", max_size=12),
)
def test_lean_request_line_is_the_url_aiohttp_would_request(
    base: str, path: str, query: str | None
) -> None:
    """`backend_target` (the lean client's, no URL built) says what `backend_url` says."""
    path_qs = "/" + path + ("" if query is None else "?" + query)
    assert backend_target(URL(base), path_qs) == backend_url(base, path_qs).raw_path_qs
