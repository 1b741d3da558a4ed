"""`linkedge demo`: the whole product on loopback, on embedded defaults.

Starts a DNS server, Pebble (a real ACME CA), a sample tracking backend and
`linkedge serve` as a separate process; registers a demo tracking host, points
its CNAME at the edge and clicks a tracked link over HTTPS, verifying the
certificate against Pebble's root. Prints every step; cleans everything up.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from certstore import generate_key_text, open_store
from certstore.crypto import parse_key_text
from proxy.demo.backend import start_backend
from proxy.demo.client import click, edge_session
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

DEMO_HOST = "links.shop.demo.test"
EDGE_TARGET = "edge.linkedge.test"
EDGE_IP = "127.0.0.1"


def run_demo(keep: bool = False) -> int:
    if shutil.which("pebble") is None:
        print(
            "linkedge: error: the demo needs Pebble (Debian package `pebble`): "
            "sudo apt-get install pebble",
            file=sys.stderr,
        )
        return 1
    with tempfile.TemporaryDirectory(prefix="linkedge-demo-") as tmp:
        return asyncio.run(_demo(Path(tmp), keep))


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((EDGE_IP, 0))
        return int(s.getsockname()[1])


async def _demo(tmp: Path, keep: bool) -> int:
    http_port, https_port, admin_port = _free_port(), _free_port(), _free_port()
    dns = DNSServer()
    pebble: PebbleServer | None = None
    edge: subprocess.Popen[bytes] | None = None
    backend_runner = None
    log_path = tmp / "edge.log"
    try:
        _step("starting a DNS server on loopback")
        dns.start()
        dns.set_a(EDGE_TARGET, [EDGE_IP])
        print(f"    {dns.nameserver}: {EDGE_TARGET} A {EDGE_IP}")

        _step("starting Pebble, a test ACME CA (Let's Encrypt's test server)")
        pebble = PebbleServer(tmp / "pebble", dns.nameserver, http_port=http_port)
        await asyncio.to_thread(pebble.start)
        print(f"    directory {pebble.directory_url}; validates HTTP-01 on port {http_port}")

        _step("starting the sample tracking backend")
        backend_runner, backend_url = await start_backend()
        print(f"    {backend_url}  (GET /c/<id> answers 302 to the landing page)")

        key_text = generate_key_text()
        key_file = tmp / "store.key"
        key_file.write_text(key_text)
        key_file.chmod(0o600)
        admin_token = generate_key_text()  # 44 random characters
        token_file = tmp / "admin.token"
        token_file.write_text(admin_token)
        token_file.chmod(0o600)
        config_path = tmp / "linkedge.toml"
        config_path.write_text(
            _config_toml(
                tmp, https_port, http_port, admin_port, backend_url, pebble, dns.nameserver
            )
        )

        _step(f"registering tracking host {DEMO_HOST} and pointing its CNAME at {EDGE_TARGET}")
        store = await open_store(tmp / "linkedge.db", parse_key_text(key_text, "demo"))
        await store.add_domain(DEMO_HOST, "demo-customer")
        await store.close()
        dns.set_cname(DEMO_HOST, EDGE_TARGET)
        print(f"    {DEMO_HOST} CNAME {EDGE_TARGET}")

        _step(f"starting the edge: linkedge serve -c {config_path}")
        edge = await asyncio.to_thread(_start_edge, config_path, log_path)
        await _wait_listening(edge, https_port, log_path)
        print(f"    HTTPS on {EDGE_IP}:{https_port}, HTTP on {EDGE_IP}:{http_port}")

        url = f"https://{DEMO_HOST}:{https_port}/c/demo-1"
        _step(f"first HTTPS click (no certificate yet): GET {url}")
        async with edge_session(EDGE_IP, str(pebble.root_path)) as session:
            first = await click(session, url)
            _report(first)
            _step("second click (certificate cached)")
            second = await click(session, url.replace("demo-1", "demo-2"))
            _report(second)
        _step("legacy http:// link still works")
        async with edge_session(EDGE_IP, str(pebble.root_path)) as session:
            legacy = await click(session, f"http://{DEMO_HOST}:{http_port}/c/demo-3")
            _report(legacy)

        ok = first.status == second.status == legacy.status == 302
        _step("edge log")
        for line in log_path.read_text(errors="replace").splitlines()[-8:]:
            print(f"    {line}")
        _step("result: " + ("OK, tracked links are HTTPS" if ok else "FAILED"))
        print(f"    ACME orders placed at Pebble: {pebble.order_count()}")
        if keep and ok:
            print(
                f"\nStill running. Try:\n  curl --cacert {pebble.root_path} --resolve "
                f"{DEMO_HOST}:{https_port}:{EDGE_IP} -i https://{DEMO_HOST}:{https_port}/c/42\n"
                f"  status page: http://{EDGE_IP}:{admin_port}/status (token: {admin_token})\n"
                "Ctrl-C to stop."
            )
            await _wait_for_interrupt()
        return 0 if ok else 1
    finally:
        _step("cleaning up")
        if edge is not None:
            edge.send_signal(signal.SIGTERM)
            try:
                edge.wait(10)
            except subprocess.TimeoutExpired:
                edge.kill()
                edge.wait()
        if backend_runner is not None:
            await backend_runner.cleanup()
        if pebble is not None:
            pebble.stop()
        dns.stop()


def _start_edge(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy.app.cli", "-c", str(config_path), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LINKEDGE_STORE_KEY": ""},
        )


def _config_toml(
    tmp: Path,
    https_port: int,
    http_port: int,
    admin_port: int,
    backend_url: str,
    pebble: PebbleServer,
    ns: str,
) -> str:
    return f"""\
[listen]
https = "{EDGE_IP}:{https_port}"
http = "{EDGE_IP}:{http_port}"

[backend]
url = "{backend_url}"

[edge]
cname_target = "{EDGE_TARGET}"

[acme]
directory = "{pebble.directory_url}"
ca_bundle = "{pebble.ca_bundle}"

[store]
path = "{tmp / "linkedge.db"}"
key_file = "{tmp / "store.key"}"

[dns]
nameservers = ["{ns}"]

[admin]
listen = "{EDGE_IP}:{admin_port}"
token_file = "{tmp / "admin.token"}"

[checks]
https_port = {https_port}
https_addresses = ["{EDGE_IP}"]
ca_bundle = "{pebble.root_path}"
"""


async def _wait_listening(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = await asyncio.to_thread(log_path.read_text, errors="replace")
            raise RuntimeError(f"the edge exited early:\n{log}")
        try:
            _reader, writer = await asyncio.open_connection(EDGE_IP, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise RuntimeError("the edge did not start listening within 30 s")


def _report(result: object) -> None:
    from proxy.demo.client import Click

    assert isinstance(result, Click)
    print(f"    HTTP {result.status} in {result.seconds * 1000:.0f} ms -> {result.location}")
    cert = result.peer_certificate
    if cert:
        issuer = dict(pair[0] for pair in cert.get("issuer", ()))  # type: ignore[attr-defined]
        print(f"    certificate verified: issuer {issuer.get('commonName')}")
        print(f"    valid until {cert.get('notAfter')}, for {cert.get('subjectAltName')}")


async def _wait_for_interrupt() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
