"""Splitting addresses written as text (sans-IO; `proxy/app/config.py` validates them at load)."""

from __future__ import annotations


def nameserver_address(value: str) -> tuple[str, int]:
    """'host', 'host:port' or '[v6]:port' -> (host, port); port 53 unless given."""
    if value.count(":") == 1 or value.startswith("["):
        host, _, port = value.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return host, int(port)
    return value, 53
