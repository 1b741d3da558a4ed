"""Publishing ACME challenge answers where the edge's listeners find them.

- HTTP-01: the key authorization under its token; the HTTP listener of any worker
  answers `/.well-known/acme-challenge/<token>` from the store.
- TLS-ALPN-01 (RFC 8737): the key authorization under the host name; the HTTPS
  listener of any worker answers a ClientHello offering ALPN `acme-tls/1` with a
  self-signed certificate built from it (`tls_alpn01_certificate`).

acme 5.x dropped its TLS-ALPN-01 classes; the two small ones below teach it the type.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import josepy as jose
from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certstore import ChallengeStore

HTTP_01 = "http-01"
TLS_ALPN_01 = "tls-alpn-01"
CHALLENGE_TYPES = (HTTP_01, TLS_ALPN_01)
ACME_TLS_ALPN = "acme-tls/1"
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")  # id-pe-acmeIdentifier


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """Empty response body (RFC 8737 §3), like every key-authorization response."""

    typ = TLS_ALPN_01


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    response_cls = TLSALPN01Response
    typ = TLS_ALPN_01

    def validation(self, account_key: jose.JWK, **kwargs: Any) -> str:
        return self.key_authorization(account_key)


# Where answers are published: the store's challenge role (every worker reads it).
ChallengeSink = ChallengeStore


class PublishedAnswers:
    """The challenge store, remembering in memory the answers this process published.

    The CA fetches an HTTP-01 token several times (Pebble three times, Let's Encrypt
    from several vantage points), and each fetch was a store read; on a shared
    PostgreSQL that is a round trip per fetch. The node whose order published the
    answer keeps it here until the order deletes it (or `ttl` passes, in case a delete
    never happens): a hit answers without the store. Every write still goes to the
    store first, so any other worker or node the CA reaches answers from there, and a
    miss here reads the store as before. Only exact tokens and names this process put
    are answered from memory; nothing else is ever cached (made-up tokens, other
    nodes' answers), so a delete elsewhere cannot leave a stale answer here.
    """

    def __init__(
        self,
        store: ChallengeStore,
        ttl: float = 900.0,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._capacity = capacity
        self._clock = clock
        self._http: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._alpn: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.hits = 0  # answers served from memory (tests, benchmarks)

    def __len__(self) -> int:
        return len(self._http) + len(self._alpn)

    async def put_challenge(self, token: str, key_authorization: str, hostname: str) -> None:
        await self._store.put_challenge(token, key_authorization, hostname)
        self._remember(self._http, token, key_authorization)

    async def get_challenge(self, token: str) -> str | None:
        found = self._recall(self._http, token)
        return found if found is not None else await self._store.get_challenge(token)

    async def delete_challenge(self, token: str) -> None:
        # forgotten first: once the order is over this process never answers it again,
        # even when the store's delete fails (its row then expires with the order)
        self._http.pop(token, None)
        await self._store.delete_challenge(token)

    async def put_alpn_challenge(self, hostname: str, key_authorization: str) -> None:
        await self._store.put_alpn_challenge(hostname, key_authorization)
        self._remember(self._alpn, hostname, key_authorization)

    async def get_alpn_challenge(self, hostname: str) -> str | None:
        found = self._recall(self._alpn, hostname)
        return found if found is not None else await self._store.get_alpn_challenge(hostname)

    async def delete_alpn_challenge(self, hostname: str) -> None:
        self._alpn.pop(hostname, None)
        await self._store.delete_alpn_challenge(hostname)

    def _remember(self, table: OrderedDict[str, tuple[str, float]], key: str, value: str) -> None:
        table[key] = (value, self._clock() + self._ttl)
        table.move_to_end(key)
        while len(table) > self._capacity:
            table.popitem(last=False)

    def _recall(self, table: OrderedDict[str, tuple[str, float]], key: str) -> str | None:
        entry = table.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            del table[key]
            return None
        self.hits += 1
        return entry[0]


class Solver(Protocol):
    typ: str

    async def present(self, hostname: str, token: str, key_authorization: str) -> None: ...
    async def cleanup(self, hostname: str, token: str) -> None: ...


class Http01Solver:
    typ = HTTP_01

    def __init__(self, sink: ChallengeSink) -> None:
        self._sink = sink

    async def present(self, hostname: str, token: str, key_authorization: str) -> None:
        await self._sink.put_challenge(token, key_authorization, hostname)

    async def cleanup(self, hostname: str, token: str) -> None:
        await self._sink.delete_challenge(token)


class TlsAlpn01Solver:
    typ = TLS_ALPN_01

    def __init__(self, sink: ChallengeSink) -> None:
        self._sink = sink

    async def present(self, hostname: str, token: str, key_authorization: str) -> None:
        await self._sink.put_alpn_challenge(hostname, key_authorization)

    async def cleanup(self, hostname: str, token: str) -> None:
        await self._sink.delete_alpn_challenge(hostname)


def make_solver(typ: str, sink: ChallengeSink) -> Solver:
    if typ == HTTP_01:
        return Http01Solver(sink)
    if typ == TLS_ALPN_01:
        return TlsAlpn01Solver(sink)
    raise ValueError(
        f"unsupported challenge type {typ!r} (supported: {', '.join(CHALLENGE_TYPES)})"
    )


def tls_alpn01_certificate(hostname: str, key_authorization: str) -> tuple[bytes, bytes]:
    """RFC 8737 §3: a self-signed certificate for exactly `hostname`, whose critical
    acmeIdentifier extension holds the SHA-256 digest of the key authorization as a
    DER OCTET STRING. Returns (certificate PEM, private key PEM)."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    extension_value = b"\x04\x20" + digest  # OCTET STRING, 32 bytes
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, extension_value), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
