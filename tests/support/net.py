"""Loopback ports and addresses for the servers tests start."""

from __future__ import annotations

import itertools
import socket

# Every edge gets its own loopback address 127.0.0.N (and target edge-N.linkedge.test):
# Pebble validates HTTP-01 on one fixed port, so edges share it on distinct addresses.
_addresses = itertools.count(10)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def next_edge_address() -> tuple[str, str]:
    """(ip, target name) for a new edge: 127.0.0.N and edge-N.linkedge.test."""
    n = next(_addresses)
    return f"127.0.0.{n}", f"edge-{n}.linkedge.test"
