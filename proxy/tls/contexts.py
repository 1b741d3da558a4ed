"""Per-host server TLS contexts and their bounded in-memory cache.

Python's ssl loads certificates only from files. Each context is built from a
private temporary file (on tmpfs when available, mode 0600), unlinked straight
after loading; this runs in a thread so the event loop never waits on it.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Sequence

# tmpfs keeps the short-lived key file off disk; mkstemp makes it private (0600).
_SHM = "/dev/shm"  # noqa: S108
_TMP_DIR = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None
ALPN = ["http/1.1"]


# Mozilla's "intermediate" server profile (v5.7): TLS 1.2 with ECDHE and AEAD only
# (AES-GCM, ChaCha20-Poly1305; no CBC, no static RSA, no DHE), and TLS 1.3 (whose
# three suites are all AEAD, OpenSSL's default). Key exchange groups X25519, P-256,
# P-384 (no X448, no P-521). Extended Master Secret and session tickets stay on
# (OpenSSL's defaults).
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
GROUPS = "X25519:P-256:P-384"
# TLS 1.3 session tickets sent after a full handshake (`tls.session_tickets`, set once
# per worker by the edge before any context is built)
SESSION_TICKETS = 2


def new_server_context(alpn: Sequence[str] = ALPN) -> ssl.SSLContext:
    """A server context with the profile above and no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_ciphers(TLS12_CIPHERS)
    set_groups(ctx, GROUPS)
    ctx.set_alpn_protocols(list(alpn))
    if SESSION_TICKETS != 2:  # 2 is OpenSSL's default
        ctx.num_tickets = SESSION_TICKETS
    return ctx


def build_server_context(
    chain_pem: bytes, key_pem: bytes, alpn: Sequence[str] = ALPN
) -> ssl.SSLContext:
    ctx = new_server_context(alpn)
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


def set_groups(ctx: ssl.SSLContext, groups: str) -> None:
    """Limit the key exchange groups of `ctx` (TLS 1.2 and 1.3) to `groups`.

    Python 3.11's ssl has no `set_groups` (only `set_ecdh_curve`, for one curve and
    not X25519), and an OpenSSL config file (`OPENSSL_CONF`) takes effect only if it
    is in the environment before the interpreter first initialises OpenSSL, which
    neither `linkedge serve` nor an in-process test edge can promise. So, unless the
    interpreter has `set_groups`, this calls OpenSSL's `SSL_CTX_set1_groups_list` on
    the context's own `SSL_CTX` (the first field after the object header of CPython's
    context object), after checking that pointer: `SSL_CTX_get_options` must read back
    exactly the options Python reports for the context. Any mismatch or failure
    raises, so a context never silently keeps OpenSSL's default groups.
    """
    native = getattr(ctx, "set_groups", None)
    if native is not None:  # Python 3.13+ (OpenSSL's group list syntax)
        native(groups)
        return
    lib = _libssl()
    address = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not address or lib.SSL_CTX_get_options(address) != int(ctx.options):
        raise RuntimeError("cannot reach this Python's SSL_CTX to set the TLS groups")
    if lib.SSL_CTX_ctrl(address, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii")) != 1:
        raise ssl.SSLError(f"OpenSSL refused the TLS groups {groups!r}")


_SSL_CTRL_SET_GROUPS_LIST = 92  # ssl.h; SSL_CTX_set1_groups_list is a macro over SSL_CTX_ctrl


@functools.cache
def _libssl() -> ctypes.CDLL:
    # the libssl that Python's own _ssl module is linked against (dlsym searches the
    # module's dependencies), or the process's global symbols for a built-in _ssl
    path = getattr(_ssl, "__file__", None)
    lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    return lib


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
