"""Loopback ports and addresses for the servers tests start."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Collection

# Every edge gets its own loopback address 127.0.0.N (and target edge-N.linkedge.test):
# Pebble validates HTTP-01 on one fixed port, so edges share it on distinct addresses.
_addresses = itertools.count(10)
# The fleets' nodes (support/fleet.py), each listening on Pebble's HTTP-01 port there.
FLEET_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def free_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """A port nothing listens on at `host` right now, and not one of `avoid`: ports the
    caller is about to listen on at `host` itself (Pebble's HTTP-01 port, a port several
    listeners share), which are still free there."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_everywhere(hosts: Collection[str], avoid: Collection[int] = ()) -> int:
    """A port free at every one of `hosts` right now (one port number that servers on
    several addresses will all listen on)."""
    first, *rest = hosts
    while True:
        port = free_port(first, avoid)
        if all(port_free(host, port) for host in rest):
            return port


def client_source(n: int) -> str:
    """The `n`th source address for a test's clients (per-source bounds): 127.0.99.n,
    where no test server listens. A client socket bound to a server's address holds its
    port there, and a server started later cannot listen on that port (two full runs had
    a fleet node refused Pebble's HTTP-01 port at 127.0.0.2 and .4, where
    test_connection_bounds' clients had been)."""
    return f"127.0.99.{n}"


def next_edge_address() -> tuple[str, str]:
    """(ip, target name) for a new edge: edge-N.linkedge.test on 127.0.0.N for N up to
    254, then on 127.0.1.10 onwards, and so on (a full run starts more than 245 edges;
    Linux answers on all of 127.0.0.0/8)."""
    n = next(_addresses)
    block, host = divmod(n - 10, 245)
    return f"127.0.{block}.{10 + host}", f"edge-{n}.linkedge.test"
