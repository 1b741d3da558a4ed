"""A small in-memory DNS server for the demo stack and integration tests.

Pebble (and our own CNAME checks) need a real resolver to talk to, and tests
need to flip records, inject SERVFAILs and count lookups. This server answers
over UDP and TCP on one loopback port from background threads, so it can be
driven from sync code and from any asyncio loop alike.

It behaves like a recursive resolver fronting a tiny zone: CNAME chains are
followed within its own data, and the AA and RA flags are both set.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import struct
import threading
from collections import Counter
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.CAA import CAA
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.TXT import TXT

TTL = 1
MAX_CHAIN = 16
_BIND_ATTEMPTS = 50
_TCP_IDLE_TIMEOUT = 5.0
_IN = dns.rdataclass.IN
_RT = dns.rdatatype.RdataType


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


class _UDPServer(socketserver.UDPServer):
    allow_reuse_address = False  # would let two UDP sockets share a port on Linux

    def __init__(self, addr: tuple[str, int], owner: DNSServer, family: socket.AddressFamily):
        self.address_family = family
        self.owner = owner
        super().__init__(addr, _UDPHandler)


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = False  # joined by server_close(); stop() unblocks them first
    block_on_close = True

    def __init__(self, addr: tuple[str, int], owner: DNSServer, family: socket.AddressFamily):
        self.address_family = family
        self.owner = owner
        super().__init__(addr, _TCPHandler)


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        wire = self.server.owner._respond(data, "udp")
        if wire is not None:
            try:
                sock.sendto(wire, self.client_address)
            except OSError:
                pass  # client went away; nothing to do for a datagram


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        owner = self.server.owner
        if not owner._track(sock):
            return
        try:
            sock.settimeout(_TCP_IDLE_TIMEOUT)
            while True:  # RFC 7766: several length-prefixed queries per connection
                header = _recv_exact(sock, 2)
                if header is None:
                    return
                data = _recv_exact(sock, struct.unpack("!H", header)[0])
                if data is None:
                    return
                wire = owner._respond(data, "tcp")
                if wire is None:
                    return  # malformed: drop the connection
                sock.sendall(struct.pack("!H", len(wire)) + wire)
        except OSError:
            return
        finally:
            owner._untrack(sock)


class DNSServer:
    """In-memory DNS server on UDP+TCP; see module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._records: dict[str, dict[int, list[dns.rdata.Rdata]]] = {}
        self._servfail: set[str] = set()
        self._rebinds: dict[str, tuple[int, list[dns.rdata.Rdata]]] = {}
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._udp: _UDPServer | None = None
        self._tcp: _TCPServer | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        if self._udp is not None:
            raise RuntimeError("DNSServer already started")
        family = _family(self._host)
        attempts = _BIND_ATTEMPTS if self._port == 0 else 1
        for attempt in range(attempts):
            udp = _UDPServer((self._host, self._port), self, family)
            port = udp.server_address[1]
            try:
                tcp = _TCPServer((self._host, port), self, family)
            except OSError:
                udp.server_close()
                if attempt == attempts - 1:
                    raise
                continue
            break
        self._udp, self._tcp, self._port = udp, tcp, port
        self._stopping = False
        for server, label in ((udp, "udp"), (tcp, "tcp")):
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"dnsserver-{label}-{port}",
                daemon=True,  # safety net only; stop() joins it
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        udp, tcp = self._udp, self._tcp
        if udp is None or tcp is None:
            return
        udp.shutdown()
        tcp.shutdown()
        with self._lock:
            self._stopping = True
            conns = list(self._conns)
        for conn in conns:  # wake handlers blocked in recv() so server_close() can join
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        udp.server_close()
        tcp.server_close()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self._udp = self._tcp = None

    def __enter__(self) -> DNSServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self._host, self._port)

    @property
    def nameserver(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._port}"

    # -- data --------------------------------------------------------------------

    def _set(self, name: str, rdtype: int, rdatas: list[dns.rdata.Rdata]) -> None:
        key = _norm(name)
        with self._lock:
            node = self._records.setdefault(key, {})
            # A CNAME cannot coexist with other data: setting one replaces the other.
            if rdatas:
                if rdtype == _RT.CNAME:
                    node.clear()
                else:
                    node.pop(_RT.CNAME, None)
                node[rdtype] = rdatas
            else:
                node.pop(rdtype, None)
            if not node:
                del self._records[key]

    def set_a(self, name: str, addresses: list[str]) -> None:
        self._set(name, _RT.A, [dns.rdata.from_text(_IN, _RT.A, a) for a in addresses])

    def set_aaaa(self, name: str, addresses: list[str]) -> None:
        self._set(name, _RT.AAAA, [dns.rdata.from_text(_IN, _RT.AAAA, a) for a in addresses])

    def set_cname(self, name: str, target: str) -> None:
        self._set(name, _RT.CNAME, [CNAME(_IN, _RT.CNAME, dns.name.from_text(_norm(target)))])

    def set_caa(self, name: str, records: list[tuple[int, str, str]]) -> None:
        rdatas: list[dns.rdata.Rdata] = [
            CAA(_IN, _RT.CAA, flags, tag.encode(), value.encode()) for flags, tag, value in records
        ]
        self._set(name, _RT.CAA, rdatas)

    def set_txt(self, name: str, values: list[str]) -> None:
        rdatas: list[dns.rdata.Rdata] = []
        for value in values:
            raw = value.encode()
            chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
            rdatas.append(TXT(_IN, _RT.TXT, chunks))
        self._set(name, _RT.TXT, rdatas)

    def rebind_a(self, name: str, addresses: list[str], after: int = 1) -> None:
        """DNS rebinding, for tests: after `after` more A queries for `name` have been
        answered as now, its A records become `addresses` (the first answer passes a
        check, the next one points somewhere else)."""
        rdatas = [dns.rdata.from_text(_IN, _RT.A, a) for a in addresses]
        with self._lock:
            self._rebinds[_norm(name)] = (after, rdatas)

    def set_servfail(self, name: str, on: bool = True) -> None:
        with self._lock:
            if on:
                self._servfail.add(_norm(name))
            else:
                self._servfail.discard(_norm(name))

    def remove(self, name: str) -> None:
        key = _norm(name)
        with self._lock:
            self._records.pop(key, None)
            self._servfail.discard(key)

    # -- counters ----------------------------------------------------------------

    def query_count(
        self, name: str | None = None, rdtype: str | None = None, transport: str | None = None
    ) -> int:
        want_name = None if name is None else _norm(name)
        want_type = None if rdtype is None else rdtype.upper()
        with self._lock:
            return sum(
                n
                for (qname, qtype, qtransport), n in self._counts.items()
                if (want_name is None or qname == want_name)
                and (want_type is None or qtype == want_type)
                and (transport is None or qtransport == transport)
            )

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    # -- serving -----------------------------------------------------------------

    def _track(self, conn: socket.socket) -> bool:
        with self._lock:
            if self._stopping:
                return False
            self._conns.add(conn)
            return True

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _respond(self, data: bytes, transport: str) -> bytes | None:
        """Wire response for a wire query, or None if the packet is unusable."""
        try:
            query = dns.message.from_wire(data)
            if query.flags & dns.flags.QR:
                return None
            response = dns.message.make_response(query)
        except Exception:  # dnspython raises many types for garbage input
            return None
        response.flags |= dns.flags.AA | dns.flags.RA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
        elif len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
        else:
            question = query.question[0]
            key = _norm(question.name.to_text())
            rcode: dns.rcode.Rcode
            answer: list[dns.rrset.RRset]
            with self._lock:
                self._counts[(key, dns.rdatatype.to_text(question.rdtype), transport)] += 1
                if question.rdclass != _IN:
                    rcode, answer = dns.rcode.REFUSED, []
                else:
                    rcode, answer = self._resolve(question.name, question.rdtype)
                    if question.rdtype == _RT.A and key in self._rebinds:
                        self._count_down_rebind(key)
            response.set_rcode(rcode)
            response.answer = answer
        if transport == "tcp":
            max_size = 65535
        else:
            max_size = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=max_size, prefer_truncation=True)
        except dns.exception.DNSException:
            return None

    def _count_down_rebind(self, key: str) -> None:
        """Lock held."""
        left, rdatas = self._rebinds[key]
        if left > 1:
            self._rebinds[key] = (left - 1, rdatas)
            return
        del self._rebinds[key]
        node = self._records.setdefault(key, {})
        node.pop(_RT.CNAME, None)
        node[_RT.A] = rdatas

    def _resolve(
        self, qname: dns.name.Name, rdtype: int
    ) -> tuple[dns.rcode.Rcode, list[dns.rrset.RRset]]:
        """Answer from our data, following CNAMEs like a recursive resolver. Lock held."""
        answer: list[dns.rrset.RRset] = []
        owner = qname
        for _ in range(MAX_CHAIN + 1):
            key = _norm(owner.to_text())
            if key in self._servfail:
                return dns.rcode.SERVFAIL, []
            node = self._records.get(key)
            if node is None:
                if self._has_descendants(key):
                    return dns.rcode.NOERROR, answer  # empty non-terminal
                return dns.rcode.NXDOMAIN, answer
            if rdtype == _RT.ANY:
                answer.extend(dns.rrset.from_rdata_list(owner, TTL, r) for r in node.values())
                return dns.rcode.NOERROR, answer
            cname = node.get(_RT.CNAME)
            if cname and rdtype != _RT.CNAME:
                answer.append(dns.rrset.from_rdata_list(owner, TTL, cname))
                owner = cname[0].target  # type: ignore[attr-defined]
                continue
            if rdtype in node:
                answer.append(dns.rrset.from_rdata_list(owner, TTL, node[rdtype]))
            return dns.rcode.NOERROR, answer  # NODATA when nothing was appended
        return dns.rcode.SERVFAIL, []  # CNAME loop or overlong chain

    def _has_descendants(self, key: str) -> bool:
        suffix = "." + key if key else ""
        return any(n.endswith(suffix) and n != key for n in (*self._records, *self._servfail))
