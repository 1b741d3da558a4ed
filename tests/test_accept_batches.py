"""Issue 12: the listeners' batched accept (`proxy/tls/accept.Listener._accept_ready`).

The listening socket is real (connections come from real clients on loopback); its
`accept` is wrapped to inject the two errors a listener meets: a connection reset while
it waited in the queue (ECONNABORTED: skip it and go on at once, or any client could
pause accepting by sending a RST) and running out of descriptors (EMFILE: stop watching
the socket for `ACCEPT_PAUSE`, then accept what queued meanwhile). The hostile-client
tests (tests/test_descriptor_limit.py) show EMFILE against a real edge process.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator

import pytest

from proxy.tls.accept import ACCEPT_PAUSE, Listener


class _Recorder(Listener):
    def __init__(self, sock: socket.socket, max_pending: int = 100) -> None:
        super().__init__(sock, max_pending=max_pending, proxy_protocol=None)
        self.served: list[socket.socket] = []
        self.arrived = asyncio.Event()
        self.hold = asyncio.Event()  # connections stay pending until it is set
        self.hold.set()

    async def _serve_connection(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        self.served.append(conn)
        self.arrived.set()
        await self.hold.wait()


class _ScriptedSocket:
    """The real listening socket, whose next accept() calls may raise instead."""

    def __init__(self, sock: socket.socket, errors: Iterator[OSError]) -> None:
        self._sock = sock
        self._errors = errors
        self.calls = 0

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        self.calls += 1
        error = next(self._errors, None)
        if error is not None:
            raise error
        return self._sock.accept()

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def _connect(sock: socket.socket) -> socket.socket:
    client = socket.create_connection(sock.getsockname())
    client.setblocking(False)
    return client


async def _served(listener: _Recorder, count: int, within: float) -> None:
    async with asyncio.timeout(within):
        while len(listener.served) < count:
            listener.arrived.clear()
            await listener.arrived.wait()


async def test_accepted_connections_have_keepalive_and_nodelay(
    listening: socket.socket,
) -> None:
    # set on the listening socket once (the click protocol no longer sets SO_KEEPALIVE
    # per connection): every accepted socket must have both
    assert not listening.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    listener = _Recorder(listening)
    listener.start()
    clients = [_connect(listening) for _ in range(2)]
    try:
        await _served(listener, 2, within=5)
        for conn in listener.served:
            assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        await listener.close()
        for conn in [*clients, *listener.served]:
            conn.close()


async def test_a_connection_reset_in_the_queue_does_not_pause_accepting(
    listening: socket.socket,
) -> None:
    scripted = _ScriptedSocket(listening, iter([ConnectionAbortedError(errno.ECONNABORTED, "")]))
    listener = _Recorder(scripted)  # type: ignore[arg-type]
    listener.start()
    clients = [_connect(listening) for _ in range(3)]
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await _served(listener, 3, within=5)
        assert loop.time() - started < ACCEPT_PAUSE  # no pause after the reset one
        assert listener.stats.accepted == 3
    finally:
        await listener.close()
        for conn in [*clients, *listener.served]:
            conn.close()


async def test_out_of_descriptors_pauses_then_accepts_what_queued(
    listening: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    scripted = _ScriptedSocket(listening, iter([OSError(errno.EMFILE, "Too many open files")]))
    listener = _Recorder(scripted)  # type: ignore[arg-type]
    listener.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    clients = [_connect(listening) for _ in range(2)]
    try:
        await _served(listener, 2, within=5)
        # the first wake met EMFILE: nothing was accepted until the pause was over
        assert loop.time() - started >= ACCEPT_PAUSE * 0.9
        assert "accept failed" in caplog.text
        # one failed call, then the two connections and the empty queue: no spinning
        assert scripted.calls <= 4
    finally:
        await listener.close()
        for conn in [*clients, *listener.served]:
            conn.close()


async def test_a_burst_is_taken_in_batches_and_stop_accepting_stops(
    listening: socket.socket,
) -> None:
    listener = _Recorder(listening)
    listener.start()
    clients = [_connect(listening) for _ in range(12)]
    try:
        await _served(listener, 12, within=5)
        await listener.stop_accepting()
        assert listening.fileno() == -1  # closed: nothing more is accepted
    finally:
        await listener.close()
        for conn in [*clients, *listener.served]:
            conn.close()


async def test_max_pending_holds_within_one_batch(listening: socket.socket) -> None:
    """Five connections queued at once, two may be pending: three are closed at accept,
    although the two pending ones' tasks have not run yet when the batch is taken."""
    listener = _Recorder(listening, max_pending=2)
    listener.hold.clear()
    clients = [_connect(listening) for _ in range(5)]
    await asyncio.sleep(0.05)  # all five queued before the listener looks
    listener.start()
    try:
        await _served(listener, 2, within=5)
        await asyncio.sleep(0.1)
        assert len(listener.served) == 2
        assert listener.stats.errors == {"overloaded": 3}
        assert listener.stats.accepted == 5
    finally:
        listener.hold.set()
        await listener.close()
        for conn in [*clients, *listener.served]:
            conn.close()
