"""SIGHUP: re-read the configuration and the admin token without dropping a connection.

What a running worker takes over at once (`LIVE_KEYS`): the backends and their
timeouts and health checks, the TLS listener's timeouts and per-source limit,
the order limits, the log level and format, the access log (its file is
reopened, so log rotation needs no restart), the shutdown deadline, and the
admin token (re-read from its file or variable: sessions made with the old
token end with it). Everything else, notably the listening addresses, the store,
`workers`, the ACME CAs and DNS, is only read at start: when such a key changed,
the reload says so in the log ("needs a restart: listen.https, ...") and keeps
running with the old value, so the running process never serves a half-applied
configuration.

A new configuration that does not load or does not pass `require_serving` (bad
TOML, unknown key, a backend URL that is not http(s), an admin token that is too
short) is refused with one log line and the old one keeps serving.

New backends get a new `Forwarder` (its own pool, its own health checks); requests
already forwarded finish on the old one, which closes when its last request is
done. Keep-alive client connections are not touched.

With `--workers N` the supervisor validates the file once (one clear line when it
is refused) and forwards SIGHUP to every worker, which reloads in place: nothing
restarts, so nothing is dropped, and every worker applies the same file.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.app import settings
from proxy.app.config import Config, ConfigError, load_config, read_secret, require_serving

if TYPE_CHECKING:
    from proxy.app.wiring import EdgeWorker

log = logging.getLogger(__name__)

# "section.key" (or a top-level key) a running worker applies on reload
LIVE_KEYS = frozenset(
    {
        "log_level",
        "log_format",
        "access_log",
        "access_log_format",
        "shutdown_timeout",
        "tls.hello_timeout",
        "tls.handshake_timeout",
        "tls.issuance_wait",
        "tls.max_pending_per_source",
        "admin.token_file",
        "admin.token_env",
    }
)
LIVE_SECTIONS = frozenset({"backend", "limits"})


@dataclass(frozen=True)
class ConfigSource:
    """Where the configuration comes from: the file, the environment, the command line."""

    path: str | None
    workers: int | None = None  # `serve --workers N` wins over the file

    def load(self) -> Config:
        """The configuration as `serve` would start with it; ConfigError when unusable."""
        config = load_config(self.path)
        if self.workers is not None:
            config.workers = self.workers
        require_serving(config)
        return config


def flatten(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
        else:
            out[f.name] = value
    return out


def _is_live(key: str) -> bool:
    return key in LIVE_KEYS or key.split(".", 1)[0] in LIVE_SECTIONS


def split_changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(changed keys applied live, changed keys that need a restart), sorted."""
    before, after = flatten(old), flatten(new)
    changed = sorted(k for k in after if before.get(k) != after[k])
    return [k for k in changed if _is_live(k)], [k for k in changed if not _is_live(k)]


def effective(old: Config, new: Config) -> Config:
    """The old configuration with the live keys taken from the new one."""
    out = copy.deepcopy(old)
    for key, value in flatten(new).items():
        if not _is_live(key):
            continue
        if "." in key:
            section, name = key.split(".", 1)
            setattr(getattr(out, section), name, copy.deepcopy(value))
        else:
            setattr(out, key, copy.deepcopy(value))
    return out


def log_restart_needed(keys: list[str]) -> None:
    if keys:
        log.warning(
            "reload: changed keys need a restart and keep their old values until then: %s",
            ", ".join(keys),
            extra={"event": "reload_restart_needed", "reason": ", ".join(keys)},
        )


async def reload_worker(worker: EdgeWorker, source: ConfigSource) -> bool:
    """Apply a re-read configuration to a running worker; False (and a log line) if refused."""
    try:
        new = source.load()
        token = None
        if worker.admin_deps is not None:
            token = read_secret(
                new.admin.token_file, new.admin.token_env, "admin token", "admin.token"
            )
    except (ConfigError, OSError) as exc:
        log.error(
            "reload refused, the running configuration stays in service: %s",
            exc,
            extra={"event": "reload_refused", "reason": str(exc)},
        )
        return False
    try:
        return await _apply(worker, new, token)
    except Exception:  # a reload never takes the worker down
        log.exception("reload failed while applying; some settings may be the old ones")
        return False


async def _apply(worker: EdgeWorker, new: Config, token: str | None) -> bool:
    from proxy.app.logging_setup import configure, redact
    from proxy.app.wiring import build_forwarder

    old = worker.config
    live, restart = split_changes(old, new)
    config = effective(old, new)
    if any(k.startswith("backend.") for k in live) and worker.forwarding is not None:
        forwarder, backends = await build_forwarder(config)
        worker.forwarding.replace(forwarder, backends, grace=max(60.0, 4 * old.backend.timeout))
        worker.backends = backends
    if worker.tls_listener is not None:
        # the listener reads its settings per connection: new connections get the new ones
        current = worker.tls_listener._settings
        worker.tls_listener._settings = settings.listener(
            config, current.proxy_protocol, max_pending=current.max_pending
        )
    if worker.manager is not None:
        worker.manager.limits._settings = settings.limits(config)
    token_changed = False
    if token is not None and worker.admin_deps is not None:
        redact(token)
        token_changed = token != worker.admin_deps.token
        worker.admin_deps.token = token
    worker.config = config
    log.info(
        "reloaded configuration%s%s",
        f": {', '.join(live)}" if live else " (no live key changed)",
        " and the admin token" if token_changed else "",
        extra={"event": "reloaded", "reason": ", ".join(live + (["admin token"] * token_changed))},
    )
    log_restart_needed(restart)
    # last, so that the lines above still appear at the old level and in the old format
    configure(config.log_level, config.log_format, config.access_log, config.access_log_format)
    return True


def supervisor_reload(config: Config, source: ConfigSource) -> Config | None:
    """The supervisor's half of SIGHUP: validate once; the new config for respawns, or None."""
    try:
        new = source.load()
    except (ConfigError, OSError) as exc:
        log.error(
            "reload refused, the running configuration stays in service: %s",
            exc,
            extra={"event": "reload_refused", "reason": str(exc)},
        )
        return None
    return effective(config, new)  # the workers log what they applied and what needs a restart
