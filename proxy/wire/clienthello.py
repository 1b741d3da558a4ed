"""Sans-IO parser for a TLS ClientHello: just enough to pick a certificate.

The proxy peeks (MSG_PEEK) at the first bytes of a connection and calls
:func:`parse_client_hello` with everything received so far.  The result is
``None`` ("valid so far, peek again with more bytes"), a :class:`ClientHello`
with the SNI host name and ALPN offers, or a :class:`ClientHelloError`.  The
verdict is final: once a prefix is rejected (or accepted), longer input gets
the same answer, so the caller can stop peeking.

Nothing here touches sockets or the event loop; the bytes are never consumed,
so the real TLS stack sees the untouched ClientHello afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DECODE_ERROR",
    "HANDSHAKE_FAILURE",
    "INTERNAL_ERROR",
    "MAX_CLIENT_HELLO",
    "PROTOCOL_VERSION",
    "UNRECOGNIZED_NAME",
    "ClientHello",
    "ClientHelloError",
    "MalformedClientHello",
    "NotTLS",
    "alert_record",
    "parse_client_hello",
]

MAX_CLIENT_HELLO = 65536  # bytes of handshake message (body) accepted

# Alert descriptions (RFC 8446 §6).
HANDSHAKE_FAILURE = 40
DECODE_ERROR = 50
PROTOCOL_VERSION = 70
INTERNAL_ERROR = 80
UNRECOGNIZED_NAME = 112

_HANDSHAKE = 22  # ContentType.handshake (RFC 8446 §5.1)
_ALERT = 21
_CLIENT_HELLO = 1  # HandshakeType.client_hello (RFC 8446 §4)
_MAX_RECORD = 2**14 + 2048  # largest TLSCiphertext fragment; plaintext is 2^14 (RFC 8446 §5.2)
_EXT_SERVER_NAME = 0  # RFC 6066 §3
_EXT_ALPN = 16  # RFC 7301 §3.1
_EXT_NAMES = {_EXT_SERVER_NAME: "extension 0 (server_name)", _EXT_ALPN: "extension 16 (ALPN)"}
_HOST_NAME_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"
_HOST_NAME_CHARS = frozenset(_HOST_NAME_BYTES)


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None  # SNI host_name, lowercased, no trailing dot; None without SNI
    alpn: tuple[str, ...]  # ALPN protocol names offered, in order; () if none
    record_bytes: int  # bytes of the stream occupied by the records carrying the ClientHello


class ClientHelloError(ValueError):
    """The bytes cannot be a ClientHello we accept."""


class NotTLS(ClientHelloError):
    """The stream does not start with a TLS handshake record (plain HTTP, SSLv2, ...)."""


class MalformedClientHello(ClientHelloError):
    """TLS framing, but broken, oversized or inconsistent content."""


class _NeedMore(Exception):
    """Internal: ran into the end of the received bytes before any error."""


class _Reader:
    """Cursor over ``data[pos:end]`` of one length-prefixed field.

    ``end`` is the *declared* end, which may lie beyond the bytes received so
    far: reading past ``end`` is malformed, reading past the received bytes
    only means "need more".  That split gives incremental parsing for free.
    """

    __slots__ = ("_data", "_pos", "_end", "_name")

    def __init__(self, data: bytes, pos: int, end: int, name: str) -> None:
        self._data, self._pos, self._end, self._name = data, pos, end, name

    def __len__(self) -> int:
        return self._end - self._pos

    def at_end(self) -> bool:
        return self._pos == self._end

    def take(self, n: int, what: str) -> bytes:
        if n > len(self):
            raise MalformedClientHello(
                f"{what} ({n} bytes) overruns {self._name} ({len(self)} bytes left)"
            )
        if self._pos + n > len(self._data):
            raise _NeedMore
        self._pos += n
        return self._data[self._pos - n : self._pos]

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, len_size: int, what: str, min_len: int = 0, max_len: int = 2**24) -> _Reader:
        """A ``<min_len..max_len>`` vector with a ``len_size``-byte length (RFC 8446 §3.4).

        The bounds are checked from the length alone, before the bytes arrive.
        """
        # Error text is only formatted on failure: this runs per extension per connection.
        if len_size > len(self):
            raise MalformedClientHello(
                f"{what} length ({len_size} bytes) overruns {self._name} ({len(self)} bytes left)"
            )
        start = self._pos
        if start + len_size > len(self._data):
            raise _NeedMore
        self._pos = start + len_size
        n = int.from_bytes(self._data[start : self._pos], "big")
        if not min_len <= n <= max_len:
            raise MalformedClientHello(f"{what} is {n} bytes, must be {min_len}..{max_len}")
        if n > len(self):
            raise MalformedClientHello(
                f"{what} ({n} bytes) overruns {self._name} ({len(self)} bytes left)"
            )
        self._pos += n
        return _Reader(self._data, self._pos - n, self._pos, what)

    def rest(self) -> bytes:
        return self.take(len(self), self._name)

    def finish(self) -> None:
        if not self.at_end():
            raise MalformedClientHello(f"{len(self)} unexpected trailing bytes in {self._name}")


def parse_client_hello(data: bytes, max_size: int = MAX_CLIENT_HELLO) -> ClientHello | None:
    """Parse the ClientHello at the start of ``data``.

    None means: valid so far, need more bytes.  Raises NotTLS or
    MalformedClientHello as soon as the bytes received prove it.
    """
    hello = _parse_usual(data, max_size)
    if hello is not None:
        return hello
    return _parse_records(data, max_size)


def _parse_usual(data: bytes, max_size: int) -> ClientHello | None:
    """The usual case in one pass: the whole ClientHello in one record, every field in
    bounds, one SNI host name. None for anything else (several records, a partial
    message, anything the least bit off), which `_parse_records` then judges, with its
    reasons.

    Each connection's first step, so it reads offsets into ``data`` directly: the
    `_Reader` walk costs ~55 µs for Python's ClientHello (12 extensions), this ~7. A
    test holds the two equal on fuzzed input: whatever this accepts, the other returns.
    """
    try:
        if data[0] != _HANDSHAKE or data[1] != 3 or data[2] > 4 or data[5] != _CLIENT_HELLO:
            return None
        record = 5 + ((data[3] << 8) | data[4])
        length = (data[6] << 16) | (data[7] << 8) | data[8]
        end = 9 + length
        if end != record or record > len(data) or length + 4 > _MAX_RECORD or length > max_size:
            return None
        # legacy_version at 9, random at 11, legacy_session_id's length at 43
        if data[9] != 3 or data[43] > 32:
            return None
        p = 44 + data[43]
        suites = (data[p] << 8) | data[p + 1]
        p += 2 + suites
        if suites < 2 or suites % 2:
            return None
        compression = data[p]
        p += 1 + compression
        if not compression or p > end:
            return None
        if p == end:  # no extensions (SSL 3.0 era)
            return ClientHello(None, (), record)
        if p + 2 + ((data[p] << 8) | data[p + 1]) != end:
            return None
        p += 2
        server_name: str | None = None
        alpn: tuple[str, ...] = ()
        kinds = []
        while p < end:
            kind = (data[p] << 8) | data[p + 1]
            start = p + 4
            p = start + ((data[p + 2] << 8) | data[p + 3])
            kinds.append(kind)
            if kind == _EXT_SERVER_NAME:
                server_name = _usual_server_name(data, start, p)
                if server_name is None:
                    return None
            elif kind == _EXT_ALPN:
                offered = _usual_alpn(data, start, p)
                if offered is None:
                    return None
                alpn = offered
    except IndexError:  # ran past the bytes received: the careful parse says why
        return None
    if p != end or len(set(kinds)) != len(kinds):
        return None
    return ClientHello(server_name, alpn, record)


def _usual_server_name(data: bytes, p: int, end: int) -> str | None:
    """The server_name extension at ``data[p:end]`` as `_parse_server_name` reads it,
    if it holds one valid host_name and nothing else; else None."""
    size = (data[p + 3] << 8) | data[p + 4]
    if not size or p + 5 + size != end or data[p + 2] != 0:
        return None
    if (data[p] << 8) | data[p + 1] != size + 3:
        return None
    raw = data[p + 5 : end]
    if len(raw) > 255 or raw.translate(None, _HOST_NAME_BYTES):
        return None
    name = raw.decode("ascii").lower()
    if name[-1] == ".":
        name = name[:-1]
    if not name or name[0] == "." or name[-1] == "." or ".." in name:
        return None
    return name


def _usual_alpn(data: bytes, p: int, end: int) -> tuple[str, ...] | None:
    """The ALPN extension at ``data[p:end]`` as `_parse_alpn` reads it, if nothing in it
    is amiss; else None."""
    if (data[p] << 8) | data[p + 1] != end - p - 2 or end - p < 4:
        return None
    p += 2
    protocols = []
    while p < end:
        size = data[p]
        p += 1 + size
        if not size or p > end:
            return None
        raw = data[p - size : p]
        if size == 2 and raw[0] == raw[1] and raw[0] & 0x0F == 0x0A:
            continue  # GREASE (RFC 8701)
        if not raw.isascii():
            return None
        protocols.append(raw.decode("ascii"))
    return tuple(protocols)


def _parse_records(data: bytes, max_size: int) -> ClientHello | None:
    """`parse_client_hello`'s careful way, for any input: record by record, field by
    field, with the reason for every refusal."""
    # Reassemble the handshake message from its records: a ClientHello may be
    # fragmented over several handshake records (RFC 8446 §5.1).
    message = bytearray()
    pos = 0
    while True:
        header = data[pos : pos + 5]
        _check_record_header(header, first=pos == 0)
        if len(header) < 5:
            break
        length = int.from_bytes(header[3:5], "big")
        fragment = data[pos + 5 : pos + 5 + length]
        message += fragment
        total = _message_size(message, max_size)
        # The ClientHello must end on a record boundary (RFC 8446 §5.1): a
        # record reaching past it is malformed, whether or not it has arrived.
        if total is not None and len(message) - len(fragment) + length > total:
            raise MalformedClientHello("data after the ClientHello in its last record")
        if len(fragment) < length:
            break
        pos += 5 + length
        if total is not None and len(message) == total:
            server_name, alpn = _parse_body(bytes(message[4:]), total - 4)
            return ClientHello(server_name, alpn, pos)
    # Out of bytes mid-message: still check the part we have, so that garbage
    # is rejected now rather than after the peer has sent up to max_size.
    if len(message) > 4:
        try:
            _parse_body(bytes(message[4:]), int.from_bytes(message[1:4], "big"))
        except _NeedMore:
            pass
    return None


def _check_record_header(header: bytes, *, first: bool) -> None:
    """Validate a (possibly partial) TLSPlaintext header (RFC 8446 §5.1)."""
    # On the very first bytes a mismatch means "some other protocol"; later it
    # means a broken TLS stream.
    error = NotTLS if first else MalformedClientHello
    if len(header) >= 1 and header[0] != _HANDSHAKE:
        if first and header[0] & 0x80:
            raise NotTLS("SSLv2-style ClientHello is not supported")
        raise error(f"record content type {header[0]}, expected handshake (22)")
    # legacy_record_version is 0x0300..0x0303 in practice; accept up to 0x0304.
    if len(header) >= 2 and header[1] != 3:
        raise error(f"record version major {header[1]}, expected 3")
    if len(header) >= 3 and header[2] > 4:
        raise error(f"record version 0x03{header[2]:02x} is unknown")
    if len(header) >= 5:
        length = int.from_bytes(header[3:5], "big")
        # Zero-length handshake fragments are forbidden (RFC 8446 §5.1).
        if not 0 < length <= _MAX_RECORD:
            raise MalformedClientHello(f"record length {length}, must be 1..{_MAX_RECORD}")


def _message_size(message: bytearray, max_size: int) -> int | None:
    """Total size of the handshake message (RFC 8446 §4), once its header is in."""
    if message and message[0] != _CLIENT_HELLO:
        raise MalformedClientHello(f"handshake type {message[0]}, expected ClientHello (1)")
    if len(message) < 4:
        return None
    length = int.from_bytes(message[1:4], "big")
    # Refuse on the declared length, before buffering that much.
    if length > max_size:
        raise MalformedClientHello(f"ClientHello of {length} bytes exceeds limit of {max_size}")
    return 4 + length


def _parse_body(body: bytes, length: int) -> tuple[str | None, tuple[str, ...]]:
    """Parse a ClientHello body (RFC 8446 §4.1.2) of declared ``length``.

    ``body`` may be a truncated prefix; then _NeedMore is raised unless an
    error shows up first.
    """
    r = _Reader(body, 0, length, "ClientHello")
    version = r.uint(2, "legacy_version")
    if version >> 8 != 3:
        raise MalformedClientHello(f"legacy_version 0x{version:04x} is not TLS")
    r.take(32, "random")
    r.vector(1, "legacy_session_id", max_len=32)
    suites = r.vector(2, "cipher_suites", min_len=2, max_len=2**16 - 2)
    if len(suites) % 2:
        raise MalformedClientHello(f"cipher_suites is {len(suites)} bytes, must be even")
    r.vector(1, "legacy_compression_methods", min_len=1)
    # Pre-extension (SSL 3.0 era) clients end here (RFC 5246 §7.4.1.2).
    if r.at_end():
        return None, ()
    extensions = r.vector(2, "extensions")
    r.finish()

    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while not extensions.at_end():
        ext_type = extensions.uint(2, "extension type")
        try:
            ext = extensions.vector(2, _EXT_NAMES.get(ext_type, "extension"))
        except MalformedClientHello as exc:
            raise MalformedClientHello(f"extension {ext_type}: {exc}") from None
        # "There MUST NOT be more than one extension of the same type" (RFC 8446 §4.2).
        if ext_type in seen:
            raise MalformedClientHello(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_server_name(ext)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(ext)
    return server_name, alpn


def _parse_server_name(ext: _Reader) -> str | None:
    """ServerNameList (RFC 6066 §3); returns the host_name entry, if any."""
    names = ext.vector(2, "server_name_list", min_len=1, max_len=2**16 - 1)
    ext.finish()
    host: str | None = None
    while not names.at_end():
        name_type = names.uint(1, "server name type")
        # Every entry is parsed as opaque<1..2^16-1> like HostName: the only
        # defined type, and what deployed stacks assume for unknown ones.
        raw = names.vector(2, "server name", min_len=1).rest()
        if name_type != 0:
            continue
        # At most one name per name_type (RFC 6066 §3).
        if host is not None:
            raise MalformedClientHello("more than one SNI host_name")
        host = _host_name(raw)
    return host


def _host_name(raw: bytes) -> str:
    """Validate an SNI HostName and normalize it to a lookup key."""
    # HostName is ASCII, never an IP literal (RFC 6066 §3); restrict it to DNS
    # characters so nothing odd reaches the cert store, logs or ACME.
    if len(raw) > 255:
        raise MalformedClientHello(f"SNI host name is {len(raw)} bytes, must be 1..255")
    for i, b in enumerate(raw):
        if b not in _HOST_NAME_CHARS:
            if b == 0:
                kind = "NUL byte"
            elif b < 0x20 or b == 0x7F:
                kind = "control character"
            elif b >= 0x80:
                kind = "non-ASCII byte"
            else:
                kind = "invalid character"
            raise MalformedClientHello(f"SNI host name has {kind} {bytes([b])!r} at offset {i}")
    # Names are case-insensitive and clients may send an FQDN's trailing dot.
    name = raw.decode("ascii").lower().removesuffix(".")
    if "" in name.split("."):
        raise MalformedClientHello(f"SNI host name {raw!r} has an empty label")
    return name


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    """ProtocolNameList (RFC 7301 §3.1)."""
    names = ext.vector(2, "protocol_name_list", min_len=2, max_len=2**16 - 1)
    ext.finish()
    protocols: list[str] = []
    while not names.at_end():
        raw = names.vector(1, "ALPN protocol name", min_len=1).rest()
        # GREASE identifiers {0x?A, 0x?A} must be ignored (RFC 8701 §2, §3.1).
        if len(raw) == 2 and raw[0] == raw[1] and raw[0] & 0x0F == 0x0A:
            continue
        try:
            protocols.append(raw.decode("ascii"))
        except UnicodeDecodeError:
            raise MalformedClientHello(f"ALPN protocol name {raw!r} is not ASCII") from None
    return tuple(protocols)


def alert_record(description: int) -> bytes:
    """A fatal alert record (RFC 8446 §6) to send before closing, e.g. UNRECOGNIZED_NAME."""
    if not 0 <= description <= 255:
        raise ValueError(f"alert description {description} out of range")
    # level 2 = fatal; legacy_record_version 0x0303 as TLS 1.2/1.3 send it.
    return bytes([_ALERT, 3, 3, 0, 2, 2, description])
