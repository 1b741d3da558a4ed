"""The local fleet's helper services (deploy/compose/compose.yaml), on the linkedge image.

`linkedge demo` runs a DNS server, Pebble, the sample backend and one edge as processes on
loopback; the compose fleet runs the same parts as containers with three edges. This script
is what the containers that are not edges, Pebble or PostgreSQL run:

    fleet.py init STATE          secrets (store key, database password, admin token) and
                                 Pebble's TLS identity in STATE, each made once
    fleet.py dns                 the demo DNS server on :53: edge.fleet.test -> the edges,
                                 every customer host CNAME edge.fleet.test
    fleet.py backend             the sample click-tracking backend on :8080
    fleet.py pebble-root STATE   wait for Pebble, write its issuing root (the https check's
                                 trust anchor) to STATE/pebble/root.pem
    fleet.py register            add the customer hosts to the shared store (idempotent)

Settings come from the environment (FLEET_*), so compose.yaml is the one place to read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import secrets
import signal
import ssl
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

DEFAULT_HOSTS = "links.shop-a.fleet.test,links.shop-b.fleet.test,links.shop-c.fleet.test"
DEFAULT_EDGES = "172.29.11.11,172.29.11.12,172.29.11.13"
CNAME_TARGET = "edge.fleet.test"
# Pebble's listener certificate is a throwaway (proxy/demo/pki.py, valid 7 days): make a new
# one when less than this is left, on the next `docker compose up`
RENEW_PEBBLE_IDENTITY_BEFORE = timedelta(days=1)


def _hosts() -> list[str]:
    return _split(os.environ.get("FLEET_HOSTS", DEFAULT_HOSTS))


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _write_once(path: Path, text: str, mode: int) -> bool:
    """Write a new file (never replace one: the fleet's data is sealed with the first key)."""
    if path.exists():
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by an init that died mid-write
    # created with its mode: a secret is never readable by others, not even for a moment
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as fh:
        fh.write(text)
    tmp.replace(path)  # whole or absent: an edge never reads half a key
    return True


def init(state: Path) -> None:
    from certstore import generate_key_text
    from proxy.demo.pki import write_tls_identity

    (state / "secrets").mkdir(parents=True, exist_ok=True)
    # Read by the edges (uid 10001, the owner) only ...
    _write_once(state / "secrets" / "store.key", generate_key_text(), 0o400)
    _write_once(state / "secrets" / "admin.token", secrets.token_urlsafe(32), 0o400)
    # ... except the database password, which the postgres image also reads (as its own
    # user, 999) to set the password on first start. Only containers that mount the volume
    # see it; a production fleet keeps it in a secret store (deploy/kubernetes/).
    _write_once(state / "secrets" / "db-password", secrets.token_urlsafe(24), 0o444)
    pebble = state / "pebble"
    if _identity_expiring(pebble / "cert.pem"):
        write_tls_identity(pebble, ["pebble", "localhost"])  # key.pem 0600, owner only
    owner = os.environ.get("FLEET_OWNER", "")
    if owner:
        _chown_tree(state, owner)
    print(f"fleet: state in {state}", flush=True)


def _chown_tree(state: Path, owner: str) -> None:
    """A fresh named volume belongs to root: init runs as root and hands the tree to the
    image's user (uid 10001), which the edges, Pebble and pebble-root run as."""
    uid, _, gid = owner.partition(":")
    for path in [state, *state.rglob("*")]:
        os.chown(path, int(uid), int(gid or uid))


def _identity_expiring(cert_path: Path) -> bool:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return True
    return cert.not_valid_after_utc - datetime.now(UTC) < RENEW_PEBBLE_IDENTITY_BEFORE


def dns(port: int) -> None:
    from proxy.demo.dnsserver import DNSServer

    edges = _split(os.environ.get("FLEET_EDGE_ADDRESSES", DEFAULT_EDGES))
    server = DNSServer(host=os.environ.get("FLEET_DNS_LISTEN", "0.0.0.0"), port=port)
    # Every edge's address: the CA validates through whichever node it picks, which is the
    # point of the fleet (any node answers HTTP-01 and TLS-ALPN-01 from the shared store).
    server.set_a(CNAME_TARGET, edges)
    for host in _hosts():
        server.set_cname(host, CNAME_TARGET)
    # Blocked before the server's threads start (they inherit the mask) and before the
    # line that says it is up: a stop that follows at once waits in sigwait instead of
    # killing the process by the default action (a test saw exit -15 under load).
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    server.start()
    print(f"fleet: DNS on {server.nameserver}: {CNAME_TARGET} A {', '.join(edges)}", flush=True)
    try:
        signal.sigwait(stops)
    finally:
        server.stop()


def backend(port: int) -> None:
    async def serve() -> None:
        from proxy.demo.backend import start_backend

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # before saying it is up (see dns)
            loop.add_signal_handler(sig, stop.set)
        runner, url = await start_backend(os.environ.get("FLEET_BACKEND_LISTEN", "0.0.0.0"), port)
        print(f"fleet: sample backend on {url}", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())


def pebble_root(state: Path, timeout: float) -> None:
    """Pebble makes a new issuing root on every start and only serves it over its API."""
    url = os.environ.get("FLEET_PEBBLE_MANAGEMENT", "https://pebble:15000") + "/roots/0"
    context = ssl.create_default_context(cafile=str(state / "pebble" / "ca.pem"))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as resp:  # noqa: S310
                root = resp.read()
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                sys.exit(f"fleet: Pebble did not answer {url} within {timeout:g} s: {exc}")
            time.sleep(1)
    target = state / "pebble" / "root.pem"
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(root)
    tmp.chmod(0o444)
    tmp.replace(target)
    print(f"fleet: Pebble's root in {target}", flush=True)


def register() -> None:
    """`linkedge domains add` for each host not yet in the store: `compose up` runs it again.

    The CLI's own entry point, in this one process (each `linkedge` run would pay the
    imports again); it reads the edges' config, $LINKEDGE_CONFIG.
    """
    from proxy.app.cli import main as linkedge

    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        code = linkedge(["domains", "list", "--json"])
    if code:
        sys.exit(f"fleet: linkedge domains list failed ({code})")
    known = {row["hostname"] for row in json.loads(listing.getvalue() or "[]")}
    for host in _hosts():
        if host not in known and linkedge(["domains", "add", host, "--account", "fleet"]):
            sys.exit(f"fleet: linkedge domains add {host} failed")
    print(f"fleet: hosts registered: {', '.join(_hosts())}", flush=True)


def main(argv: list[str]) -> None:
    command = argv[0] if argv else ""
    if command == "init" and len(argv) == 2:
        init(Path(argv[1]))
    elif command == "dns":
        dns(int(os.environ.get("FLEET_DNS_PORT", "53")))
    elif command == "backend":
        backend(int(os.environ.get("FLEET_BACKEND_PORT", "8080")))
    elif command == "pebble-root" and len(argv) == 2:
        pebble_root(Path(argv[1]), float(os.environ.get("FLEET_PEBBLE_TIMEOUT", "60")))
    elif command == "register":
        register()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
