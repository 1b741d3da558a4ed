"""Encryption at rest for private keys (AES-256-GCM).

The store never holds a private key in clear text: every secret is sealed with a
key that lives outside the database (a file or an environment variable). The
associated data binds each ciphertext to the row it belongs to, so a sealed key
copied onto another row fails to open instead of being served for the wrong host.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
_NONCE_BYTES = 12
_VERSION = b"\x01"


class StoreKeyError(Exception):
    """The store key is missing, malformed, or does not open this store."""


def generate_key_text() -> str:
    """A fresh store key, in the base64 text form accepted by :func:`load_key`."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def parse_key_text(text: str, origin: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise StoreKeyError(f"store key from {origin} is not valid base64") from None
    if len(raw) != KEY_BYTES:
        raise StoreKeyError(
            f"store key from {origin} must decode to {KEY_BYTES} bytes, got {len(raw)}"
        )
    return raw


def load_key(key_file: str | None, key_env: str | None) -> bytes:
    """Read the store key from the environment variable (preferred) or file.

    There is deliberately no fallback to "no encryption": a missing key is an error.
    """
    if key_env:
        value = os.environ.get(key_env)
        if value:
            return parse_key_text(value, f"environment variable {key_env}")
    if key_file:
        path = Path(key_file)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise StoreKeyError(
                f"store key file {path} does not exist (create one with `linkedge keygen {path}`)"
            ) from None
        except OSError as exc:
            raise StoreKeyError(f"cannot read store key file {path}: {exc.strerror}") from None
        return parse_key_text(text, f"file {path}")
    where = f"environment variable {key_env}" if key_env else "no key file configured"
    raise StoreKeyError(f"no store key: {where} (set store.key_file or the environment variable)")


class Sealer:
    """Seals and opens secrets with AES-256-GCM; every backend seals through this.

    The associated data names the row a secret belongs to (:meth:`row`: kind and key,
    e.g. ``cert:links.shop.com``), so a sealed value copied onto another row fails to
    open. A backend stores only what :meth:`seal` returns, and :meth:`key_check` lets it
    refuse, at open, a key that is not the store's.
    """

    KEY_CHECK_ROW = "meta:key_check"
    _KEY_CHECK = b"linkedge-store-key-check"

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise StoreKeyError(f"store key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    @staticmethod
    def row(kind: str, key: str) -> str:
        """The associated data for row `key` of `kind` (``cert``, ``account``, ``order``)."""
        return f"{kind}:{key}"

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        if len(sealed) < 1 + _NONCE_BYTES + 16 or sealed[:1] != _VERSION:
            raise StoreKeyError(f"sealed value for {context!r} is corrupt")
        nonce = sealed[1 : 1 + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, sealed[1 + _NONCE_BYTES :], context.encode())
        except InvalidTag:
            raise StoreKeyError(
                f"cannot decrypt {context!r}: wrong store key or tampered data"
            ) from None

    def key_check(self) -> bytes:
        """A sealed marker a backend keeps with a new store, for :meth:`verify_key_check`."""
        return self.seal(self._KEY_CHECK, self.KEY_CHECK_ROW)

    def verify_key_check(self, sealed: bytes) -> None:
        """Raise StoreKeyError unless `sealed` came from :meth:`key_check` with this key."""
        try:
            ok = self.open(sealed, self.KEY_CHECK_ROW) == self._KEY_CHECK
        except StoreKeyError:
            ok = False
        if not ok:
            raise StoreKeyError("the store key does not match this store (wrong key?)")
