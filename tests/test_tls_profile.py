"""Issue 9: the HTTPS listener meets Mozilla's "intermediate" TLS profile.

sslyze (its own virtualenv, `.venv-sslyze`, made by `deploy/bootstrap.sh --test`:
its cryptography pin conflicts with acme's) scans a real edge whose certificate
comes from a dedicated Pebble issuing 90-day certificates (the profile allows at
most 366 days; Pebble's default is years). `openssl s_client` then checks the
groups and suites one by one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support.clicks import certify, new_host
from support.edge import EdgeHandle, make_config
from support.pebble import running_pebble

from certstore import generate_key_text
from proxy.demo.backend import RecordedRequest
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer

ROOT = Path(__file__).resolve().parent.parent
NINETY_DAYS = 90 * 86400
_addresses = itertools.count(200)


def sslyze_binary() -> str:
    found = ROOT / ".venv-sslyze" / "bin" / "sslyze"
    if found.exists():
        return str(found)
    path = shutil.which("sslyze") or shutil.which("sslyze", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail("sslyze is not installed: run deploy/bootstrap.sh --test")
    return path


@pytest.fixture(scope="module")
def pebble90(
    dns_server: DNSServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PebbleServer]:
    with running_pebble(
        tmp_path_factory.mktemp("pebble90"), dns_server, validity_seconds=NINETY_DAYS
    ) as server:
        yield server


@pytest.fixture
async def edge90(
    tmp_path: Path,
    pebble90: PebbleServer,
    dns_server: DNSServer,
    backend: tuple[str, list[RecordedRequest]],
) -> AsyncIterator[EdgeHandle]:
    n = next(_addresses)
    ip, target = f"127.0.0.{n}", f"edge-{n}.linkedge.test"
    dns_server.set_a(target, [ip])
    key_text = generate_key_text()
    (tmp_path / "store.key").write_text(key_text)
    config = make_config(tmp_path, ip, target, pebble90, dns_server, backend[0])
    handle = EdgeHandle(ip=ip, target=target, config=config, key_text=key_text)
    await handle.start()
    try:
        yield handle
    finally:
        await handle.stop()


async def run(*argv: str, timeout: float = 120) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


async def s_client(edge: EdgeHandle, host: str, *options: str) -> str | None:
    """`openssl s_client` with these options: its report, or None if no handshake."""
    code, out = await run(
        "openssl", "s_client", "-connect", f"{edge.ip}:{edge.https_port}",
        "-servername", host, *options, timeout=20,
    )  # fmt: skip
    return out if code == 0 and "Cipher is (NONE)" not in out and "New, " in out else None


async def test_sslyze_mozilla_intermediate_finds_nothing(
    edge90: EdgeHandle, pebble90: PebbleServer, dns_server: DNSServer, tmp_path: Path
) -> None:
    host = await certify(edge90, pebble90, dns_server, new_host(edge90))
    report = tmp_path / "sslyze.json"
    code, out = await run(
        sslyze_binary(),
        "--mozilla_config=intermediate",
        "--resum",
        "--ems",
        f"--certinfo_ca_file={pebble90.root_path}",  # trust Pebble's root for path validation
        f"--json_out={report}",
        f"{host}:{edge90.https_port}{{{edge90.ip}}}",  # SNI = the certified host
        timeout=240,
    )
    assert code == 0, out
    assert ": OK - Compliant." in out, out
    result = json.loads(report.read_text())["server_scan_results"][0]
    assert result["connectivity_status"] == "COMPLETED", result
    commands = result["scan_result"]
    resumption = commands["session_resumption"]["result"]
    assert resumption["tls_ticket_successful_resumptions_count"] > 0, resumption
    assert commands["tls_extended_master_secret"]["result"]["supports_ems_extension"]
    curves = commands["elliptic_curves"]["result"]
    assert {c["name"] for c in curves["supported_curves"]} == {"X25519", "secp256r1", "secp384r1"}
    tls12 = commands["tls_1_2_cipher_suites"]["result"]["accepted_cipher_suites"]
    names = {c["cipher_suite"]["openssl_name"] for c in tls12}
    assert names and all(
        n.startswith("ECDHE-") and ("GCM" in n or "CHACHA20" in n) for n in names
    ), names


async def test_groups_and_suites_one_by_one(
    edge90: EdgeHandle, pebble90: PebbleServer, dns_server: DNSServer
) -> None:
    host = await certify(edge90, pebble90, dns_server, new_host(edge90))
    # TLS 1.3: the client offers one group at a time
    for group in ("X25519", "P-256", "P-384"):
        assert await s_client(edge90, host, "-tls1_3", "-groups", group), group
    for group in ("X448", "P-521", "ffdhe2048"):
        assert await s_client(edge90, host, "-tls1_3", "-groups", group) is None, group
    # TLS 1.2: supported_groups also lists the curves the client accepts for the ECDSA
    # certificate (RFC 8422), so P-256 stays in the list; the key exchange must not
    # use the unwanted groups offered before it
    for first in ("X448", "P-521"):
        out = await s_client(edge90, host, "-tls1_2", "-groups", f"{first}:P-256")
        assert out is not None and "Server Temp Key: ECDH, prime256v1" in out, first
    out = await s_client(edge90, host, "-tls1_2", "-groups", "X25519:P-256")
    assert out is not None and "Server Temp Key: X25519" in out
    chacha = await s_client(edge90, host, "-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305")
    assert chacha is not None and "Cipher is ECDHE-ECDSA-CHACHA20-POLY1305" in chacha
    for cbc in ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256"):
        assert await s_client(edge90, host, "-tls1_2", "-cipher", cbc) is None, cbc
    assert await s_client(edge90, host, "-tls1_1") is None
