"""Shared pieces of the renewal tests: edges on a controllable clock, served serials."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from certstore import generate_key_text
from proxy.app.config import Config
from proxy.app.wiring import EdgeWorker
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from support.edge import EdgeHandle, FakeClock, client_context, make_config
from support.net import next_edge_address


class Edge(EdgeHandle):
    """An EdgeHandle on a FakeClock, its worker built at once, with no background renewal
    loop (`new_edge_config`): tests call run_maintenance()."""

    def __init__(self, config: Config, key_text: str, clock: FakeClock, ip: str) -> None:
        super().__init__(
            ip=ip, target=config.edge.cname_target, config=config, key_text=key_text, clock=clock
        )
        self.worker = EdgeWorker(config, clock=clock)

    async def start(self, clock: Callable[[], float] | None = None) -> Edge:
        if self.worker is None:
            await super().start(clock)
        else:
            await self.worker.start()
        return self

    async def stop(self) -> None:  # the worker stays inspectable after it stopped
        if self.worker is not None:
            await self.worker.close()

    async def restart(self) -> None:
        await self.stop()
        self.worker = None
        await self.start()

    async def served_serial(self, host: str, pebble: PebbleServer) -> str:
        return await served_serial(self.ip, self.https_port, host, client_context(pebble))


def new_edge_config(
    tmp_path: Path,
    pebble: PebbleServer,
    dns: DNSServer,
    backend_url: str,
    *,
    store_dir: Path | None = None,
    key_text: str | None = None,
) -> tuple[Config, str, str, str]:
    """Config for an edge on a fresh 127.0.0.N; returns (config, key_text, ip, target)."""
    ip, target = next_edge_address()
    dns.set_a(target, [ip])
    store_dir = store_dir or tmp_path
    key_text = key_text or generate_key_text()
    (store_dir / "store.key").write_text(key_text)
    config = make_config(store_dir, ip, target, pebble, dns, backend_url)
    config.renewal.interval_seconds = 0  # the tests drive maintenance themselves
    return config, key_text, ip, target


async def served_serial(ip: str, port: int, host: str, ctx: ssl.SSLContext) -> str:
    """Hex serial of the certificate a real TLS handshake gets (verified against ctx)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(ip, port, ssl=ctx, server_hostname=host), 30
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass
    return format(x509.load_der_x509_certificate(der).serial_number, "x")
