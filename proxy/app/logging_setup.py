"""Log output: text for a terminal (the default) or one JSON object per line, and the access log.

Decision logs (issuance, refusal, renewal, checks, transitions) pass their facts as
`extra=` fields with the stable names in `FIELDS`; the JSON formatter emits them
next to `ts`, `level`, `logger` and `message`, so a log pipeline can filter on
`event` and `host` without parsing sentences. Nothing is logged per click at INFO;
the optional access log (Common/Combined Log Format, off by default) is the place
for that.

Secrets never reach the output: PEM private key blocks and `Bearer` credentials
are cut from every message, and secrets the process read (admin token, webhook
secret, EAB key) are registered with `redact()` and replaced wherever they appear.

`configure()` may be called again (SIGHUP): handlers are replaced, the access log
file is reopened (so log rotation needs no restart).
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.wire.peers import client_address

__all__ = [
    "ACCESS_LOGGER",
    "FIELDS",
    "AccessLogger",
    "JsonFormatter",
    "configure",
    "redact",
]

FIELDS = ("event", "host", "reason", "order_url", "duration")  # extra= names the JSON carries
ACCESS_LOGGER = "linkedge.access"
LOG_FORMATS = ("text", "json")
ACCESS_LOG_FORMATS = ("combined", "common")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

_PRIVATE_KEY = re.compile(
    r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S
)
_BEARER = re.compile(r"(Bearer\s+)\S+", re.I)
_secrets: set[str] = set()
# Off until configure() turns it on: never per click into the main log by accident.
logging.getLogger(ACCESS_LOGGER).propagate = False
logging.getLogger(ACCESS_LOGGER).setLevel(logging.CRITICAL + 1)


def redact(secret: str) -> None:
    """Never let this value appear in a log line (call with every secret the process reads)."""
    if len(secret) >= 8:  # shorter values would redact ordinary words
        _secrets.add(secret)


def scrub(text: str) -> str:
    if "PRIVATE KEY" in text:
        text = _PRIVATE_KEY.sub("[private key redacted]", text)
    if "earer" in text:
        text = _BEARER.sub(r"\1[redacted]", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return text


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, pid and the decision fields."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
            "pid": record.process,
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is None:
                continue
            if name == "duration":
                out[name] = round(float(value), 6)
            elif isinstance(value, str):
                out[name] = scrub(value)
            else:
                out[name] = value
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(
    level: str,
    log_format: str = "text",
    access_log: str = "",
    access_log_format: str = "combined",
) -> None:
    """(Re)configure the root logger and the access log of this process.

    The access log file is opened first: when it cannot be (OSError), nothing changes.
    """
    access = _access_handler(access_log)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # asyncio reports every client that aborts a TLS handshake; those are counted instead.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    _install_access_log(access, access_log_format)


def _access_handler(destination: str) -> logging.Handler | None:
    if not destination:
        return None
    handler: logging.Handler
    if destination == "-":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(destination, encoding="utf-8")  # reopened on reload
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def _configure_access_log(destination: str, fmt: str) -> None:
    _install_access_log(_access_handler(destination), fmt)


def _install_access_log(handler: logging.Handler | None, fmt: str) -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.propagate = False
    for old in logger.handlers[:]:
        logger.removeHandler(old)
        old.close()
    if handler is None:
        logger.setLevel(logging.CRITICAL + 1)  # AccessLogger.enabled is False: no work per request
        return
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    AccessLogger.combined = fmt != "common"


class AccessLogger(AbstractAccessLogger):
    """Common/Combined Log Format with the real client (PROXY header or TCP peer)."""

    combined = True

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_: float) -> None:
        client = client_address(request) if isinstance(request, web.Request) else None
        if client is None:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            client = peer[0] if isinstance(peer, tuple) and peer else "-"
        now = time.localtime()
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", now)
        line = (
            f'{client} - - [{stamp}] "{_clean(request.method)} {_clean(request.raw_path)} '
            f'HTTP/{request.version.major}.{request.version.minor}" '
            f"{response.status} {_body_bytes(request, response)}"
        )
        if self.combined:
            referer = _clean(request.headers.get("Referer", "-"))
            agent = _clean(request.headers.get("User-Agent", "-"))
            line += f' "{referer}" "{agent}"'
        self.logger.info(line)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> str:
    """%b: the body's size as announced (aiohttp's own count includes the headers); "-"
    for none and for a chunked body of unannounced size."""
    if request.method == "HEAD" or response.status in (204, 304):
        return "-"
    length = response.content_length
    return str(length) if length else "-"


def _clean(value: str) -> str:
    """Quotes, backslashes and control characters escaped: a request cannot forge a line."""
    out = []
    for ch in value:
        if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)
