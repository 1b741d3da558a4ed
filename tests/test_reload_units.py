"""proxy/app/reload.py in process: which keys apply live, and the forwarder swap itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from support.net import free_port
from test_process_signals import Backend

from proxy.app.config import Config
from proxy.app.reload import effective, split_changes
from proxy.app.wiring import build_forwarder
from proxy.http.forward import ForwarderSlot


def test_live_keys_and_restart_keys() -> None:
    old = Config()
    old.backend.url = "http://a.test"
    new = Config()
    new.backend.url = "http://b.test"
    new.backend.timeout = 3.0
    new.listen.https = "0.0.0.0:8443"
    new.store.path = "/elsewhere.db"
    new.log_level = "debug"
    new.tls.handshake_timeout = 2.0
    new.workers = 4
    live, restart = split_changes(old, new)
    assert live == ["backend.timeout", "backend.url", "log_level", "tls.handshake_timeout"]
    assert restart == ["listen.https", "store.path", "workers"]
    running = effective(old, new)
    assert running.backend.url == "http://b.test" and running.log_level == "debug"
    assert running.listen.https == old.listen.https and running.store.path == old.store.path
    assert running.workers == 1
    assert old.backend.url == "http://a.test"  # the old object is not changed


@pytest.fixture
async def ab() -> AsyncIterator[tuple[Backend, Backend]]:
    a, b = Backend("backend-A", slow_seconds=1.0), Backend("backend-B")
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


async def serve_slot(slot: ForwarderSlot) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slot.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def config_for(url: str) -> Config:
    config = Config()
    config.backend.url = url
    return config


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as resp:
        return resp.status, await resp.text()


async def test_swap_lets_the_old_forwarder_finish_then_closes_it(
    ab: tuple[Backend, Backend],
) -> None:
    a, b = ab
    slot = ForwarderSlot(*await build_forwarder(config_for(a.url)))
    old_backends = slot.backends
    runner, base = await serve_slot(slot)
    try:
        async with aiohttp.ClientSession() as session:
            in_flight = asyncio.create_task(get(session, f"{base}/slow"))
            await asyncio.wait_for(a.slow_started.wait(), 5)
            slot.replace(*await build_forwarder(config_for(b.url)), grace=30)
            assert await get(session, f"{base}/c/next") == (200, "backend-B /c/next")
            assert not in_flight.done()
            assert await in_flight == (200, "backend-A /slow")
            for _ in range(100):  # the old pair closes once its last request is done
                if not slot._retired:
                    break
                await asyncio.sleep(0.01)
            assert not slot._retired and slot.backends is not old_backends
    finally:
        await runner.cleanup()
        await slot.close()


async def test_a_request_outliving_the_grace_is_cut_cleanly(ab: tuple[Backend, Backend]) -> None:
    a, b = ab
    a.slow_seconds = 5
    slot = ForwarderSlot(*await build_forwarder(config_for(a.url)))
    runner, base = await serve_slot(slot)
    try:
        async with aiohttp.ClientSession() as session:
            in_flight = asyncio.create_task(get(session, f"{base}/slow"))
            await asyncio.wait_for(a.slow_started.wait(), 5)
            slot.replace(*await build_forwarder(config_for(b.url)), grace=0.2)
            status, _ = await asyncio.wait_for(in_flight, 5)
            assert status == 502  # the edge's own answer, not a crash
            assert await get(session, f"{base}/c/after") == (200, "backend-B /c/after")
    finally:
        await runner.cleanup()
        await slot.close()
