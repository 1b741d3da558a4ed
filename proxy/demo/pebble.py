"""Run a real Pebble ACME test CA as a subprocess on loopback.

The demo and the integration tests exercise the real ACME protocol against
Pebble rather than a mock, so issuance bugs show up the way they would with a
public CA. Pebble's HTTPS listener uses a throwaway CA from ``pki``; its issuing
root is regenerated on every start and fetched from the management API.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from proxy.demo.pki import TLSIdentity, write_tls_identity

_ORDER_LINE = re.compile(r'Added order "[^"]+" to the db')  # created, not merely attempted
_STOP_TIMEOUT = 5.0
_LOG_TAIL_LINES = 30
_START_ATTEMPTS = 3


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PebbleServer:
    """A Pebble process with its config, TLS identity and log kept in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        dns_server: str,
        http_port: int = 5002,
        tls_port: int = 5001,
        validity_seconds: int | None = None,
        nonce_reject_percent: int = 0,
        authz_reuse_percent: int = 0,
        extra_env: dict[str, str] | None = None,
        binary: str = "pebble",
        extra_config: dict[str, object] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.dns_server = dns_server
        self.http_port = http_port
        self.tls_port = tls_port
        self.validity_seconds = validity_seconds
        self.nonce_reject_percent = nonce_reject_percent
        self.authz_reuse_percent = authz_reuse_percent
        self.extra_env = dict(extra_env or {})
        # more keys under "pebble" (e.g. externalAccountBindingRequired, externalAccountMACKeys)
        self.extra_config = dict(extra_config or {})
        self.binary = binary
        self.log_path = self.workdir / "pebble.log"
        self.config_path = self.workdir / "pebble-config.json"
        self.root_path = self.workdir / "pebble-root.pem"
        self.ca_bundle = self.workdir / "tls" / "ca.pem"
        self._listen_port = 0
        self._management_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._identity: TLSIdentity | None = None
        self._has_run = False

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self._listen_port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self._management_port}"

    # -- lifecycle ---------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start Pebble on fresh ports (or the previous ones after ``restart``)."""
        if self._proc is not None:
            raise RuntimeError("Pebble is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        keep_ports = self._has_run  # restart: clients already know these URLs
        attempts = 1 if keep_ports else _START_ATTEMPTS
        for attempt in range(attempts):
            if not keep_ports:
                self._listen_port = _free_port()
                self._management_port = _free_port()
                while self._management_port == self._listen_port:
                    self._management_port = _free_port()
            try:
                self._launch(timeout, append_log=keep_ports)
                self._has_run = True
                return
            except RuntimeError:
                # Another process may have grabbed a probed port in the meantime.
                if attempt == attempts - 1 or "address already in use" not in self.log_text():
                    raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        """Stop and start on the same ports; Pebble makes new roots, so re-fetch them."""
        self.stop()
        self.start()

    def __enter__(self) -> PebbleServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- introspection -----------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def certificate_status(self, serial_hex: str) -> dict[str, object]:
        """Pebble's view of one certificate (management API), e.g. {"Status": "Revoked"}."""
        url = f"{self.management_url}/cert-status-by-serial/{serial_hex}"
        return dict(json.loads(self._get(url, timeout=5)))

    def order_count(self) -> int:
        """Orders Pebble has been asked for (counts across restarts of this object)."""
        return len(_ORDER_LINE.findall(self.log_text()))

    # -- internals ---------------------------------------------------------------

    def _write_config(self) -> None:
        # One listener identity per object, so ca_bundle stays valid across restarts.
        if self._identity is None:
            self._identity = write_tls_identity(self.workdir / "tls", ["localhost", "127.0.0.1"])
            self.ca_bundle = self._identity.ca_path
        identity = self._identity
        settings: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self._listen_port}",
            "managementListenAddress": f"127.0.0.1:{self._management_port}",
            "certificate": str(identity.cert_path),
            "privateKey": str(identity.key_path),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity_seconds is not None:
            settings["certificateValidityPeriod"] = self.validity_seconds
        settings.update(self.extra_config)
        self.config_path.write_text(json.dumps({"pebble": settings}, indent=2))

    def _launch(self, timeout: float, append_log: bool) -> None:
        self._write_config()
        env = dict(os.environ)
        env.update(
            PEBBLE_VA_NOSLEEP="1",
            PEBBLE_WFE_NONCEREJECT=str(self.nonce_reject_percent),
            PEBBLE_AUTHZREUSE=str(self.authz_reuse_percent),
        )
        env.update(self.extra_env)
        self._log = open(self.log_path, "ab" if append_log else "wb")
        try:
            self._proc = subprocess.Popen(
                [self.binary, "-config", str(self.config_path), "-dnsserver", self.dns_server],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            self.stop()
            raise RuntimeError(f"cannot run Pebble binary {self.binary!r}: {exc}") from exc
        try:
            self._wait_ready(timeout)
            self.root_path.write_bytes(self._get(f"{self.management_url}/roots/0", timeout))
        except BaseException:
            self.stop()
            raise

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def _get(self, url: str, timeout: float) -> bytes:
        context = self._ssl_context()
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:  # noqa: S310
            return bytes(resp.read())

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise RuntimeError(f"Pebble exited with code {code}\n{self._log_tail()}")
            try:
                self._get(self.directory_url, timeout=1.0)
                return
            except (OSError, urllib.error.URLError) as exc:
                last_error = exc
            time.sleep(0.05)
        raise RuntimeError(
            f"Pebble did not answer {self.directory_url} within {timeout:.0f}s "
            f"(last error: {last_error})\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        lines = self.log_text().splitlines()[-_LOG_TAIL_LINES:]
        return f"--- {self.log_path} (tail) ---\n" + "\n".join(lines)
