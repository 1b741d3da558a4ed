"""Tests for proxy.wire.clienthello: real ClientHellos, framing edge cases, fuzzing."""

from __future__ import annotations

import functools
import shutil
import socket
import ssl
import subprocess

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.wire import clienthello
from proxy.wire.clienthello import (
    DECODE_ERROR,
    HANDSHAKE_FAILURE,
    INTERNAL_ERROR,
    MAX_CLIENT_HELLO,
    PROTOCOL_VERSION,
    UNRECOGNIZED_NAME,
    ClientHello,
    ClientHelloError,
    MalformedClientHello,
    NotTLS,
    alert_record,
    parse_client_hello,
)

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- helpers


@functools.cache
def python_hello(
    server_hostname: str | None = "example.com",
    alpn: tuple[str, ...] = (),
    tls12_only: bool = False,
) -> bytes:
    """The first flight of Python's ssl client, captured with MemoryBIO."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if tls12_only:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    data = outgoing.read()
    assert data[:1] == b"\x16"
    return data


def parsed(data: bytes) -> ClientHello:
    hello = parse_client_hello(data)
    assert hello is not None
    return hello


def vec(len_size: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(len_size, "big") + payload


def ext(ext_type: int, body: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + vec(2, body)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    return ext(0, vec(2, b"".join(bytes([name_type]) + vec(2, n) for n in names)))


def alpn_ext(*names: bytes) -> bytes:
    return ext(16, vec(2, b"".join(vec(1, n) for n in names)))


def hello_body(
    extensions: bytes | None = b"",
    *,
    version: bytes = b"\x03\x03",
    session_id: bytes = bytes(32),
    suites: bytes = b"\x13\x01\x00\xff",
    compression: bytes = b"\x00",
) -> bytes:
    body = version + bytes(range(32)) + vec(1, session_id) + vec(2, suites) + vec(1, compression)
    if extensions is not None:
        body += vec(2, extensions)
    return body


def handshake(body: bytes, hs_type: int = 1) -> bytes:
    return bytes([hs_type]) + vec(3, body)


def records(message: bytes, size: int = 2**14, version: bytes = b"\x03\x01") -> bytes:
    """Frame a handshake message as handshake records of at most ``size`` bytes."""
    chunks = [message[i : i + size] for i in range(0, len(message), size)]
    return b"".join(b"\x16" + version + vec(2, chunk) for chunk in chunks)


def unframe(stream: bytes) -> bytes:
    """The handshake bytes carried by a sequence of records."""
    out, pos = b"", 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        out += stream[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return out


def synthetic(*exts: bytes, size: int = 2**14) -> bytes:
    return records(handshake(hello_body(b"".join(exts))), size)


CCS_RECORD = b"\x14\x03\x03\x00\x01\x01"
ALERT_RECORD = b"\x15\x03\x03\x00\x02\x02\x28"
SSLV2_HELLO = bytes.fromhex(
    "802e0103010015000000100700c00500800300800100800600400400800200803d6d2c4a8f3b1e"
)


# --------------------------------------------------------------------------- real hellos


@pytest.mark.parametrize(
    ("hostname", "alpn", "tls12", "expected"),
    [
        (
            "example.com",
            ("h2", "http/1.1"),
            False,
            ClientHello("example.com", ("h2", "http/1.1"), 0),
        ),
        ("a.acme.test", ("acme-tls/1",), False, ClientHello("a.acme.test", ("acme-tls/1",), 0)),
        (None, (), False, ClientHello(None, (), 0)),
        ("old.example", ("http/1.1",), True, ClientHello("old.example", ("http/1.1",), 0)),
        ("Links.EXAMPLE.com.", (), False, ClientHello("links.example.com", (), 0)),
        ("MiXeD.Test", ("h2",), True, ClientHello("mixed.test", ("h2",), 0)),
        ("under_score.test", (), False, ClientHello("under_score.test", (), 0)),
        # Python's ssl does not send SNI for IP literals (RFC 6066 §3).
        ("127.0.0.1", (), False, ClientHello(None, (), 0)),
    ],
)
def test_python_client_hello(
    hostname: str | None, alpn: tuple[str, ...], tls12: bool, expected: ClientHello
) -> None:
    data = python_hello(hostname, alpn, tls12)
    hello = parse_client_hello(data)
    assert hello == ClientHello(expected.server_name, expected.alpn, len(data))


OPENSSL_CASES = [
    (["-servername", "x.test", "-alpn", "http/1.1"], ClientHello("x.test", ("http/1.1",), 0)),
    (
        ["-servername", "Y.Test", "-alpn", "h2,http/1.1", "-tls1_2"],
        ClientHello("y.test", ("h2", "http/1.1"), 0),
    ),
    (["-noservername"], ClientHello(None, (), 0)),
]


@functools.cache
def openssl_hello(args: tuple[str, ...]) -> bytes:
    """Capture what `openssl s_client` sends to a local listening socket."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        port = server.getsockname()[1]
        proc = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while parse_client_hello(data) is None:
                    chunk = conn.recv(65536)
                    assert chunk, f"s_client closed after {len(data)} bytes"
                    data += chunk
                return data
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
@pytest.mark.parametrize(("args", "expected"), OPENSSL_CASES)
def test_openssl_s_client_hello(args: list[str], expected: ClientHello) -> None:
    data = openssl_hello(tuple(args))
    hello = parse_client_hello(data)
    assert hello is not None
    assert (hello.server_name, hello.alpn) == (expected.server_name, expected.alpn)
    assert hello.record_bytes == len(data)  # s_client sends nothing else before the reply
    assert all(parse_client_hello(data[:n]) is None for n in range(len(data)))


REAL_HELLOS = [
    python_hello("example.com", ("h2", "http/1.1")),
    python_hello("old.example", ("http/1.1",), True),
    python_hello(None),
]


@pytest.mark.parametrize("data", REAL_HELLOS, ids=["tls13", "tls12", "no-sni"])
def test_every_prefix_needs_more(data: bytes) -> None:
    for n in range(len(data)):
        assert parse_client_hello(data[:n]) is None, n
    assert parse_client_hello(data) is not None


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100, 256, 2**14])
@pytest.mark.parametrize("data", REAL_HELLOS, ids=["tls13", "tls12", "no-sni"])
def test_refragmented_hello_parses_identically(data: bytes, size: int) -> None:
    original = parse_client_hello(data)
    assert original is not None
    fragmented = records(unframe(data), size)
    hello = parse_client_hello(fragmented)
    assert hello == ClientHello(original.server_name, original.alpn, len(fragmented))


def test_every_prefix_of_fragmented_hello_needs_more() -> None:
    fragmented = records(unframe(REAL_HELLOS[0]), 7)
    for n in range(len(fragmented)):
        assert parse_client_hello(fragmented[:n]) is None, n
    assert parse_client_hello(fragmented) is not None


@pytest.mark.parametrize("after", [CCS_RECORD, ALERT_RECORD, b"\x17\x03\x03\x00\x05hello", b"junk"])
def test_bytes_after_the_hello_are_ignored(after: bytes) -> None:
    data = REAL_HELLOS[0]
    assert parse_client_hello(data + after) == parse_client_hello(data)
    assert parse_client_hello(data + after) == ClientHello("example.com", ("h2", "http/1.1"), 517)


# --------------------------------------------------------------------------- synthetic, valid


def test_synthetic_hello_with_sni_and_alpn() -> None:
    data = synthetic(sni_ext(b"Shop.Example.ORG."), alpn_ext(b"h2", b"http/1.1"))
    assert parse_client_hello(data) == ClientHello(
        "shop.example.org", ("h2", "http/1.1"), len(data)
    )


def test_hello_without_extensions_block() -> None:
    # SSL 3.0-era ClientHello: the body ends after compression_methods.
    data = records(handshake(hello_body(None, version=b"\x03\x00", session_id=b"")))
    assert parse_client_hello(data) == ClientHello(None, (), len(data))


def test_empty_extensions_block() -> None:
    data = synthetic()
    assert parse_client_hello(data) == ClientHello(None, (), len(data))


def test_unknown_extensions_and_name_types_are_skipped() -> None:
    data = synthetic(
        ext(0xFAFA, b""),  # GREASE extension
        ext(43, b"\x02\x03\x04"),
        sni_ext(b"opaque-thing", name_type=7),
        ext(0x1234, b"x" * 300),
    )
    assert parse_client_hello(data) == ClientHello(None, (), len(data))


def test_sni_list_with_unknown_type_and_host_name() -> None:
    names = b"\x07" + vec(2, b"other") + b"\x00" + vec(2, b"host.test")
    assert parsed(synthetic(ext(0, vec(2, names)))).server_name == "host.test"


def test_grease_alpn_ids_are_ignored() -> None:
    data = synthetic(alpn_ext(b"\x1a\x1a", b"h2", b"\xfa\xfa", b"**", b"http/1.1"))
    # b"**" is 0x2A2A, a GREASE value too.
    assert parsed(data).alpn == ("h2", "http/1.1")


def test_longest_host_name() -> None:
    name = b".".join([b"a" * 63] * 4)[:255]
    assert len(name) == 255
    assert parsed(synthetic(sni_ext(name))).server_name == name.decode()


def test_max_size_is_inclusive() -> None:
    message = handshake(hello_body(sni_ext(b"a.test")))
    data = records(message)
    assert parse_client_hello(data, max_size=len(message) - 4) is not None
    with pytest.raises(MalformedClientHello, match="exceeds"):
        parse_client_hello(data, max_size=len(message) - 5)


# --------------------------------------------------------------------------- incomplete


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x16",
        b"\x16\x03",
        b"\x16\x03\x01",
        b"\x16\x03\x01\x02",
        b"\x16\x03\x01\x02\x00",
        b"\x16\x03\x01\x02\x00\x01",
        b"\x16\x03\x01" + (2**14 + 2048).to_bytes(2, "big") + b"\x01\x00",
        b"\x16\x03\x00\x00\x01\x01",  # SSL 3.0 record version, header split over records
        b"\x16\x03\x03\x00\x01\x01" + b"\x16\x03\x03\x00\x02\x00\x00",
    ],
)
def test_need_more(data: bytes) -> None:
    assert parse_client_hello(data) is None


# --------------------------------------------------------------------------- NotTLS


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"G",
        b"POST /x HTTP/1.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x00",
        b"\xff\xff\xff",
        SSLV2_HELLO,
        SSLV2_HELLO[:1],
        ALERT_RECORD,  # a TLS record, but not a handshake
        b"\x17\x03\x03\x00\x10",
        b"\x16\x02",  # handshake type byte, but no TLS major version
        b"\x16\x04",
        b"\x16\x03\x09",
    ],
)
def test_not_tls(data: bytes) -> None:
    with pytest.raises(NotTLS):
        parse_client_hello(data)


def test_sslv2_has_clear_message() -> None:
    with pytest.raises(NotTLS, match="SSLv2"):
        parse_client_hello(SSLV2_HELLO)


@given(st.integers(0, 255).filter(lambda b: b != 22), st.binary(max_size=20))
@settings(max_examples=300, deadline=None)
def test_any_other_first_byte_is_not_tls(first: int, rest: bytes) -> None:
    with pytest.raises(NotTLS):
        parse_client_hello(bytes([first]) + rest)


# --------------------------------------------------------------------------- Malformed


def _bad_record_version_later() -> bytes:
    message = handshake(hello_body())
    return records(message[:10]) + records(message[10:], version=b"\x02\x00")


def _interleaved(record: bytes) -> bytes:
    message = unframe(REAL_HELLOS[0])
    return records(message[:100]) + record + records(message[100:])


MALFORMED = {
    # record layer
    "zero-length record": (b"\x16\x03\x01\x00\x00", "record length 0"),
    "oversized record": (b"\x16\x03\x01" + (2**14 + 2049).to_bytes(2, "big"), "record length"),
    "interleaved CCS": (_interleaved(CCS_RECORD), "content type 20"),
    "interleaved alert": (_interleaved(ALERT_RECORD), "content type 21"),
    "interleaved app data prefix": (_interleaved(b"\x17")[:106], "content type 23"),
    "later record version": (_bad_record_version_later(), "major 2"),
    "data after hello in record": (
        records(handshake(hello_body()) + b"\x01"),
        "after the ClientHello",
    ),
    "record overruns hello": (
        b"\x16\x03\x01\x00\xff" + handshake(hello_body()),
        "after the ClientHello",
    ),
    # handshake layer
    "server hello": (records(handshake(hello_body(), hs_type=2)), "handshake type 2"),
    "handshake type early": (b"\x16\x03\x01\x00\x50\x0b", "handshake type 11"),
    "declared length > max": (b"\x16\x03\x01\x40\x00\x01\x01\x00\x01", "65537 bytes exceeds"),
    "declared length 16M": (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "exceeds"),
    "body too short": (records(handshake(b"\x03\x03" + bytes(10))), "random"),
    "empty body": (records(handshake(b"")), "legacy_version"),
    "legacy_version": (records(handshake(hello_body(version=b"\x02\x00"))), "legacy_version"),
    "session id 33": (records(handshake(hello_body(session_id=bytes(33)))), "legacy_session_id"),
    "odd suites": (records(handshake(hello_body(suites=b"\x13\x01\x00"))), "even"),
    "no suites": (records(handshake(hello_body(suites=b""))), "cipher_suites"),
    "no compression": (records(handshake(hello_body(compression=b""))), "compression"),
    "suites overrun": (
        records(handshake(b"\x03\x03" + bytes(32) + b"\x00" + b"\x01\x00" + b"\x13\x01")),
        "cipher_suites",
    ),
    "extensions overrun": (
        records(handshake(hello_body(None) + b"\x00\x10" + ext(0x1234, b""))),
        "extensions",
    ),
    "extension overruns block": (
        records(handshake(hello_body(None) + vec(2, b"\x12\x34\x00\x09abc"))),
        "extension 4660",
    ),
    "trailing after extensions": (
        records(handshake(hello_body(ext(0x1234, b"")) + b"\x00")),
        "trailing",
    ),
    "lone extension type byte": (
        records(handshake(hello_body(b"\x00"))),
        "extension type",
    ),
    "duplicate ALPN": (synthetic(alpn_ext(b"h2"), alpn_ext(b"h2")), "duplicate extension 16"),
    "duplicate SNI": (synthetic(sni_ext(b"a.test"), sni_ext(b"a.test")), "duplicate extension 0"),
    "duplicate unknown": (synthetic(ext(0x1234, b""), ext(0x1234, b"x")), "duplicate"),
    # SNI (RFC 6066 §3)
    "SNI NUL": (synthetic(sni_ext(b"good.test\x00.evil")), "NUL"),
    "SNI control": (synthetic(sni_ext(b"a\r\nb.test")), "control character"),
    "SNI non-ASCII": (synthetic(sni_ext("café.test".encode())), "non-ASCII"),
    "SNI latin-1": (synthetic(sni_ext(b"caf\xe9.test")), "non-ASCII"),
    "SNI space": (synthetic(sni_ext(b"a b.test")), "invalid character"),
    "SNI colon": (synthetic(sni_ext(b"::1")), "invalid character"),
    "SNI slash": (synthetic(sni_ext(b"a.test/x")), "invalid character"),
    "SNI 256 bytes": (synthetic(sni_ext(b"a" * 256)), "256 bytes"),
    "SNI empty name": (synthetic(sni_ext(b"")), "server name"),
    "SNI just a dot": (synthetic(sni_ext(b".")), "empty label"),
    "SNI empty label": (synthetic(sni_ext(b"a..test")), "empty label"),
    "SNI two host names": (synthetic(sni_ext(b"a.test", b"b.test")), "more than one"),
    "SNI empty list": (synthetic(ext(0, vec(2, b""))), "server_name_list"),
    "SNI empty extension": (synthetic(ext(0, b"")), "server_name_list"),
    "SNI trailing": (synthetic(ext(0, vec(2, b"\x00" + vec(2, b"a.test")) + b"\x00")), "trailing"),
    "SNI name overrun": (synthetic(ext(0, vec(2, b"\x00\x00\x20a.test"))), "server name"),
    # ALPN (RFC 7301 §3.1)
    "ALPN non-ASCII": (synthetic(alpn_ext(b"h2", b"\xc3\xa9")), "not ASCII"),
    "ALPN empty name": (synthetic(alpn_ext(b"h2", b"")), "ALPN protocol name"),
    "ALPN empty list": (synthetic(ext(16, vec(2, b""))), "protocol_name_list"),
    "ALPN name overrun": (synthetic(ext(16, vec(2, b"\x05h2"))), "ALPN protocol name"),
    "ALPN trailing": (synthetic(ext(16, vec(2, vec(1, b"h2")) + b"x")), "trailing"),
}


@pytest.mark.parametrize(("data", "match"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed(data: bytes, match: str) -> None:
    with pytest.raises(MalformedClientHello, match=match):
        parse_client_hello(data)


PADDING = ext(21, bytes(2000))  # padding extension (RFC 7685): makes the hello long


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (synthetic(sni_ext(b"nul\x00.test"), PADDING), "NUL"),
        (synthetic(alpn_ext(b"\xff"), PADDING), "not ASCII"),
        (synthetic(ext(1, b""), ext(1, b""), PADDING), "duplicate"),
        (records(handshake(hello_body(PADDING, session_id=bytes(33)))), "legacy_session_id"),
        (records(handshake(hello_body(PADDING, suites=b"\x13\x01\x00"))), "even"),
        (records(handshake(hello_body(PADDING)), 50)[:110] + b"\x16\x03\x01\x00\x00", "length 0"),
    ],
)
def test_malformed_is_detected_before_the_hello_is_complete(data: bytes, match: str) -> None:
    """Garbage early in a long (>2000 bytes) hello is rejected without waiting for the rest."""
    with pytest.raises(MalformedClientHello, match=match):
        parse_client_hello(data[:120])


def test_real_hello_over_max_size_is_rejected_from_its_header() -> None:
    data = REAL_HELLOS[0]
    with pytest.raises(MalformedClientHello, match="exceeds limit of 100"):
        parse_client_hello(data[:9], max_size=100)
    assert parse_client_hello(data[:9]) is None
    assert MAX_CLIENT_HELLO == 65536


# --------------------------------------------------------------------------- fuzzing


SEEDS = [
    *REAL_HELLOS,
    records(unframe(REAL_HELLOS[1]), 40),
    synthetic(sni_ext(b"a.test"), alpn_ext(b"h2", b"http/1.1")),
    synthetic(alpn_ext(b"acme-tls/1"), sni_ext(b"x.y"), size=9),
    records(handshake(hello_body(None, session_id=b""))),
]


@st.composite
def mutated_hellos(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        else:
            del data[i:]
    return bytes(data)


def check_contract(data: bytes) -> ClientHello | None | ClientHelloError:
    """parse_client_hello returns ClientHello/None or raises a ClientHelloError, nothing else."""
    try:
        result = parse_client_hello(data)
    except ClientHelloError as exc:
        assert type(exc) in (NotTLS, MalformedClientHello)
        assert str(exc)
        return exc
    if result is not None:
        assert isinstance(result, ClientHello)
        assert 0 < result.record_bytes <= len(data)
        if result.server_name is not None:
            assert result.server_name == result.server_name.lower()
            assert 0 < len(result.server_name) <= 255
            assert not result.server_name.endswith(".")
        assert all(p and p.isascii() for p in result.alpn)
    return result


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    check_contract(data)


@FUZZ
@given(st.binary(max_size=400), st.integers(0, 2**24 - 1), st.sampled_from([True, False]))
def test_fuzz_body_inside_valid_framing(body: bytes, declared: int, honest: bool) -> None:
    length = len(body) if honest else declared
    check_contract(records(b"\x01" + length.to_bytes(3, "big") + body))


@FUZZ
@given(mutated_hellos())
def test_fuzz_mutated_real_hellos(data: bytes) -> None:
    check_contract(data)


@st.composite
def framed_hellos(draw: st.DrawFn) -> bytes:
    """Hellos whose record and vector lengths agree, with odd content inside: what gets
    past the one-pass parser's framing checks to its SNI, ALPN and extension rules."""
    name = st.one_of(
        st.sampled_from([b"a.test", b"A.Test.", b"x", b"a_b-c.d", b"a" * 255]),
        st.sampled_from([b".", b"a..b", b".a", b"a..", b"a b", b"\xc3\xa9.test", b"a" * 256]),
        st.binary(min_size=0, max_size=12),
    )
    proto = st.one_of(
        st.sampled_from([b"h2", b"http/1.1", b"\x0a\x0a", b"\x1a\x1a", b"acme-tls/1"]),
        st.sampled_from([b"\xff", b"", b"h\x80"]),
        st.binary(min_size=0, max_size=4),
    )
    sni = st.one_of(
        st.builds(lambda n: sni_ext(n), name),
        st.builds(
            lambda ns, t: sni_ext(*ns, name_type=t), st.lists(name, max_size=3), st.integers(0, 2)
        ),
        st.builds(lambda b: ext(0, b), st.binary(max_size=8)),
        st.builds(  # a list length that disagrees with its one entry
            lambda n, d: ext(0, (len(n) + 3 + d).to_bytes(2, "big") + b"\x00" + vec(2, n)),
            name,
            st.sampled_from([-1, 1, 2]),
        ),
    )
    alpn = st.one_of(
        st.builds(lambda ps: alpn_ext(*ps), st.lists(proto, min_size=1, max_size=3)),
        st.builds(lambda b: ext(16, b), st.binary(max_size=6)),
    )
    kinds = draw(st.lists(st.integers(17, 40), max_size=4, unique=True))
    exts = [ext(k, draw(st.binary(max_size=6))) for k in kinds]
    exts += draw(st.lists(sni, max_size=1)) + draw(st.lists(alpn, max_size=1))
    if draw(st.integers(0, 9)) == 0 and exts:  # a duplicate extension
        exts.append(draw(st.sampled_from(exts)))
    exts = draw(st.permutations(exts))

    def mostly(usual: bytes, *odd: bytes) -> bytes:  # an odd value one time in ten
        return usual if draw(st.integers(0, 9)) else draw(st.sampled_from(odd))

    body = hello_body(
        b"".join(exts) if exts or draw(st.booleans()) else None,
        session_id=mostly(bytes(32), b"", bytes(33)),
        suites=mostly(b"\x13\x01\x00\xff", b"\x13\x01", b"\x13", b"\x13\x01\x00", b""),
        compression=mostly(b"\x00", b"", b"\x00\x01"),
        version=mostly(b"\x03\x03", b"\x02\x00"),
    )
    return records(handshake(body), draw(st.sampled_from([2**14] * 5 + [64])))


def test_one_pass_parser_takes_real_hellos() -> None:
    """The usual hellos go the one-pass way (else it would be dead code)."""
    for data in REAL_HELLOS:
        if len(unframe(data)) + 5 == len(data):  # one record
            assert clienthello._parse_usual(data, MAX_CLIENT_HELLO) == parsed(data)
    data = synthetic(sni_ext(b"A.test."), alpn_ext(b"\x0a\x0a", b"h2"))
    assert clienthello._parse_usual(data, MAX_CLIENT_HELLO) == ClientHello(
        "a.test", ("h2",), len(data)
    )


@FUZZ
@given(st.one_of(framed_hellos(), mutated_hellos()))
@example(synthetic(sni_ext(b"a" * 256)))
@example(synthetic(sni_ext(b"a..b")))
@example(synthetic(sni_ext(b"a.test", b"b.test")))
@example(synthetic(ext(0, b"\x00\x0b\x00\x00\x07a.test.")))  # list length off by one
@example(synthetic(alpn_ext(b"h\x80")))
@example(synthetic(alpn_ext(b"h2"), alpn_ext(b"h2")))
@example(records(handshake(hello_body(b"", suites=b"\x13\x01\x00"))))
@example(records(handshake(hello_body(b"", session_id=bytes(33)))))
@example(records(handshake(hello_body(b"", compression=b""))))
def test_fuzz_one_pass_parser_agrees_with_the_careful_one(data: bytes) -> None:
    """Whatever the one-pass parser accepts, the record-by-record parser returns too;
    anything it declines is the careful parser's to judge."""
    usual = clienthello._parse_usual(data, MAX_CLIENT_HELLO)
    try:
        careful = clienthello._parse_records(data, MAX_CLIENT_HELLO)
    except ClientHelloError as exc:
        assert usual is None, f"one-pass accepted what the careful parser refuses: {exc}"
        return
    if usual is not None:
        assert usual == careful


@FUZZ
@given(mutated_hellos(), st.data())
def test_fuzz_verdicts_are_final(data: bytes, draw: st.DataObject) -> None:
    """A prefix's verdict holds for the whole stream: None means 'valid so far'."""
    cut = draw.draw(st.integers(0, len(data)))
    partial, full = check_contract(data[:cut]), check_contract(data)
    if isinstance(partial, ClientHelloError):
        assert type(full) is type(partial)
    elif partial is not None:
        assert full == partial


# --------------------------------------------------------------------------- alerts


def test_alert_record() -> None:
    assert alert_record(112) == bytes([21, 3, 3, 0, 2, 2, 112])
    assert alert_record(UNRECOGNIZED_NAME) == b"\x15\x03\x03\x00\x02\x02\x70"
    assert (HANDSHAKE_FAILURE, DECODE_ERROR, PROTOCOL_VERSION, INTERNAL_ERROR) == (40, 50, 70, 80)
    assert alert_record(INTERNAL_ERROR)[-1] == 80


def test_alert_record_range() -> None:
    with pytest.raises(ValueError):
        alert_record(256)


def test_exception_hierarchy() -> None:
    assert issubclass(NotTLS, ClientHelloError)
    assert issubclass(MalformedClientHello, ClientHelloError)
    assert issubclass(ClientHelloError, ValueError)
