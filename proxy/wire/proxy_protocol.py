"""Sans-IO parser for the PROXY protocol header (HAProxy's spec, v1 text and v2 binary).

An L4 load balancer that forwards TCP connections to the edge puts one header
in front of each connection's bytes saying whom it accepted it from; without it
the edge would see only the balancer's address. The listener peeks (MSG_PEEK)
at the first bytes and calls :func:`parse_proxy_header` with everything received
so far. The answer is ``None`` ("valid so far, peek again with more bytes"), a
:class:`ProxyHeader` (its ``length`` says exactly how many bytes to consume, so
the TLS ClientHello or HTTP request after it stays untouched), or a
:class:`ProxyProtocolError`. Like :mod:`proxy.wire.clienthello`, a verdict is final:
once a prefix is accepted or rejected, longer input gets the same answer.

Our own rather than the PyPI ``proxy-protocol`` package: that one is built around
asyncio stream readers (we peek on raw sockets before asyncio owns them), reports
"need more" by exception, lets ``ValueError``/``struct.error`` escape on some
malformed input, and does not bound the v1 line. The format is small enough to
parse in ~150 lines that are fuzzed with hypothesis like the ClientHello parser.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

__all__ = [
    "MAX_HEADER",
    "MAX_V1_LENGTH",
    "V2_SIGNATURE",
    "MalformedProxyHeader",
    "NotProxyProtocol",
    "ProxyHeader",
    "ProxyProtocolError",
    "parse_proxy_header",
]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1_LENGTH = 107  # the longest v1 line, CRLF included (spec §2.1)
_V2_FIXED = 16  # signature, version/command, family/transport, length
MAX_HEADER = _V2_FIXED + 0xFFFF  # the longest v2 header (the length field is 16 bits)

_LOCAL, _PROXY = 0, 1  # v2 commands
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3  # v2 address families
_DGRAM = 2  # v2 transport protocol (1 is STREAM, 0 UNSPEC)
_ADDRESS_BLOCK = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_TLV_HEADER = 3  # type (1 byte) + length (2 bytes)

# A v1 line is printable US-ASCII; bytes.translate(None, these) leaves the rest.
_V1_CHARS = bytes(range(0x20, 0x7F))


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    length: int  # bytes of the stream the header occupies
    # The client's (address, port) as the balancer saw it. None when the header
    # carries no usable address (v2 LOCAL, e.g. the balancer's own health check;
    # v1 UNKNOWN; v2 AF_UNSPEC or AF_UNIX): the spec then says to use the real
    # connection's endpoints.
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


class ProxyProtocolError(ValueError):
    """The bytes cannot be a PROXY protocol header we accept."""


class NotProxyProtocol(ProxyProtocolError):
    """The stream does not start with either header signature (no header was sent)."""


class MalformedProxyHeader(ProxyProtocolError):
    """A PROXY header signature, but broken, oversized or inconsistent content."""


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """Parse the header at the start of ``data``; None while it is incomplete."""
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    if V2_SIGNATURE.startswith(data) or V1_PREFIX.startswith(data):
        return None  # a signature's beginning (or nothing yet)
    raise NotProxyProtocol(f"stream starts with {bytes(data[:8])!r}, not a PROXY header")


# --------------------------------------------------------------------------- v1


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    if end < 0:
        # Incomplete so far: reject what can already be seen to be wrong, so that
        # the verdict does not depend on how the bytes were split.
        seen = data[:MAX_V1_LENGTH]
        _check_v1_chars(seen[:-1] if seen.endswith(b"\r") else seen)
        if len(data) >= MAX_V1_LENGTH:
            raise MalformedProxyHeader(f"v1 header has no CRLF within {MAX_V1_LENGTH} bytes")
        return None
    line = data[len(V1_PREFIX) : end]
    _check_v1_chars(line)
    fields = line.split(b" ")
    protocol = fields[0]
    if protocol == b"UNKNOWN":  # the rest of the line is to be ignored (spec §2.1)
        return ProxyHeader(1, end + 2, None, None)
    if protocol == b"TCP4":
        family = socket.AF_INET
    elif protocol == b"TCP6":
        family = socket.AF_INET6
    else:
        raise MalformedProxyHeader(f"v1 protocol {protocol[:16]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 5:
        raise MalformedProxyHeader(
            f"v1 {protocol.decode()} line has {len(fields) - 1} fields, expected 4 "
            "(source, destination, source port, destination port; single spaces)"
        )
    _, src, dst, sport, dport = fields
    return ProxyHeader(
        1,
        end + 2,
        (_v1_ip(family, src), _v1_port(sport)),
        (_v1_ip(family, dst), _v1_port(dport)),
    )


def _check_v1_chars(text: bytes) -> None:
    bad = text.translate(None, _V1_CHARS)
    if bad:
        raise MalformedProxyHeader(f"v1 header contains the byte {bad[:1]!r}")


def _v1_ip(family: socket.AddressFamily, text: bytes) -> str:
    try:
        packed = socket.inet_pton(family, text.decode("ascii"))
    except (OSError, ValueError):
        kind = "IPv4" if family == socket.AF_INET else "IPv6"
        raise MalformedProxyHeader(f"v1 address {text[:46]!r} is not {kind}") from None
    return socket.inet_ntop(family, packed)  # canonical form (IPv6 compressed)


def _v1_port(text: bytes) -> int:
    if not (1 <= len(text) <= 5 and text.isdigit()) or int(text) > 65535:
        raise MalformedProxyHeader(f"v1 port {text[:8]!r} is not 0..65535")
    return int(text)


# --------------------------------------------------------------------------- v2


def _parse_v2(data: bytes) -> ProxyHeader | None:
    n = len(data)
    if n == 12:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise MalformedProxyHeader(f"v2 signature with version {version}")
    if command not in (_LOCAL, _PROXY):
        raise MalformedProxyHeader(f"v2 command {command} is not LOCAL or PROXY")
    if n <= 13:
        return None
    family, transport = data[13] >> 4, data[13] & 0x0F
    if family not in _ADDRESS_BLOCK or transport > _DGRAM:
        raise MalformedProxyHeader(f"v2 address family/transport byte 0x{data[13]:02x}")
    if command == _PROXY and transport == _DGRAM:
        raise MalformedProxyHeader("v2 header describes a datagram (UDP) connection")
    if n < _V2_FIXED:
        return None
    body = int.from_bytes(data[14:16], "big")
    total = _V2_FIXED + body
    if command == _LOCAL:  # the balancer's own connection: skip whatever follows
        return ProxyHeader(2, total, None, None) if n >= total else None
    addresses = _ADDRESS_BLOCK[family]
    if body < addresses:
        raise MalformedProxyHeader(
            f"v2 header length {body} is shorter than its address block ({addresses} bytes)"
        )
    if n < total:
        return None
    _check_tlvs(data, _V2_FIXED + addresses, total)
    if family == _AF_INET:
        return ProxyHeader(
            2,
            total,
            (socket.inet_ntop(socket.AF_INET, data[16:20]), _port(data, 24)),
            (socket.inet_ntop(socket.AF_INET, data[20:24]), _port(data, 26)),
        )
    if family == _AF_INET6:
        return ProxyHeader(
            2,
            total,
            (socket.inet_ntop(socket.AF_INET6, data[16:32]), _port(data, 48)),
            (socket.inet_ntop(socket.AF_INET6, data[32:48]), _port(data, 50)),
        )
    return ProxyHeader(2, total, None, None)  # AF_UNSPEC, AF_UNIX: no IP to report


def _port(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def _check_tlvs(data: bytes, pos: int, end: int) -> None:
    """TLVs (ALPN, authority, CRC, vendor fields) are skipped, but must fit the header."""
    # Like HAProxy, fewer than a TLV header's bytes at the end are tolerated padding.
    while pos + _TLV_HEADER <= end:
        pos += _TLV_HEADER + int.from_bytes(data[pos + 1 : pos + 3], "big")
    if pos > end:
        raise MalformedProxyHeader("v2 TLV runs past the end of the header")
