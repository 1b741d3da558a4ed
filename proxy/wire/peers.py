"""Who is at the other end of a connection, as the HTTP handlers should see it.

Behind an L4 load balancer speaking the PROXY protocol, the TCP peer is the
balancer; the client is what its header says. The listener that read the header
records a :class:`ConnectionInfo` for the connection, and request handlers ask
:func:`client_address`.

How it travels: the listener sets a ContextVar in the connection's own task just
before handing the socket to asyncio (`loop.connect_accepted_socket`). asyncio
runs a transport's callbacks in a copy of the context they were created in, so
aiohttp's connection task, and with it every request on that keep-alive
connection, sees the value; other connections, with tasks of their own, never
do. Chosen over a table keyed by transport or protocol object: the transport only
exists once the hand-off returns, and whether aiohttp has started on a request by
then is down to callback ordering inside asyncio and aiohttp (not seen on 3.11,
even with the request in the same segment as the TLS Finished, but nothing
promises it); aiohttp's protocol cannot carry an attribute (slots); and there is
no entry to remove when the connection ends.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

from aiohttp import web

__all__ = [
    "ConnectionInfo",
    "TrustedNetworks",
    "client_address",
    "connection_client",
    "set_connection_info",
    "set_tls_host",
    "source_key",
    "tls_host",
]


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    client: tuple[str, int]  # the client, as the PROXY header reported it
    balancer: tuple[str, int]  # the TCP peer that sent the header


_connection: ContextVar[ConnectionInfo | None] = ContextVar("linkedge_connection", default=None)


def set_connection_info(info: ConnectionInfo) -> None:
    """Record the real client for the current connection task (see the module doc)."""
    _connection.set(info)


# The host whose certificate a TLS connection was given (its SNI, normalised, or
# edge.no_sni_host for a client without SNI); None on plain HTTP. Travels like
# ConnectionInfo: set in the connection's task while the context is chosen.
_tls_host: ContextVar[str | None] = ContextVar("linkedge_tls_host", default=None)


def set_tls_host(hostname: str) -> None:
    _tls_host.set(hostname)


def tls_host() -> str | None:
    """The certificate's host for the current TLS connection (None: plain HTTP)."""
    return _tls_host.get()


def client_address(request: web.Request) -> str | None:
    """The client's IP: from the PROXY header when there was one, else the TCP peer."""
    info = _connection.get()
    if info is not None:
        return info.client[0]
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


def connection_client(transport: object) -> str | None:
    """The client's IP for a connection being made (the same answer as `client_address`).

    For protocols' `connection_made`, which runs in the connection's context.
    """
    info = _connection.get()
    if info is not None:
        return info.client[0]
    get_extra_info = getattr(transport, "get_extra_info", None)
    peer = get_extra_info("peername") if get_extra_info is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


class TrustedNetworks:
    """A set of CIDR networks; `ip in networks` for an address string."""

    def __init__(self, cidrs: Iterable[str], what: str = "networks") -> None:
        networks = []
        for cidr in cidrs:
            try:
                networks.append(ipaddress.ip_network(cidr.strip()))
            except ValueError as exc:
                raise ValueError(f"{what}: {cidr!r} is not a CIDR network ({exc})") from None
        self._networks = tuple(networks)
        # Few distinct peers in practice (the balancers); bounded for the rest.
        self._lookup = functools.lru_cache(maxsize=4096)(self._contains)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, ip: object) -> bool:
        return isinstance(ip, str) and self._lookup(ip)

    def __repr__(self) -> str:
        return f"TrustedNetworks({[str(n) for n in self._networks]})"

    def _contains(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
        return any(address in network for network in self._networks)


def source_key(ip: str) -> str:
    """What one client is, for per-source limits: an IPv4 address or an IPv6 /64.

    An IPv6 host usually has a whole /64 to pick addresses from.
    """
    if ":" not in ip or ip.startswith("::ffff:"):
        return ip
    try:
        network = ipaddress.IPv6Network((ip.split("%", 1)[0], 64), strict=False)
    except ValueError:
        return ip
    return str(network)
