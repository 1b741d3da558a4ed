"""acme_client.network: the lean JWS and HTTP transport keep the acme library's contract.

Real sockets throughout: a small threaded HTTP server on loopback (counting the TCP
connections it accepts) and the session's Pebble for TLS.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator

import josepy as jose
import pytest
import requests
from acme import client, jws, messages
from cryptography.hazmat.primitives.asymmetric import ec

from acme_client.issuer import _paced
from acme_client.network import DirectSession, LeanClientNetwork
from acme_client.retry import describe_network_error
from proxy.demo.pebble import PebbleServer

NONCE = b"\x01\x02nonce-bytes\xff"


def _account_network(cls: type[client.ClientNetwork]) -> client.ClientNetwork:
    key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    account = messages.RegistrationResource(
        uri="https://ca.test/acct/7", body=messages.Registration()
    )
    return cls(key=key, account=account, alg=jose.ES256)


@pytest.mark.parametrize("with_payload", [True, False])
def test_lean_jws_verifies_and_carries_what_the_library_signs(with_payload: bool) -> None:
    lean = _account_network(LeanClientNetwork)
    stock = client.ClientNetwork(key=lean.key, account=lean.account, alg=jose.ES256)
    order = messages.NewOrder(
        identifiers=[messages.Identifier(typ=messages.IDENTIFIER_FQDN, value="a.example")]
    )
    obj = order if with_payload else None
    url = "https://ca.test/new-order"

    mine = jws.JWS.json_loads(lean._wrap_in_jws(obj, NONCE, url))  # type: ignore[arg-type]
    theirs = jws.JWS.json_loads(stock._wrap_in_jws(obj, NONCE, url))  # type: ignore[arg-type]

    assert mine.verify(lean.key.public_key())  # type: ignore[union-attr]
    ours, lib = mine.signature.combined, theirs.signature.combined
    assert (ours.alg, ours.kid, ours.nonce, ours.url) == (lib.alg, lib.kid, lib.nonce, lib.url)
    assert ours.nonce == NONCE and ours.jwk is None  # account requests: kid, never a JWK
    assert json.loads(mine.payload or b"null") == json.loads(theirs.payload or b"null")


def test_registration_and_other_keys_still_go_through_josepy() -> None:
    """No account yet (newAccount embeds the JWK): the library's own JWS, verifiable."""
    net = _account_network(LeanClientNetwork)
    net.account = None
    signed = jws.JWS.json_loads(net._wrap_in_jws(None, NONCE, "https://ca.test/new-acct"))  # type: ignore[arg-type]
    assert signed.signature.combined.jwk == net.key.public_key()  # type: ignore[union-attr]
    assert signed.verify()


# -- the transport -------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    connections: list[str] = []
    posts: list[str] = []
    close_after_answer = False

    def setup(self) -> None:
        super().setup()
        self.connections.append(str(self.client_address))

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/moved":
            self._answer(302, b"", {"Location": "/dir"})
            return
        self._answer(200, b'{"ok": true}', {"Replay-Nonce": "abc", "Link": "<x>;rel=up"})

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.posts.append(self.path)
        if self.path == "/moved":
            self._answer(307, b"", {"Location": "/order/1"})
            return
        self._answer(201, body, {"Location": "/order/1", "Link": "<y>;rel=alternate"})

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(200, b"", {"Replay-Nonce": "n1"}, length=0)

    def _answer(self, code: int, body: bytes, headers: dict[str, str], length: int = -1) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) if length < 0 else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        if self.close_after_answer:
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type(
        "Handler", (_Handler,), {"connections": [], "posts": [], "close_after_answer": False}
    )
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", handler
    srv.shutdown()
    srv.server_close()


def test_one_keep_alive_connection_and_requests_responses(
    server: tuple[str, type[_Handler]],
) -> None:
    base, handler = server
    session = DirectSession()
    for _ in range(5):
        got = session.request("GET", f"{base}/dir", headers={"User-Agent": "t"}, timeout=5)
        assert got.status_code == 200 and got.ok and got.json() == {"ok": True}
    posted = session.request("POST", f"{base}/new-order", data='{"a": 1}', timeout=5)
    head = session.request("HEAD", f"{base}/nonce", timeout=5)
    assert isinstance(posted, requests.Response) and posted.status_code == 201
    assert posted.json() == {"a": 1} and posted.headers["location"] == "/order/1"
    assert posted.links["alternate"]["url"] == "y"
    assert head.headers["Replay-Nonce"] == "n1" and head.content == b""
    assert len(handler.connections) == 1  # seven requests, one TCP connection
    session.close()


def test_a_connection_the_server_closed_is_replaced(server: tuple[str, type[_Handler]]) -> None:
    base, handler = server
    handler.close_after_answer = True
    session = DirectSession()
    for _ in range(3):
        assert session.request("GET", f"{base}/dir", timeout=5).status_code == 200
    assert len(handler.connections) == 3


def test_redirects_and_proxies_are_left_to_requests(
    server: tuple[str, type[_Handler]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, handler = server
    session = DirectSession()
    moved = session.request("GET", f"{base}/moved", timeout=5)
    assert moved.status_code == 200 and moved.json() == {"ok": True}  # followed, as requests does
    # a signed POST is never sent twice (its nonce is spent): the redirect comes back as is
    answer = session.request("POST", f"{base}/moved", data="{}", timeout=5)
    assert answer.status_code == 307 and handler.posts == ["/moved"]

    # a proxy from the environment: the request goes through requests (and its proxy)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    proxied = DirectSession()
    with pytest.raises(requests.exceptions.ProxyError):
        proxied.request("GET", f"{base}/dir", timeout=5)


def test_network_errors_are_requests_errors(pebble: PebbleServer) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    session = DirectSession()
    with pytest.raises(requests.ConnectionError) as refused:
        session.request("GET", f"https://127.0.0.1:{port}/dir", timeout=5)
    assert "Errno 111" in describe_network_error(refused.value)
    assert f"127.0.0.1:{port}/dir" in describe_network_error(refused.value)

    # Pebble's listener: trusted with its CA bundle, refused by the default (certifi) one
    answer = session.request("GET", pebble.directory_url, timeout=5, verify=str(pebble.ca_bundle))
    assert "newOrder" in answer.json()
    with pytest.raises(requests.exceptions.SSLError) as untrusted:
        DirectSession().request("GET", pebble.directory_url, timeout=5, verify=True)
    assert describe_network_error(untrusted.value).startswith("TLS error")


def test_polling_honours_retry_after_up_to_the_cap() -> None:
    def answer(value: str | None) -> requests.Response:
        r = requests.Response()
        if value is not None:
            r.headers["Retry-After"] = value
        return r

    assert _paced(0.02, None) == 0.02
    assert _paced(0.02, answer(None)) == 0.02
    assert _paced(0.02, answer("0")) == 0.02  # never faster than the backoff
    assert _paced(0.02, answer("0.3")) == 0.3
    assert _paced(0.02, answer("30")) == 0.5  # capped: the order deadline still rules
