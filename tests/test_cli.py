"""The command line as an operator uses it: clear one-line errors, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.net import free_port

from certstore import generate_key_text
from proxy.app.cli import main
from proxy.app.launch import wants_reexec
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def call_cli(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`main` in this process: for cases where an interpreter start proves nothing."""
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def assert_clean_error(
    result: subprocess.CompletedProcess[str], code: int, *fragments: str
) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("linkedge: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def store_env(tmp_path: Path) -> dict[str, str]:
    key = tmp_path / "store.key"
    key.write_text(generate_key_text())
    return {
        "LINKEDGE_STORE_PATH": str(tmp_path / "store.db"),
        "LINKEDGE_STORE_KEY_FILE": str(key),
        "LINKEDGE_STORE_KEY_ENV": "",
        "LINKEDGE_EDGE_CNAME_TARGET": "edge.linkedge.test",
    }


def test_keygen_writes_private_key_and_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k"
    assert run_cli("keygen", str(path)).returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) == 44
    before = path.read_text()
    assert_clean_error(run_cli("keygen", str(path)), 1, "refusing to overwrite")
    assert path.read_text() == before


def test_domains_add_list_remove(store_env: dict[str, str]) -> None:
    added = run_cli("domains", "add", "Links.Bücher.Test.", "--account", "shop1", env=store_env)
    assert added.returncode == 0, added.stderr
    assert "xn--bcher-kva" in added.stdout
    listed = run_cli("domains", "list", "--json", env=store_env)
    rows = json.loads(listed.stdout)
    assert [(r["hostname"], r["account"], r["state"]) for r in rows] == [
        ("links.xn--bcher-kva.test", "shop1", "pending")
    ]
    dup = run_cli("domains", "add", "links.xn--bcher-kva.test", "--account", "other", env=store_env)
    assert_clean_error(dup, 1, "already registered", "shop1")
    assert run_cli("domains", "remove", "LINKS.xn--bcher-kva.test", env=store_env).returncode == 0
    assert json.loads(run_cli("domains", "list", "--json", env=store_env).stdout) == []
    assert_clean_error(
        run_cli("domains", "remove", "nope.test", env=store_env), 1, "not registered"
    )


@pytest.mark.parametrize(
    ("hostname", "fragment"),
    [
        ("192.0.2.1", "IP address"),
        ("[::1]", "IP address"),
        ("*.shop.test", "wildcard"),
        ("a" * 64 + ".test", "longer than 63"),
        (("a" * 60 + ".") * 5 + "test", "longer than 253"),
        ("localhost", "two labels"),
        ("bad_name.test", "letters, digits"),
        ("edge.linkedge.test", "edge's own names"),
        ("x.edge.linkedge.test", "edge's own names"),
    ],
)
def test_domains_add_rejects_bad_hostnames(
    store_env: dict[str, str],
    hostname: str,
    fragment: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return call_cli(capsys, monkeypatch, *args, env=store_env)

    assert_clean_error(cli("domains", "add", hostname), 2, fragment)
    assert json.loads(cli("domains", "list", "--json").stdout) == []


def test_missing_and_wrong_store_key(store_env: dict[str, str], tmp_path: Path) -> None:
    missing = {**store_env, "LINKEDGE_STORE_KEY_FILE": str(tmp_path / "absent.key")}
    assert_clean_error(run_cli("domains", "list", env=missing), 1, "does not exist", "keygen")
    assert run_cli("domains", "add", "links.shop.test", env=store_env).returncode == 0
    other = tmp_path / "other.key"
    other.write_text(generate_key_text())
    wrong = {**store_env, "LINKEDGE_STORE_KEY_FILE": str(other)}
    assert_clean_error(run_cli("domains", "list", env=wrong), 1, "does not match")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not base64 !!")
    bad = {**store_env, "LINKEDGE_STORE_KEY_FILE": str(garbage)}
    assert_clean_error(run_cli("domains", "list", env=bad), 1, "not valid base64")


def test_bad_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[acme]\ndirectroy = "x"\n')
    assert_clean_error(run_cli("-c", str(cfg), "serve"), 2, "unknown config key acme.directroy")
    cfg.write_text("[acme\n")
    assert_clean_error(run_cli("-c", str(cfg), "serve"), 2, "not valid TOML")
    assert_clean_error(run_cli("-c", str(tmp_path / "nope.toml"), "serve"), 2, "does not exist")
    cfg.write_text('[tls]\nissuance_wait = "soon"\n')
    assert_clean_error(run_cli("-c", str(cfg), "serve"), 2, "tls.issuance_wait must be a number")


def _serve_env(store_env: dict[str, str], directory: str, ca_bundle: str) -> dict[str, str]:
    return {
        **store_env,
        "LINKEDGE_LISTEN_HTTPS": f"127.0.0.1:{free_port()}",
        "LINKEDGE_LISTEN_HTTP": f"127.0.0.1:{free_port()}",
        "LINKEDGE_BACKEND_URL": "http://127.0.0.1:9",
        "LINKEDGE_ACME_DIRECTORY": directory,
        "LINKEDGE_ACME_CA_BUNDLE": ca_bundle,
        "LINKEDGE_ADMIN_LISTEN": "",
    }


def test_serve_with_unreachable_acme_server_starts_anyway(
    store_env: dict[str, str], pebble: PebbleServer, tmp_path: Path
) -> None:
    """Issue 8: a CA that is down does not keep the edge from serving what it has."""
    env = _serve_env(store_env, f"https://127.0.0.1:{free_port()}/dir", str(pebble.ca_bundle))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.app.cli", "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    try:
        deadline = time.monotonic() + 30
        while "circuit breaker open" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    text = log_path.read_text()
    assert proc.returncode == 0, text
    assert "ACME server not reachable at start-up" in text and "unreachable" in text
    assert "edge worker ready" in text and "Traceback" not in text


@pytest.mark.parametrize("chosen", [None, "pymalloc"])
def test_serve_runs_on_glibc_malloc_unless_the_operator_chose(
    store_env: dict[str, str], pebble: PebbleServer, tmp_path: Path, chosen: str | None
) -> None:
    """Issue 9: memory returns after bursts only with glibc's allocator for Python's small
    objects; `linkedge serve` re-executes itself with it (same process id)."""
    env = {**os.environ, **_serve_env(store_env, pebble.directory_url, str(pebble.ca_bundle))}
    env.pop("PYTHONMALLOC", None)
    if chosen is not None:
        env["PYTHONMALLOC"] = chosen
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.app.launch", "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while "edge worker ready" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert f"PYTHONMALLOC={chosen or 'malloc'}".encode() in environ
    assert proc.returncode == 0, log_path.read_text()


def test_serve_with_untrusted_acme_certificate(
    store_env: dict[str, str], pebble: PebbleServer
) -> None:
    env = _serve_env(store_env, pebble.directory_url, "")  # system roots do not trust Pebble
    assert_clean_error(run_cli("serve", env=env), 1, "ACME server")


def test_serve_with_port_taken(store_env: dict[str, str], pebble: PebbleServer) -> None:
    env = _serve_env(store_env, pebble.directory_url, str(pebble.ca_bundle))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env["LINKEDGE_LISTEN_HTTPS"] = f"127.0.0.1:{busy.getsockname()[1]}"
        assert_clean_error(run_cli("serve", env=env), 1, "cannot listen on", "listen.https")


def test_domains_verify_reports_cname(store_env: dict[str, str], dns_server: DNSServer) -> None:
    env = {**store_env, "LINKEDGE_DNS_NAMESERVERS": dns_server.nameserver}
    assert run_cli("domains", "add", "links.verify-cli.test", env=env).returncode == 0
    dns_server.set_cname("links.verify-cli.test", "cdn.elsewhere.test")
    failing = run_cli("domains", "verify", "links.verify-cli.test", env=env)
    assert failing.returncode == 1 and "cdn.elsewhere.test" in failing.stdout
    assert "\033[" not in failing.stdout  # piped: no colours
    dns_server.set_cname("links.verify-cli.test", "edge.linkedge.test")
    dns_server.set_a("edge.linkedge.test", ["127.0.0.1"])
    # the CNAME passes; the edge's only address is loopback, which the https check never
    # dials unless the operator lists it
    passing = run_cli("domains", "verify", "links.verify-cli.test", env=env)
    lines = passing.stdout.splitlines()
    assert passing.returncode == 1, passing.stdout
    assert any(
        ln.split()[:2] == ["cname", "[pass]"] and "reaches edge.linkedge.test" in ln for ln in lines
    ), lines
    assert any(
        ln.split()[:2] == ["https", "[unknown]"] and "checks.https_addresses" in ln for ln in lines
    ), lines
    # listed, it is dialled; no edge serves HTTPS for it here: the https check says so
    listed = {**env, "LINKEDGE_CHECKS_HTTPS_ADDRESSES": "127.0.0.1"}
    lines = run_cli("domains", "verify", "links.verify-cli.test", env=listed).stdout.splitlines()
    assert any(ln.split()[:2] == ["https", "[fail]"] and "cannot connect" in ln for ln in lines), (
        lines
    )
    rows = json.loads(run_cli("domains", "list", "--json", env=env).stdout)
    assert rows[0]["state"] == "verified"
    as_json = json.loads(
        run_cli("domains", "verify", "--json", "links.verify-cli.test", env=listed).stdout
    )
    assert [(c["name"], c["state"]) for c in as_json["checks"]] == [
        ("cname", "pass"),
        ("caa", "pass"),
        ("https", "fail"),
    ]
    assert as_json["ok"] is False and as_json["state"] == "verified"


def test_domains_verify_colours_on_a_terminal(
    store_env: dict[str, str], dns_server: DNSServer
) -> None:
    import pty

    env = {**os.environ, **store_env, "LINKEDGE_DNS_NAMESERVERS": dns_server.nameserver}
    env.pop("NO_COLOR", None)
    assert run_cli("domains", "add", "links.tty-cli.test", env=env).returncode == 0
    dns_server.set_cname("links.tty-cli.test", "elsewhere.tty.test")
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "proxy.app.cli", "domains", "verify", "links.tty-cli.test"],
            stdout=secondary,
            stderr=subprocess.PIPE,
            env=env,
            timeout=60,
        )
        os.close(secondary)
        out = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(primary)
    text = out.decode()
    assert proc.returncode == 1
    assert "\033[31m[fail]" in text and "\033[32m[pass]" in text  # red cname, green caa
    assert "points at elsewhere.tty.test" in text


def test_serve_refuses_admin_listener_without_token(
    store_env: dict[str, str], pebble: PebbleServer
) -> None:
    env = _serve_env(store_env, pebble.directory_url, str(pebble.ca_bundle))
    env["LINKEDGE_ADMIN_LISTEN"] = f"127.0.0.1:{free_port()}"
    env["LINKEDGE_ADMIN_TOKEN"] = ""
    assert_clean_error(run_cli("serve", env=env), 2, "no admin token", 'admin.listen = ""')
    env["LINKEDGE_ADMIN_TOKEN"] = "short"
    assert_clean_error(run_cli("serve", env=env), 2, "shorter than 16")
    assert "short" not in run_cli("serve", env=env).stderr.replace("shorter", "")  # never echoed


def test_launcher_reexecutes_only_long_running_commands_without_a_chosen_allocator() -> None:
    assert wants_reexec(["linkedge", "serve"], {})
    assert wants_reexec(["linkedge", "-c", "/etc/linkedge.toml", "serve", "--workers", "2"], {})
    assert wants_reexec(["linkedge", "demo", "--keep"], {})
    assert not wants_reexec(["linkedge", "serve"], {"PYTHONMALLOC": "pymalloc"})
    assert not wants_reexec(["linkedge", "domains", "list"], {})
    assert not wants_reexec(["linkedge"], {})
