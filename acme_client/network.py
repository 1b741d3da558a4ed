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


class DirectSession(EnvOnceSession):
    """Keep-alive http.client connections for the plain requests an ACME client makes.

    One per ClientNetwork, and a ClientNetwork is used by one thread at a time."""

    def __init__(self) -> None:
        super().__init__()
        self._conns: dict[tuple[str, str, int, bool | str], http.client.HTTPConnection] = {}
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
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        body = data.encode() if isinstance(data, str) else data
        sent = {"Host": parts.netloc, "Accept-Encoding": "identity", **(headers or {})}
        prepared = requests.PreparedRequest()
        prepared.method, prepared.url, prepared.body = method, url, body
        prepared.headers = CaseInsensitiveDict(sent)
        for attempt in (0, 1):
            conn, reused = self._connection(key, timeout)
            try:
                conn.request(method, target, body=body, headers=sent)
                raw = conn.getresponse()
                content = raw.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop(key)
                if reused and attempt == 0:
                    continue  # the CA closed an idle keep-alive connection: once more, fresh
                raise requests.ConnectionError(exc, request=prepared) from exc
            except BaseException as exc:
                self._drop(key)
                raise _as_requests_error(exc, prepared) from exc
            break
        if raw.will_close:
            self._drop(key)
        response = requests.Response()
        response.status_code = raw.status
        response.reason = raw.reason
        response.headers = CaseInsensitiveDict(
            {k: ", ".join(raw.msg.get_all(k) or ()) for k in dict.fromkeys(raw.msg.keys())}
        )
        response._content = content
        response._content_consumed = True
        response.url = url
        response.request = prepared
        response.encoding = requests.utils.get_encoding_from_headers(response.headers)
        response.elapsed = datetime.timedelta(0)
        if raw.status in _REDIRECTS and "location" in response.headers and method != "POST":
            # as requests would: follow it (ACME servers do not redirect, some fronts may).
            # A POST is not sent twice: its nonce is spent, and RFC 8555 servers never
            # redirect one; the library reports the answer as the error it is.
            return self._through_requests(method, url, data, headers, timeout, verify, kwargs)
        return response

    def _connection(
        self, key: tuple[str, str, int, bool | str], timeout: float | None
    ) -> tuple[http.client.HTTPConnection, bool]:
        conn = self._conns.get(key)
        if conn is not None and conn.sock is not None:
            if not _dropped(conn.sock):
                conn.timeout = timeout
                conn.sock.settimeout(timeout)
                return conn, True
            self._drop(key)
        scheme, host, port, verify = key
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=_tls_context(verify)
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self._conns[key] = conn
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
