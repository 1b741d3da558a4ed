"""The one way tests start a PostgreSQL: Debian's server, a throwaway cluster, loopback only.

`initdb` and the server refuse to run as root, so when the tests are root the cluster
belongs to the Debian package's `postgres` user (or `nobody`) and every server command runs
through `runuser`. The data directory lives in its own world-traversable temp directory
(pytest's are 0700 to root). Host connections use scram-sha-256 with a generated
password, so a URL without the password is refused, as in production.

The server can be stopped and started again on the same port and data (a database outage
or fail-over in a test): :meth:`PostgresServer.stop` and :meth:`PostgresServer.start`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from support.net import free_port

USER = "linkedge"


def postgres_bindir() -> Path:
    """The newest installed server's bin directory (Debian keeps it off PATH)."""
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        raise RuntimeError(
            "PostgreSQL server not installed (Debian package `postgresql`; "
            "deploy/bootstrap.sh --test installs it)"
        )
    return versions[-1]


def _server_user() -> str | None:
    """Who runs the server: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and no unprivileged user to run PostgreSQL as")


class PostgresServer:
    """A started cluster: `url(db)` for a database in it, `create_database(name)`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        ssl_cert: bytes | None = None,
        ssl_key: bytes | None = None,
    ) -> None:
        """`ssl_cert`/`ssl_key` (PEM): the server also speaks TLS (`ssl = on`)."""
        self.bindir = postgres_bindir()
        self.host = host
        self.port = port or free_port()
        self.password = secrets.token_urlsafe(18)
        self.os_user = _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="linkedge-pg-"))
        self.root.chmod(0o755)
        self.datadir = self.root / "data"
        self.socketdir = self.root / "sock"
        self.logfile = self.root / "server.log"
        self._initdb()
        self._ssl_options: list[str] = []
        if ssl_cert is not None and ssl_key is not None:
            # the server refuses a key file others can read: its user's, mode 0600
            for name, pem in (("server.crt", ssl_cert), ("server.key", ssl_key)):
                path = self.root / name
                path.write_bytes(pem)
                path.chmod(0o600)
                self._chown(path)
            self._ssl_options = [
                "-c ssl=on",
                f"-c ssl_cert_file={self.root / 'server.crt'}",
                f"-c ssl_key_file={self.root / 'server.key'}",
            ]

    # -- commands run as the server's user ----------------------------------------

    def _run(self, *argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in argv]
        if self.os_user is not None:
            cmd = ["runuser", "-u", self.os_user, "--", *cmd]
        return subprocess.run(  # noqa: S603 - fixed binaries, our own arguments
            cmd, check=check, capture_output=True, text=True, timeout=120, cwd=self.root
        )

    def _chown(self, path: Path) -> None:
        if self.os_user is not None:
            info = pwd.getpwnam(self.os_user)
            os.chown(path, info.pw_uid, info.pw_gid)

    def _initdb(self) -> None:
        self.socketdir.mkdir()
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        for path in (self.root, self.socketdir, pwfile):
            self._chown(path)
        self._run(
            self.bindir / "initdb",
            "-D",
            self.datadir,
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        pwfile.unlink()

    def start(self) -> None:
        options = " ".join(
            [
                f"-c listen_addresses={self.host}",
                f"-p {self.port}",
                f"-c unix_socket_directories={self.socketdir}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=300",
                *self._ssl_options,
            ]
        )
        result = self._run(
            self.bindir / "pg_ctl",
            "-D",
            self.datadir,
            "-l",
            self.logfile,
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
            check=False,
        )
        if result.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {result.stderr}\n{log[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`immediate` is a crash: no shutdown checkpoint)."""
        self._run(self.bindir / "pg_ctl", "-D", self.datadir, "-m", mode, "-w", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    # -- what tests use ---------------------------------------------------------------

    def url(self, database: str = "postgres", *, with_password: bool = True) -> str:
        auth = f"{USER}:{quote(self.password, safe='')}" if with_password else USER
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL over the local socket (trust) and return its unaligned output."""
        result = self._run(
            self.bindir / "psql",
            "-h",
            self.socketdir,
            "-p",
            str(self.port),
            "-U",
            USER,
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            sql,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its name."""
        name = name or f"t_{secrets.token_hex(6)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return name


@contextlib.contextmanager
def running_postgres(*, host: str = "127.0.0.1") -> Iterator[PostgresServer]:
    server = PostgresServer(host=host)
    try:
        server.start()
        yield server
    finally:
        server.destroy()
