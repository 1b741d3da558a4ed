"""The one way tests start a Pebble: free ports, the test DNS server, stopped on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from support.net import FLEET_IPS, free_port, free_port_everywhere

# where edges listen on Pebble's HTTP-01 port: the default address and the fleets'
_HTTP_01_AT = ("127.0.0.1", *FLEET_IPS)


@contextlib.contextmanager
def running_pebble(
    workdir: Path, dns: DNSServer, *, http_port: int | None = None, **options: Any
) -> Iterator[PebbleServer]:
    """A started Pebble resolving through `dns`; `options` as PebbleServer's (validity,
    extra config...). Edges answer HTTP-01 on `http_port`, one port for all of them."""
    server = PebbleServer(
        workdir,
        dns.nameserver,
        # free at the fleets' addresses too: their nodes listen on it there
        http_port=http_port if http_port is not None else free_port_everywhere(_HTTP_01_AT),
        tls_port=free_port(),
        **options,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
