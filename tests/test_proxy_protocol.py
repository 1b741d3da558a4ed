"""Tests for proxy.wire.proxy_protocol: v1 and v2 headers, framing edge cases, fuzzing."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.proxy_protocol import v1_header, v2_header

from proxy.wire.proxy_protocol import (
    MAX_V1_LENGTH,
    MalformedProxyHeader,
    NotProxyProtocol,
    ProxyHeader,
    ProxyProtocolError,
    parse_proxy_header,
)

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HELLO = b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0"  # what follows on a TLS listener


def parsed(data: bytes) -> ProxyHeader:
    header = parse_proxy_header(data)
    assert header is not None
    return header


# --------------------------------------------------------------------------- v1


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\n"
    assert parsed(line + HELLO) == ProxyHeader(
        1, len(line), ("203.0.113.7", 56324), ("192.0.2.1", 443)
    )


def test_v1_tcp6_is_normalised() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0::7 ::1 65535 0\r\n"
    header = parsed(line)
    assert header.source == ("2001:db8::7", 65535)
    assert header.destination == ("::1", 0)
    assert header.length == len(line)


def test_v1_unknown_ignores_the_rest_of_the_line() -> None:
    assert parsed(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, 15, None, None)
    line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    assert parsed(line + b"GET /") == ProxyHeader(1, len(line), None, None)


def test_v1_longest_line_is_accepted() -> None:
    src = dst = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = v1_header((src, 65535), (dst, 65535))
    assert len(line) == 104  # spec: the worst TCP6 case, under the 107-byte limit
    assert parsed(line).source == (src, 65535)
    unknown = b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 16) + b"\r\n"
    assert len(unknown) == MAX_V1_LENGTH
    assert parsed(unknown).length == MAX_V1_LENGTH


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "fields"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "not IPv4"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "not IPv4"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not IPv6"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "fields"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 1.2.3.4\x005.6.7.8 1 2\r\n", "byte"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "byte"),  # LF without CR
        (b"PROXY UNKNOWN \xff\r\n", "byte"),
        (b"PROXY " + b"A" * 101, "no CRLF"),
        (b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 15) + b"\r\n", "no CRLF"),
    ],
)
def test_v1_malformed(data: bytes, message: str) -> None:
    with pytest.raises(MalformedProxyHeader, match=message):
        parse_proxy_header(data)


# --------------------------------------------------------------------------- v2


def test_v2_inet() -> None:
    header = v2_header(("198.51.100.9", 40000), ("192.0.2.1", 443))
    assert len(header) == 28
    assert parsed(header + HELLO) == ProxyHeader(2, 28, ("198.51.100.9", 40000), ("192.0.2.1", 443))


def test_v2_inet6_with_tlvs_skipped() -> None:
    tlvs = [(0x01, b"h2"), (0x02, b"links.shop.test"), (0xEA, b"\x01vpce-0123"), (0x04, b"")]
    header = v2_header(("2001:db8::9", 1), ("2001:db8::1", 443), tlvs=tlvs)
    result = parsed(header + HELLO)
    assert result.length == len(header)
    assert result.source == ("2001:db8::9", 1)


def test_v2_local_and_unspec_report_no_address() -> None:
    # LOCAL: the balancer's own connection (health check); addresses are ignored
    local = v2_header(("10.0.0.2", 5), ("10.0.0.1", 443), local=True)
    assert parsed(local) == ProxyHeader(2, len(local), None, None)
    assert parsed(v2_header(None, None, local=True)) == ProxyHeader(2, 16, None, None)
    unspec = v2_header(None, None)
    assert parsed(unspec) == ProxyHeader(2, 16, None, None)


def test_v2_unix_reports_no_address() -> None:
    body = b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")
    header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x31" + struct.pack("!H", len(body)) + body
    assert parsed(header) == ProxyHeader(2, len(header), None, None)


def test_v2_large_header() -> None:
    header = v2_header(("192.0.2.5", 7), ("192.0.2.1", 443), tlvs=[(0xE0, b"z" * 60000)])
    assert parsed(header).length == len(header) > 60000


V2_INET_PREFIX = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (V2_INET_PREFIX + b"\x11\x11\x00\x0c", "version 1"),
        (V2_INET_PREFIX + b"\x31\x11\x00\x0c", "version 3"),
        (V2_INET_PREFIX + b"\x22\x11\x00\x0c", "command 2"),
        (V2_INET_PREFIX + b"\x21\x41\x00\x0c", "family"),
        (V2_INET_PREFIX + b"\x21\x13\x00\x0c", "family"),
        (V2_INET_PREFIX + b"\x21\x12\x00\x0c", "datagram"),
        (V2_INET_PREFIX + b"\x21\x11\x00\x0b", "shorter than its address block"),
        (V2_INET_PREFIX + b"\x21\x21\x00\x0c", "shorter than its address block"),
        (V2_INET_PREFIX + b"\x21\x31\x00\x10", "shorter than its address block"),
        (
            V2_INET_PREFIX + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x05\x00",
            "TLV runs past",
        ),
    ],
)
def test_v2_malformed(data: bytes, message: str) -> None:
    with pytest.raises(MalformedProxyHeader, match=message):
        parse_proxy_header(data)


def test_v2_trailing_bytes_shorter_than_a_tlv_header_are_padding() -> None:
    body = bytes(12) + b"\x00\x00"
    header = V2_INET_PREFIX + b"\x21\x11" + struct.pack("!H", len(body)) + body
    assert parsed(header).length == 30


def test_v2_dgram_is_fine_for_local() -> None:
    assert parsed(V2_INET_PREFIX + b"\x20\x12\x00\x00").source is None


# --------------------------------------------------------------------------- missing


@pytest.mark.parametrize(
    "data",
    [HELLO, b"GET / HTTP/1.1\r\n", b"proxy TCP4", b"PROXY\t", b"\r\n\r\n\x00\r\nQUITX", b"\x00"],
)
def test_no_header(data: bytes) -> None:
    with pytest.raises(NotProxyProtocol):
        parse_proxy_header(data)


@pytest.mark.parametrize(
    "header",
    [
        v1_header(("203.0.113.7", 1), ("192.0.2.1", 443)),
        v2_header(("203.0.113.7", 1), ("192.0.2.1", 443), tlvs=[(1, b"http/1.1")]),
        v2_header(("2001:db8::9", 1), ("2001:db8::1", 443)),
    ],
)
def test_every_proper_prefix_needs_more(header: bytes) -> None:
    assert parse_proxy_header(b"") is None
    for i in range(1, len(header)):
        assert parse_proxy_header(header[:i]) is None, i
    assert parsed(header).length == len(header)


# --------------------------------------------------------------------------- fuzzing

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int], tuple[str, int]]:
    ips = draw(st.sampled_from([ipv4, ipv6]))
    src, dst = (draw(ips), draw(ports)), (draw(ips), draw(ports))
    if draw(st.booleans()):
        return v1_header(src, dst), src, dst
    tlvs = draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4))
    return v2_header(src, dst, tlvs=tlvs), src, dst


def same_address(reported: tuple[str, int] | None, sent: tuple[str, int]) -> bool:
    assert reported is not None
    return ipaddress.ip_address(reported[0]) == ipaddress.ip_address(sent[0]) and (
        reported[1] == sent[1]
    )


@given(headers(), st.binary(max_size=64))
@FUZZ
def test_fuzz_roundtrip(case: tuple[bytes, tuple[str, int], tuple[str, int]], rest: bytes) -> None:
    header, src, dst = case
    result = parsed(header + rest)
    assert result.length == len(header)
    assert same_address(result.source, src)
    assert same_address(result.destination, dst)


@given(st.binary(max_size=300))
@FUZZ
def test_fuzz_random_bytes_only_raise_our_errors(data: bytes) -> None:
    check_any_bytes(data)


def check_any_bytes(data: bytes) -> None:
    try:
        result = parse_proxy_header(data)
    except ProxyProtocolError:
        return
    if result is not None:
        assert 0 < result.length <= len(data)


@given(st.sampled_from([b"PROXY ", V2_INET_PREFIX]), st.binary(max_size=300))
@FUZZ
def test_fuzz_after_a_signature(signature: bytes, rest: bytes) -> None:
    check_any_bytes(signature + rest)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    header, _, _ = draw(headers())
    data = bytearray(header + draw(st.binary(max_size=16)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data)


def verdict(data: bytes) -> object:
    try:
        return parse_proxy_header(data)
    except ProxyProtocolError as exc:
        return type(exc)


@given(mutated(), st.data())
@FUZZ
def test_fuzz_a_verdict_is_final(data: bytes, draw: st.DataObject) -> None:
    """Once a prefix is accepted or rejected, every longer input gets the same answer."""
    cut = draw.draw(st.integers(0, len(data)))
    first = verdict(data[:cut])
    if first is None:
        return
    assert verdict(data) == first
