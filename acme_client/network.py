"""The acme library's ClientNetwork, minus per-request work that does not pay for itself.

Measured on the issuance path (tests/benchmarks/bench_issuance.py), a stock
`ClientNetwork` spends more CPU around each ACME request than on it:

- requests re-reads the environment on every request (`trust_env`): it walks all of
  `os.environ` twice for proxy settings and looks for `~/.netrc`, about a quarter of the
  CPU of a request. Here the proxy settings and the CA bundle variables are read once
  per CA host and reused; what they mean is unchanged (HTTPS_PROXY, NO_PROXY,
  REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE are honoured as requests honours them; a change
  of those variables is seen by the next process). `.netrc` credentials are not sent to
  an ACME CA (ACME authenticates with JWS, never with HTTP auth).
- `_send_request` formats every response's headers and body for a DEBUG log line even
  when DEBUG is off; here only when it is on.
- requests + urllib3 themselves cost ~1 ms of CPU per keep-alive request (preparing,
  merging settings, hooks, urllib3's pool and response objects), http.client ~0.25 ms
  on the same connection. `DirectSession` sends plain requests to the CA on one
  keep-alive http.client connection per host and hands back a `requests.Response`, so
  the acme library and this package see the same objects and the same exceptions
  (requests.ConnectionError / Timeout / SSLError) as before. Whatever it does not
  handle itself goes through requests unchanged: a proxy from the environment, a
  redirected GET or HEAD, any request option beyond data/headers/timeout/verify.
- josepy builds a JWS through field objects, omit checks and two indented JSON dumps
  (~0.5 ms per request); an account-signed ES256 JWS is three base64url strings, built
  here directly (RFC 7515 flattened JSON, RFC 8555 §6.2 protected header). Requests
  signed with an embedded JWK (account registration, revocation with the certificate's
  key) and other algorithms still go through josepy.
"""

from __future__ import annotations

import base64
import datetime
import functools
import http.client
import json
import logging
import os
import re
import select
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import josepy as jose
import requests
from acme import client
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import DEFAULT_CA_BUNDLE_PATH, get_environ_proxies

log = logging.getLogger("acme.client")  # the library's own logger: same records as before


class EnvOnceSession(requests.Session):
    """A Session that reads proxy and CA-bundle variables once per scheme and host."""

    def __init__(self) -> None:
        super().__init__()
        self.trust_env = False  # no per-request environment walk, no .netrc
        self._env: dict[tuple[str, str, str | None], tuple[dict[str, str], str | None]] = {}

    def merge_environment_settings(
        self,
        url: Any,
        proxies: Any,
        stream: Any,
        verify: Any,
        cert: Any,
    ) -> dict[str, Any]:
        # What Session.merge_environment_settings does with trust_env on, from a cache.
        parts = urlsplit(url if isinstance(url, str) else url.decode())
        no_proxy = proxies.get("no_proxy") if proxies is not None else None
        key = (parts.scheme, parts.netloc, no_proxy)
        env = self._env.get(key)
        if env is None:
            env = (
                get_environ_proxies(url, no_proxy=no_proxy),
                os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE"),
            )
            self._env[key] = env
        env_proxies, env_bundle = env
        if proxies is not None:
            for k, v in env_proxies.items():
                proxies.setdefault(k, v)
        if (verify is True or verify is None) and env_bundle:
            verify = env_bundle
        return super().merge_environment_settings(url, proxies, stream, verify, cert)


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@functools.lru_cache(maxsize=16)
def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """The client context for `verify` as requests reads it (True: certifi's bundle)."""
    if verify is False:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    where = DEFAULT_CA_BUNDLE_PATH if verify is True else verify
    if os.path.isdir(where):
        return ssl.create_default_context(capath=where)
    return ssl.create_default_context(cafile=where)


_MAX_HEAD = 65536  # bytes of status line + headers (http.client's line limit)
_MAX_HEADERS = 100  # as http.client
_NO_BODY = frozenset({204, 304})
_SAFE_TARGET = re.compile(r"[!-~]+")  # printable ASCII, no space: else through requests


class _Exchange:
    """One keep-alive HTTP/1.1 connection for the CA's small requests and answers.

    http.client spends more CPU around a request than the request costs: headers and
    body go out in two writes (two TLS records, two releases of the GIL, each of which
    waits for the busy event loop thread to hand it back), and the answer's headers are
    parsed by the email package. Here the request is one write and the answer is read
    in as few reads as the server's writes allow, then split by hand: a status line,
    `Name: value` lines, a body by Content-Length, chunked, or up to the close. Answers
    to HEAD, 1xx, 204 and 304 have no body. A malformed answer is an error, as in
    http.client (raised as its exceptions, so the callers' handling is unchanged)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        self._buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, head: bytes, body: bytes | None) -> None:
        assert self.sock is not None
        self.sock.sendall(head + body if body else head)

    def _fill(self) -> bool:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            return False
        self._buf += data
        return True

    def receive(self, method: str) -> tuple[int, str, dict[str, str], bytes, bool]:
        """(status, reason, headers, body, whether the connection must close after it).

        A field sent more than once is one entry, its values joined with ", " (as
        requests presents them), under the name as first received."""
        while True:
            status, reason, version, headers = self._head()
            if not 100 <= status < 200:
                break  # a 1xx is followed by the real answer
        fields: dict[str, str] = {}  # lower-case name -> value
        names: dict[str, str] = {}  # lower-case name -> as received
        for name, value in headers:
            key = name.lower()
            if key in fields:
                fields[key] = f"{fields[key]}, {value}"
            else:
                fields[key], names[key] = value, name
        connection = fields.get("connection", "").lower()
        close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
        if method == "HEAD" or status in _NO_BODY:
            body = b""
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            body = self._chunked()
        elif "content-length" in fields:
            try:
                length = int(fields["content-length"])
            except ValueError:
                raise http.client.HTTPException("bad Content-Length") from None
            if length < 0:
                raise http.client.HTTPException("bad Content-Length")
            body = self._exactly(length)
        else:
            while self._fill():
                pass
            body, self._buf, close = self._buf, b"", True
        return status, reason, {names[k]: v for k, v in fields.items()}, body, close

    def _head(self) -> tuple[int, str, str, list[tuple[str, str]]]:
        first = True
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._buf) > _MAX_HEAD:
                raise http.client.LineTooLong("header section")
            if not self._fill():
                if first and not self._buf:
                    raise http.client.RemoteDisconnected("closed without an answer")
                raise http.client.IncompleteRead(self._buf)
            first = False
        head, self._buf = self._buf[:end].decode("iso-8859-1"), self._buf[end + 4 :]
        lines = head.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
            raise http.client.BadStatusLine(lines[0])
        if len(lines) > _MAX_HEADERS + 1:
            raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise http.client.HTTPException(f"malformed header line {line!r}")
            headers.append((name, value.strip()))
        return int(code), reason.strip(), version, headers

    def _exactly(self, length: int) -> bytes:
        while len(self._buf) < length:
            if not self._fill():
                raise http.client.IncompleteRead(self._buf, length - len(self._buf))
        body, self._buf = self._buf[:length], self._buf[length:]
        return body

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > _MAX_HEAD or not self._fill():
                raise http.client.IncompleteRead(self._buf)
        line, self._buf = self._buf[:end], self._buf[end + 2 :]
        return line

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise http.client.HTTPException("bad chunk size") from None
            if size == 0:
                while self._line():  # trailer fields, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self._exactly(size))
            if self._line():
                raise http.client.HTTPException("chunk not followed by CRLF")


class DirectSession(EnvOnceSession):
    """Keep-alive http.client connections for the plain requests an ACME client makes.

    One per ClientNetwork, and a ClientNetwork is used by one thread at a time."""

    def __init__(self) -> None:
        super().__init__()
        self._conns: dict[tuple[str, str, int, bool | str], _Exchange] = {}
        self._merged: dict[tuple[str, str, Any], tuple[bool, Any]] = {}

    def request(  # type: ignore[override]
        self,
        method: str,
        url: str,
        data: Any = None,
        headers: dict[str, str] | None = None,
        timeout: Any = None,
        verify: Any = True,
        **kwargs: Any,
    ) -> requests.Response:
        parts = urlsplit(url)
        if kwargs or parts.scheme not in ("http", "https") or not parts.hostname:
            return self._through_requests(method, url, data, headers, timeout, verify, kwargs)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if not _SAFE_TARGET.fullmatch(target) or not _SAFE_TARGET.fullmatch(method):
            return self._through_requests(method, url, data, headers, timeout, verify, kwargs)
        # what requests would use for this host: a proxy or client certificate sends the
        # request through requests; else the CA bundle (remembered: the inputs are fixed)
        merged = self._merged.get((parts.scheme, parts.netloc, verify))
        if merged is None:
            settings = self.merge_environment_settings(url, {}, None, verify, None)
            direct = not settings["proxies"] and not settings["cert"]
            merged = self._merged[(parts.scheme, parts.netloc, verify)] = (
                direct,
                settings["verify"],
            )
        direct, verify = merged
        if not direct:
            return self._through_requests(method, url, data, headers, timeout, verify, kwargs)
        if isinstance(timeout, tuple):
            timeout = max(t for t in timeout if t is not None) if any(timeout) else None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = (parts.scheme, parts.hostname, port, verify if parts.scheme == "https" else False)
        body = data.encode() if isinstance(data, str) else data
        sent = {"Host": parts.netloc, "Accept-Encoding": "identity", **(headers or {})}
        if body is not None or method in ("POST", "PUT", "PATCH"):
            sent["Content-Length"] = str(len(body or b""))  # as http.client adds it
        lines = [f"{method} {target} HTTP/1.1"]
        for name, value in sent.items():
            value = str(value)
            if not _SAFE_TARGET.fullmatch(name) or "\r" in value or "\n" in value:
                raise ValueError(f"invalid header {name!r}")  # as http.client refuses it
            lines.append(f"{name}: {value}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        prepared = requests.PreparedRequest()
        prepared.method, prepared.url, prepared.body = method, url, body
        prepared.headers = CaseInsensitiveDict(sent)
        for attempt in (0, 1):
            reused = False
            try:
                conn, reused = self._connection(key, timeout)
                conn.send(head, body)
                status, reason, received, content, close = conn.receive(method)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop(key)
                if reused and attempt == 0:
                    continue  # the CA closed an idle keep-alive connection: once more, fresh
                raise requests.ConnectionError(exc, request=prepared) from exc
            except BaseException as exc:
                self._drop(key)
                raise _as_requests_error(exc, prepared) from exc
            break
        if close:
            self._drop(key)
        response = requests.Response()
        response.status_code = status
        response.reason = reason
        response.headers = CaseInsensitiveDict(received)
        response._content = content
        response._content_consumed = True
        response.url = url
        response.request = prepared
        response.encoding = requests.utils.get_encoding_from_headers(response.headers)
        response.elapsed = datetime.timedelta(0)
        if status in _REDIRECTS and "location" in response.headers and method != "POST":
            # as requests would: follow it (ACME servers do not redirect, some fronts may).
            # A POST is not sent twice: its nonce is spent, and RFC 8555 servers never
            # redirect one; the library reports the answer as the error it is.
            return self._through_requests(method, url, data, headers, timeout, verify, kwargs)
        return response

    def _connection(
        self, key: tuple[str, str, int, bool | str], timeout: float | None
    ) -> tuple[_Exchange, bool]:
        conn = self._conns.get(key)
        if conn is not None and conn.sock is not None:
            if not _dropped(conn.sock):
                conn.sock.settimeout(timeout)
                return conn, True
            self._drop(key)
        scheme, host, port, verify = key
        sock = socket.create_connection((host, port), timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                sock = _tls_context(verify).wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        conn = self._conns[key] = _Exchange(sock)
        return conn, False

    def _drop(self, key: tuple[str, str, int, bool | str]) -> None:
        conn = self._conns.pop(key, None)
        if conn is not None:
            conn.close()

    def _through_requests(
        self,
        method: str,
        url: str,
        data: Any,
        headers: Any,
        timeout: Any,
        verify: Any,
        kwargs: dict[str, Any],
    ) -> requests.Response:
        return super().request(
            method, url, data=data, headers=headers, timeout=timeout, verify=verify, **kwargs
        )

    def close(self) -> None:
        for key in list(self._conns):
            self._drop(key)
        super().close()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _dropped(sock: socket.socket) -> bool:
    """An idle keep-alive socket that is readable was closed by the server (or is broken)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _as_requests_error(exc: BaseException, prepared: requests.PreparedRequest) -> BaseException:
    """The requests exception requests would have raised, wrapping the same cause."""
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return requests.exceptions.SSLError(exc, request=prepared)
    if isinstance(exc, TimeoutError | socket.timeout):
        return requests.exceptions.ReadTimeout(exc, request=prepared)
    if isinstance(exc, OSError | http.client.HTTPException):
        return requests.ConnectionError(exc, request=prepared)
    return exc


class LeanClientNetwork(client.ClientNetwork):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session.close()  # the library's own, replaced before its first use
        self.session = DirectSession()
        adapter = HTTPAdapter()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _wrap_in_jws(self, obj: jose.JSONDeSerializable, nonce: str, url: str) -> str:
        # josepy keeps the cryptography key inside a ComparableKey wrapper
        raw = getattr(getattr(self.key, "key", None), "_wrapped", None)
        if (
            self.account is None
            or self.alg is not jose.ES256
            or not isinstance(raw, ec.EllipticCurvePrivateKey)
            or not isinstance(raw.curve, ec.SECP256R1)
        ):
            return super()._wrap_in_jws(obj, nonce, url)
        payload = obj.json_dumps().encode() if obj else b""
        log.debug("JWS payload:\n%s", payload)
        protected = {
            "alg": "ES256",
            "kid": self.account["uri"],
            # the nonce as the CA sent it (ClientNetwork keeps it base64url-decoded)
            "nonce": _b64(nonce if isinstance(nonce, bytes) else nonce.encode()),
            "url": url,
        }
        head = _b64(json.dumps(protected, separators=(",", ":")).encode())
        body = _b64(payload)
        der = raw.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        return json.dumps({"protected": head, "payload": body, "signature": signature})

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        """ClientNetwork._send_request with its debug formatting done only when logged."""
        debug = log.isEnabledFor(logging.DEBUG)
        if debug:
            if method == "POST":
                log.debug("Sending POST request to %s:\n%s", url, kwargs["data"])
            else:
                log.debug("Sending %s request to %s.", method, url)
        kwargs["verify"] = self.verify_ssl
        kwargs.setdefault("headers", {})
        kwargs["headers"].setdefault("User-Agent", self.user_agent)
        kwargs.setdefault("timeout", self._default_timeout)
        response = self.session.request(method, url, *args, **kwargs)
        accept = "Accept" in kwargs["headers"]
        if not accept:
            # as the library does: .text is UTF-8 (not guessed) for every later use
            response.encoding = "utf-8"
        if debug:
            content = base64.b64encode(response.content) if accept else response.text
            log.debug(
                "Received response:\nHTTP %d\n%s\n\n%s",
                response.status_code,
                "\n".join(f"{k}: {v}" for k, v in response.headers.items()),
                content,
            )
        return response
