"""PROXY protocol headers built by the tests (independently of proxy/wire/proxy_protocol.py),
and a small L4 load balancer that puts one in front of each connection it relays."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _same_family(src: str, dst: str) -> str:
    """dst in src's family (an IPv6 client reached an IPv4 address: IPv4-mapped)."""
    if ":" in src and ":" not in dst:
        return f"::ffff:{dst}"
    return dst


def v1_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in src[0] else "TCP4"
    dst_ip = _same_family(src[0], dst[0])
    return f"PROXY {family} {src[0]} {dst_ip} {src[1]} {dst[1]}\r\n".encode()


def v2_header(
    src: tuple[str, int] | None,
    dst: tuple[str, int] | None,
    *,
    local: bool = False,
    tlvs: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
) -> bytes:
    """A v2 header; src None means AF_UNSPEC. TLVs go after the addresses."""
    if src is None or dst is None:
        fam, addresses = 0x00, b""
    else:
        s = ipaddress.ip_address(src[0])
        d = ipaddress.ip_address(_same_family(src[0], dst[0]))
        fam = 0x11 if s.version == 4 else 0x21  # AF_INET/AF_INET6, STREAM
        addresses = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    extra = b"".join(struct.pack("!BH", t, len(v)) + v for t, v in tlvs)
    body = addresses + extra
    command = 0x20 if local else 0x21
    return V2_SIGNATURE + bytes([command, fam]) + struct.pack("!H", len(body)) + body


class ProxyBalancer:
    """Accepts on 127.0.0.1, connects to the edge from `source_ip` and sends a PROXY
    header naming the real client, then relays bytes both ways (like HAProxy's
    `send-proxy`/`send-proxy-v2`, or an AWS NLB)."""

    def __init__(
        self,
        target: tuple[str, int],
        source_ip: str,
        version: int = 2,
        claim: tuple[str, int] | None = None,  # report this client instead of the real one
    ) -> None:
        self.target = target
        self.source_ip = source_ip
        self.version = version
        self.claim = claim
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ProxyBalancer:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            client = self.claim or c_writer.get_extra_info("peername")[:2]
            e_reader, e_writer = await asyncio.open_connection(
                *self.target, local_addr=(self.source_ip, 0)
            )
            dst = e_writer.get_extra_info("peername")[:2]
            header = v1_header(client, dst) if self.version == 1 else v2_header(client, dst)
            e_writer.write(header)
            await asyncio.gather(_pipe(c_reader, e_writer), _pipe(e_reader, c_writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            c_writer.close()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            if reader.at_eof():
                writer.close()
