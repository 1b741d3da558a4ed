"""Issue 9: no client input produces a 500, a traceback or a flood of log lines.

A few thousand malformed HTTP requests (methods, targets, header bytes, framings,
sizes), generated from a fixed seed, go over raw sockets to a real edge's plain
HTTP listener and, inside TLS, to its HTTPS listener. Each must end in a 4xx (or,
for the few mutations that are still valid HTTP, a backend answer below 500) or
the edge closing the connection. Afterwards the edge still serves a click, nothing
was logged at ERROR or with a traceback, at most a handful of lines at INFO, and
the malformed requests were counted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from support.clicks import certify, get_status
from support.edge import EdgeHandle, client_context

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.http.app import MALFORMED

SEED = 9
PER_LISTENER = 1200
CONCURRENCY = 16
READ_TIMEOUT = 5.0

Mutation = Callable[[random.Random, str], bytes]


def _junk(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def _request(method: str = "GET", target: str = "/c/f", version: str = "HTTP/1.1",
             headers: list[str] | None = None, body: bytes = b"") -> bytes:  # fmt: skip
    head = f"{method} {target} {version}\r\n" + "".join(h + "\r\n" for h in headers or [])
    return head.encode("latin-1") + b"\r\n" + body


def bad_method(rng: random.Random, host: str) -> bytes:
    method = rng.choice(
        ["", "G ET", "GET\x00", "\x7fGET", "get\xff", "(", "GET,", "M" * rng.randrange(1, 9000),
         "PR\x01I", "\xc3\xa9T", "{}"]
    )  # fmt: skip
    return _request(method, headers=[f"Host: {host}"])


def bad_target(rng: random.Random, host: str) -> bytes:
    target = rng.choice(
        ["", "*", "c/f", "http://", "http:///x", "http://[::1/x", "http://a b/", "//",
         "/c/\x00", "/c/\x7f", "/c/\xff\xfe", "/%", "/%zz/%00", "/c?\x01", "/" + "a" * 9000,
         "http://user:pw@x.test/", f"https://{host}:99999/x", f"http://{host}\xff/x",
         "ftp://x/", "/c/f#frag", "/\t/", "\\\\x", "?q", f"http://{host}"]
    )  # fmt: skip
    return _request(target=target, headers=[f"Host: {host}"])


def bad_header(rng: random.Random, host: str) -> bytes:
    line = rng.choice(
        ["NoColon", ": empty-name", "Bad Name: x", "X-A\x00: v", "X-A: v\x00v", "X-A: \x7f",
         "X-\xff: v", "X-A: \xff\xfe", " folded: continuation", "\tX-Tab: v", "X-A:" + "v" * 9000,
         "X" * 9000 + ": v", f"Host: {host}", "Host:", f"Host: {host}\x01", "Host: [::1",
         f"Host: {host}:65536", "Host: a..b", "Content-Type: \x00", "Expect: 100-nonsense",
         "Connection: upgrade, \xff", "Upgrade: h2c\x00"]
    )  # fmt: skip
    headers = [f"Host: {host}"] if not line.startswith("Host") else []
    headers.insert(rng.randrange(len(headers) + 1), line)
    return _request(headers=headers)


def bad_framing(rng: random.Random, host: str) -> bytes:
    choice = rng.randrange(10)
    h = f"Host: {host}"
    if choice == 0:
        return _request("POST", headers=[h, "Content-Length: -1"], body=b"x")
    if choice == 1:
        return _request("POST", headers=[h, "Content-Length: 1", "Content-Length: 2"], body=b"xy")
    if choice == 2:
        return _request("POST", headers=[h, "Content-Length: 3", "Transfer-Encoding: chunked"],
                        body=b"0\r\n\r\n")  # fmt: skip
    if choice == 3:
        return _request("POST", headers=[h, "Transfer-Encoding: chunked"], body=b"zz\r\nx\r\n")
    if choice == 4:
        return _request("POST", headers=[h, "Transfer-Encoding: gzip, chunked, chunked"],
                        body=b"0\r\n\r\n")  # fmt: skip
    if choice == 5:
        return _request("POST", headers=[h, "Content-Length: 1x"], body=b"1")
    if choice == 6:
        return f"GET /c/f HTTP/1.1\n{h}\n\n".encode()  # bare LF
    if choice == 7:
        return f"GET /c/f HTTP/1.1\r{h}\r\r".encode()  # bare CR
    if choice == 8:
        return _request("POST", headers=[h, "Content-Length: 99999999999999999999999"], body=b"x")
    return _request("POST", headers=[h, "Transfer-Encoding: chunked"],
                    body=b"1;" + b"e" * 9000 + b"\r\nx\r\n0\r\n\r\n")  # fmt: skip


def bad_version(rng: random.Random, host: str) -> bytes:
    version = rng.choice(["HTTP/2.0", "HTTP/1.2", "HTTP/9", "HTTP/1", "http/1.1", "HTTP/1.1x",
                          "", "HTTP/\xff", "ICE/1.0"])  # fmt: skip
    return _request(version=version, headers=[f"Host: {host}"])


def raw_junk(rng: random.Random, host: str) -> bytes:
    return _junk(rng, rng.randrange(1, 2048)) + b"\r\n\r\n"


def huge(rng: random.Random, host: str) -> bytes:
    headers = [f"Host: {host}"] + [f"X-{i}: {'v' * 100}" for i in range(rng.randrange(100, 400))]
    return _request(headers=headers)


def unknown_token(rng: random.Random, host: str) -> bytes:
    """Well-formed, but anyone can ask for made-up tokens: must not flood the log."""
    token = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_") for _ in range(43))
    return _request(target=f"/.well-known/acme-challenge/{token}", headers=[f"Host: {host}"])


MUTATIONS: list[Mutation] = [
    bad_method, bad_target, bad_header, bad_framing, bad_version, raw_junk, huge, unknown_token,
]  # fmt: skip


def cases(host: str, n: int, seed: int) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    for _ in range(n):
        mutation = rng.choice(MUTATIONS)
        yield mutation.__name__, mutation(rng, host)


async def send(ip: str, port: int, payload: bytes, tls: ssl.SSLContext | None,
               host: str) -> str:  # fmt: skip
    """'close', 'timeout' or the status code the edge answered with."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(ip, port, ssl=tls, server_hostname=host if tls else None),
            READ_TIMEOUT,
        )
    except (OSError, TimeoutError) as exc:
        return f"connect-failed {exc!r}"
    try:
        writer.write(payload)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
    except (ConnectionError, ssl.SSLError):
        return "close"
    except TimeoutError:
        return "timeout"
    finally:
        writer.close()
    if not line:
        return "close"
    parts = line.split()
    if len(parts) > 1 and line.startswith(b"HTTP/"):
        return parts[1].decode()
    return f"garbage {line[:80]!r}"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.timeout(120)
async def test_malformed_requests_get_4xx_or_close_never_500(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = await certify(edge, pebble, dns_server)
    tls = client_context(pebble)
    records = Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    malformed_before = MALFORMED.count
    started = time.monotonic()
    outcomes: dict[str, Counter[str]] = {"http": Counter(), "https": Counter()}
    bad: list[tuple[str, str, bytes]] = []
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(listener: str, name: str, payload: bytes) -> None:
        async with semaphore:
            if listener == "http":
                got = await send(edge.ip, edge.http_port, payload, None, host)
            else:
                got = await send(edge.ip, edge.https_port, payload, tls, host)
        outcomes[listener][got] += 1
        if not (got == "close" or (got.isdigit() and int(got) < 500)):
            bad.append((listener, got, payload[:200]))

    try:
        jobs = [one("http", n, p) for n, p in cases(host, PER_LISTENER, SEED)]
        jobs += [one("https", n, p) for n, p in cases(host, PER_LISTENER, SEED + 1)]
        await asyncio.gather(*jobs)
        elapsed = time.monotonic() - started
        assert await get_status(edge, pebble, host) == 302  # still serving
    finally:
        root.removeHandler(records)
        root.setLevel(old_level)

    print(f"{2 * PER_LISTENER} requests in {elapsed:.1f}s: {dict(outcomes['http'])}"
          f" / {dict(outcomes['https'])}")  # fmt: skip
    assert bad == [], bad[:10]
    for listener in ("http", "https"):
        four_xx = sum(c for k, c in outcomes[listener].items() if k.startswith("4"))
        assert four_xx > PER_LISTENER // 2, outcomes[listener]  # most are refused with a 4xx
    loud = [
        r
        for r in records.records
        if r.levelno >= logging.WARNING or (r.levelno >= logging.INFO and r.exc_info)
    ]
    assert loud == [], [(r.name, r.getMessage()[:200], r.exc_info) for r in loud[:7]]
    info = [r for r in records.records if r.levelno >= logging.INFO]
    assert len(info) <= 20, [(r.name, r.getMessage()[:120]) for r in info[:20]]
    assert MALFORMED.count - malformed_before > PER_LISTENER // 2
    assert elapsed < 60
