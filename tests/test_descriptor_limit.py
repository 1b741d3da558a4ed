"""Issue 9: the edge never runs out of file descriptors.

A real `run_worker` process started with RLIMIT_NOFILE soft 512 / hard 1024: it
raises the soft limit to the hard one at start and sizes its connection caps
from it. 1,100 idle HTTP connections and 300 silent HTTPS ones (more than the
whole limit) from a few sources must leave it serving clicks from another source.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from support.clicks import certify, url
from support.edge import EdgeHandle, client_context
from support.net import client_source

from proxy.demo.client import StaticResolver
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

CHILD = """
import asyncio, pickle, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (512, 1024))
from proxy.app.wiring import run_worker
with open(sys.argv[1], "rb") as fh:
    config = pickle.load(fh)
asyncio.run(run_worker(config, ready=lambda: print("ready", flush=True)))
"""


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no Max open files line")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_edge_stays_under_its_descriptor_limit(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer, tmp_path: Path
) -> None:
    await edge_config.start()
    try:
        host = await certify(edge_config, pebble, dns_server)
    finally:
        await edge_config.stop()
    edge_config.config.renewal.interval_seconds = 0
    (tmp_path / "config.pickle").write_bytes(pickle.dumps(edge_config.config))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "config.pickle")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    conns: list[asyncio.StreamWriter] = []
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
        assert line.strip() == b"ready"
        assert soft_nofile(child.pid) == 1024  # raised from 512 to the hard limit

        peak = 0
        for i in range(1100):
            source = client_source(2 + i % 5)  # 220 per source: under the per-source cap
            _, writer = await asyncio.open_connection(
                edge_config.ip, edge_config.http_port, local_addr=(source, 0)
            )
            conns.append(writer)
            if i % 100 == 0:
                peak = max(peak, open_fds(child.pid))
        for i in range(300):
            source = client_source(7 + i % 2)
            _, writer = await asyncio.open_connection(
                edge_config.ip, edge_config.https_port, local_addr=(source, 0)
            )
            conns.append(writer)
        await asyncio.sleep(0.5)
        peak = max(peak, open_fds(child.pid))
        assert peak < 1024 - 100  # headroom left for the store, backends and the CA

        connector = aiohttp.TCPConnector(
            resolver=StaticResolver(edge_config.ip),
            ssl=client_context(pebble),
            local_addr=(client_source(9), 0),
            force_close=True,
        )
        async with aiohttp.ClientSession(connector=connector) as session:
            for n in range(5):
                started = time.monotonic()
                async with session.get(
                    url(edge_config, host, f"/c/fd{n}"), allow_redirects=False
                ) as resp:
                    assert resp.status == 302
                assert time.monotonic() - started < 2.0
                started = time.monotonic()
                async with session.get(
                    f"http://{edge_config.ip}:{edge_config.http_port}/c/plain{n}",
                    headers={"Host": host},
                    allow_redirects=False,
                ) as resp:
                    assert resp.status == 302
                assert time.monotonic() - started < 2.0
        assert open_fds(child.pid) < 1024 - 100
    finally:
        for writer in conns:
            writer.close()
        child.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(child.wait), 20)
        except TimeoutError:
            child.kill()
            child.wait()
