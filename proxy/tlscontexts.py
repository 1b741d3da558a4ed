"""Per-host server TLS contexts and their bounded in-memory cache.

Python's ssl loads certificates only from files. Each context is built from a
private temporary file (on tmpfs when available, mode 0600), unlinked straight
after loading; this runs in a thread so the event loop never waits on it.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Sequence

# tmpfs keeps the short-lived key file off disk; mkstemp makes it private (0600).
_SHM = "/dev/shm"  # noqa: S108
_TMP_DIR = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None
ALPN = ["http/1.1"]


def build_server_context(
    chain_pem: bytes, key_pem: bytes, alpn: Sequence[str] = ALPN
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(list(alpn))
    fd, path = tempfile.mkstemp(prefix="linkedge-", suffix=".pem", dir=_TMP_DIR)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
            fh.write(b"\n")
            fh.write(chain_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
    return ctx


class CachedContext:
    """A ready context plus what is needed to notice that the store has a newer one."""

    __slots__ = ("checked_at", "context", "not_after", "serial")

    def __init__(
        self, context: ssl.SSLContext, not_after: float, serial: str, checked_at: float
    ) -> None:
        self.context = context
        self.not_after = not_after
        self.serial = serial  # of the certificate inside; compared with the store's
        self.checked_at = checked_at  # last comparison with the store


class ContextCache:
    """LRU of host -> TLS context; entries past their certificate's expiry are misses."""

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._entries: OrderedDict[str, CachedContext] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, hostname: str, now: float) -> ssl.SSLContext | None:
        entry = self.entry(hostname, now)
        return None if entry is None else entry.context

    def entry(self, hostname: str, now: float) -> CachedContext | None:
        entry = self._entries.get(hostname)
        if entry is None:
            return None
        if now >= entry.not_after:
            del self._entries[hostname]
            return None
        self._entries.move_to_end(hostname)
        return entry

    def put(
        self,
        hostname: str,
        context: ssl.SSLContext,
        not_after: float,
        serial: str = "",
        checked_at: float = 0.0,
    ) -> None:
        self._entries[hostname] = CachedContext(context, not_after, serial, checked_at)
        self._entries.move_to_end(hostname)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def discard(self, hostname: str) -> None:
        self._entries.pop(hostname, None)
