"""A recipient's HTTPS client for the demo and tests: real TLS, verified against a root."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult


class StaticResolver(AbstractResolver):
    """Sends every name to one address: the edge, as the customer's CNAME would."""

    def __init__(self, ip: str) -> None:
        self._ip = ip

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host=self._ip, port=port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        pass


def verifying_context(root_pem_path: str) -> ssl.SSLContext:
    """Strict client context (chain, name, expiry) trusting only the given root."""
    return ssl.create_default_context(cafile=root_pem_path)


def edge_session(ip: str, root_pem_path: str, **kwargs: object) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        resolver=StaticResolver(ip), ssl=verifying_context(root_pem_path), force_close=True
    )
    return aiohttp.ClientSession(connector=connector, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Click:
    status: int
    location: str | None
    seconds: float
    peer_certificate: dict[str, object] | None


async def click(session: aiohttp.ClientSession, url: str) -> Click:
    """One tracked-link click, as an app would: the redirect is read, not followed."""
    started = time.perf_counter()
    async with session.get(url, allow_redirects=False) as resp:
        cert = None
        if resp.connection is not None and resp.connection.transport is not None:
            ssl_object = resp.connection.transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                cert = ssl_object.getpeercert()
        await resp.read()
        return Click(
            status=resp.status,
            location=resp.headers.get("Location"),
            seconds=time.perf_counter() - started,
            peer_certificate=cert,
        )
