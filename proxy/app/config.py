"""Configuration: a TOML file, then LINKEDGE_<SECTION>_<KEY> environment overrides.

Every key has a default except the few that only the operator can know; unknown
keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from acme_client.solvers import CHALLENGE_TYPES
from proxy.wire.addresses import nameserver_address
from proxy.wire.peers import TrustedNetworks

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
ENV_PREFIX = "LINKEDGE_"
UNIX_PREFIX = "unix:"  # admin.listen on a Unix socket: "unix:/run/linkedge/admin.sock"


class ConfigError(Exception):
    """Bad configuration; the message names the key and the problem."""


@dataclass
class ListenConfig:
    https: str = "0.0.0.0:443"
    http: str = "0.0.0.0:80"
    # PROXY protocol (v1 or v2) in front of each connection, per listener; only
    # accepted from proxy_protocol_trusted, every other peer is closed
    https_proxy_protocol: bool = False
    http_proxy_protocol: bool = False
    proxy_protocol_trusted: list[str] = field(default_factory=list)  # CIDRs of the balancers
    proxy_protocol_timeout: float = 5.0  # to receive the header
    # Clients (after PROXY) whose X-Forwarded-For/Forwarded chains are kept and appended
    # to, e.g. a CDN in front of the edge; everyone else's are dropped
    forwarded_trusted: list[str] = field(default_factory=list)
    # Established connections (both listeners; HTTPS after the handshake)
    idle_timeout: float = 20.0  # waiting for a first or next request, then closed
    header_timeout: float = 10.0  # first byte of a request -> end of its headers
    max_connections: int = 0  # per worker; 0: derived from the descriptor limit
    max_connections_per_source: int = 256  # per worker; over it the oldest idle one is closed
    # the common click (bodiless GET, known host, forwarded) served by the lean click
    # protocol (proxy/http/click_protocol.py); false: every request through aiohttp's server
    lean_clicks: bool = True


@dataclass
class BackendConfig:
    url: str = ""  # shorthand for urls = [url]; set one of the two
    urls: list[str] = field(default_factory=list)  # several: round robin over healthy ones
    connect_timeout: float = 5.0
    timeout: float = 30.0
    pool_size: int = 256
    health_path: str = "/"  # GET; healthy when the answer is below 500
    health_interval: float = 5.0  # seconds between active checks of each backend
    health_timeout: float = 2.0
    healthy_after: int = 2  # consecutive passed checks to take a backend back
    unhealthy_after: int = 3  # consecutive failed checks to take it out (one refused connect does)
    body_timeout: float = 10.0  # per read of a client's request body while forwarding, then 408
    deadline: float = 60.0  # a whole forward (body, backend, response), then 504 or cut
    max_per_source: int = 64  # forwards in flight per source and worker, then 429
    lean_client: bool = False  # bodiless GETs to http backends over proxy/lean_client.py

    def backend_urls(self) -> list[str]:
        return list(self.urls) if self.urls else [self.url] if self.url else []


@dataclass
class EdgeConfig:
    cname_target: str = ""
    # Policy for ClientHellos without SNI: serve this host's certificate, or refuse if empty.
    no_sni_host: str = ""
    # the port recipients reach HTTPS on (behind a port-mapping load balancer it differs
    # from listen.https); HTTPS-upgrade redirects name it unless it is 443
    https_public_port: int = 443
    # each worker's event loop: "uvloop" (less CPU per keep-alive click, the same per new
    # connection: tests/benchmarks/README.md) or "asyncio" (the standard library's)
    event_loop: str = "uvloop"


@dataclass
class AcmeConfig:
    directory: str = LETS_ENCRYPT
    ca_bundle: str = ""  # empty: system trust store
    email: str = ""
    threads: int = 4
    order_timeout: float = 90.0
    # challenge types in order of preference; the next is tried when one fails validation
    challenges: list[str] = field(default_factory=lambda: ["http-01", "tls-alpn-01"])
    profile: str = ""  # ACME profile (e.g. "tlsserver", "shortlived"); only sent if offered
    eab_kid: str = ""  # External Account Binding, for CAs that require it
    eab_hmac_key: str = ""  # base64url, as the CA hands it out
    # per-CA circuit breaker: CA-level failures in a row (each already retried) that open it
    breaker_failures: int = 1
    breaker_probe_seconds: float = 2.0  # while open, one probe per CA this often (±25 %)
    # issuance leases are refreshed by their holder; a dead holder's lapses after this
    lease_seconds: float = 10.0


@dataclass
class FallbackConfig:
    """A second ACME CA, used when the primary fails for reasons of its own."""

    directory: str = ""  # empty: no fallback
    ca_bundle: str = ""
    email: str = ""
    profile: str = ""
    eab_kid: str = ""
    eab_hmac_key: str = ""


@dataclass
class LimitsConfig:
    orders_per_window: int = 300  # new orders per window, all hosts (Let's Encrypt: 300 / 3 h)
    orders_window_seconds: float = 3 * 3600.0
    per_domain: int = 50  # orders per registered domain (Public Suffix List) per window
    per_domain_window_seconds: float = 7 * 86400.0
    failed_authz_per_hour: int = 5  # per host, any rolling hour
    max_backoff_seconds: float = 86400.0  # cap of the per-host backoff (1 min, 10, 100, a day)


@dataclass
class RenewalConfig:
    interval_seconds: float = 60.0  # between maintenance passes per worker (jittered)
    batch_size: int = 200  # hosts visited per pass at most
    concurrency: int = 4  # renewals in flight per worker
    skip_recheck_seconds: float = 3600.0  # after a skipped renewal (CNAME moved), look again


@dataclass
class StoreConfig:
    path: str = "/var/lib/linkedge/linkedge.db"
    key_file: str = ""
    key_env: str = "LINKEDGE_STORE_KEY"
    # a remote store's click-path reads are copied here and answered from here while the
    # database is unreachable (certstore/readthrough.py); "" disables; unused for SQLite
    local_copy: str = "/var/lib/linkedge/local-copy.db"
    local_copy_max_hosts: int = 100_000
    url: str = ""  # e.g. "sqlite:///var/lib/linkedge/linkedge.db"; when set it wins over path
    # PostgreSQL (url "postgresql://..."): the password when the URL has none (the
    # variable wins when set), and the connections each process holds at most
    password_file: str = ""
    password_env: str = "LINKEDGE_STORE_PASSWORD"  # noqa: S105 (a variable name)
    pool_size: int = 5
    # PostgreSQL: each statement and pool acquire may take this long (expiry fails that
    # call only; in a busy worker it includes waiting for the event loop and the pool)
    timeout_seconds: float = 10.0
    # PostgreSQL: opening a connection may take this long (expiry: the store is unreachable)
    connect_timeout_seconds: float = 5.0

    def location(self) -> str:
        """What certstore.open_store opens: `url` when set, else `path` (SQLite)."""
        return self.url or self.path


@dataclass
class DnsConfig:
    nameservers: list[str] = field(default_factory=list)  # "ip[:port]"; empty: /etc/resolv.conf
    timeout: float = 3.0


@dataclass
class TlsConfig:
    hello_timeout: float = 10.0  # to receive a complete ClientHello
    max_pending_per_source: int = 64  # connections of one client awaiting their ClientHello
    handshake_timeout: float = 10.0  # for the TLS handshake once a certificate is chosen
    issuance_wait: float = 60.0  # how long a first handshake may wait for a new certificate
    cache_size: int = 10_000  # TLS contexts kept in memory per worker
    refusal_cache_seconds: float = 30.0  # refused names are not looked up again within this
    failure_backoff_seconds: float = 60.0  # after a failed order, handshakes fail fast this long
    pending_recheck_seconds: float = 60.0  # at most one live DNS check per pending host
    revalidate_seconds: float = 30.0  # a cached context is compared with the store this often
    session_tickets: int = 2  # TLS 1.3 tickets sent after each full handshake (0: none)


@dataclass
class AdminConfig:
    listen: str = "127.0.0.1:8081"  # admin API + status page; "" disables them
    token_file: str = ""
    token_env: str = "LINKEDGE_ADMIN_TOKEN"  # noqa: S105 (a variable name) wins over token_file when set
    tls_cert: str = ""  # PEM chain: the admin listener speaks TLS (set with tls_key)
    tls_key: str = ""
    auth_delay_seconds: float = 0.5  # wait after a wrong token, per source; doubles per failure
    auth_max_delay_seconds: float = 30.0  # cap; attempts queued further out get 429


@dataclass
class ChecksConfig:
    caa_issuer: str = "letsencrypt.org"  # the CA's CAA issuer domain (RFC 8659)
    https_port: int = 443  # the https check dials the edge's addresses on this port
    ca_bundle: str = ""  # trust store for the https check; empty: system store
    https_timeout: float = 10.0
    # IP literals the https check dials (any range); empty: what edge.cname_target resolves to,
    # public addresses only
    https_addresses: list[str] = field(default_factory=list)
    issue_via_address: bool = True  # no CNAME, only the edge's A/AAAA records: may be issued


@dataclass
class VerifyConfig:
    poll_seconds: float = 5.0  # how often each worker looks for due checks
    pending_first_seconds: float = 60.0  # first retry of a pending host; doubles each time
    pending_max_seconds: float = 3600.0  # ... up to this interval
    give_up_days: float = 7.0  # a host pending this long is failed and no longer checked
    active_interval_seconds: float = 21600.0  # re-check of verified/active hosts
    concurrency: int = 4  # checks running at once per worker


@dataclass
class LifecycleConfig:
    moved_grace_days: float = 7.0  # a moved host keeps its certificate this long, then retires
    sync_seconds: float = 1.0  # how soon other workers apply a suspension/removal


@dataclass
class WebhooksConfig:
    url: str = ""  # POST a signed JSON body on every status change; "" disables
    secret_file: str = ""
    secret_env: str = "LINKEDGE_WEBHOOK_SECRET"  # noqa: S105 (a variable name) wins over secret_file when set
    max_attempts: int = 6
    backoff_seconds: float = 2.0  # delay before the first retry; doubles per attempt
    timeout: float = 10.0


@dataclass
class MetricsConfig:
    enabled: bool = True  # /metrics on the admin listener (and metrics.listen); off: no recording
    listen: str = ""  # an extra listener for /metrics, /healthz, /readyz only; "" for none
    token_file: str = ""  # when a token is set, /metrics wants it as a bearer token
    token_env: str = "LINKEDGE_METRICS_TOKEN"  # noqa: S105 (a variable name) wins when set
    multiproc_dir: str = ""  # --workers N: where workers write their values; "" a private temp dir
    store_cache_seconds: float = 15.0  # store-derived gauges are recomputed at most this often


@dataclass
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    acme: AcmeConfig = field(default_factory=AcmeConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    renewal: RenewalConfig = field(default_factory=RenewalConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    workers: int = 1
    log_level: str = "info"
    log_format: str = "text"  # "json": one JSON object per line (ts, level, event, host, ...)
    access_log: str = ""  # "" off; "-" standard error; else a file (reopened on SIGHUP)
    access_log_format: str = "combined"  # or "common"
    shutdown_timeout: float = 30.0  # SIGTERM: seconds for requests in flight to finish


def load_config(path: str | Path | None, environ: dict[str, str] | None = None) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    config = _build(Config, data, "")
    _apply_env(config, os.environ if environ is None else environ)
    return config


def parse_address(value: str, what: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ConfigError(f"{what}: {value!r} is not host:port")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what}: port {port} out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def require_serving(config: Config) -> None:
    """Checks only `serve` needs (the CLI's store commands work without them)."""
    check_backends(config)
    check_listen(config)
    if not config.edge.cname_target:
        raise ConfigError("edge.cname_target is required (the name customers CNAME to)")
    parse_address(config.listen.https, "listen.https")
    parse_address(config.listen.http, "listen.http")
    for ns in config.dns.nameservers:
        parse_nameserver(ns)
    if config.workers < 1:
        raise ConfigError("workers must be at least 1")
    if config.store.pool_size < 1:
        raise ConfigError("store.pool_size must be at least 1")
    if config.store.timeout_seconds <= 0 or config.store.connect_timeout_seconds <= 0:
        raise ConfigError("store.timeout_seconds and store.connect_timeout_seconds must be > 0")
    if config.admin.listen:
        if config.admin.listen.startswith(UNIX_PREFIX):
            if not config.admin.listen[len(UNIX_PREFIX) :].startswith("/"):
                raise ConfigError('admin.listen: a Unix socket is "unix:/absolute/path"')
        else:
            parse_address(config.admin.listen, "admin.listen")
        if bool(config.admin.tls_cert) != bool(config.admin.tls_key):
            raise ConfigError("admin.tls_cert and admin.tls_key go together: set both or neither")
        read_secret(config.admin.token_file, config.admin.token_env, "admin token", "admin.token")
    if config.webhooks.url:
        if not config.webhooks.url.startswith(("http://", "https://")):
            raise ConfigError("webhooks.url must be an http:// or https:// URL")
        read_secret(
            config.webhooks.secret_file,
            config.webhooks.secret_env,
            "webhook secret",
            "webhooks.secret",
        )
    if not 1 <= config.checks.https_port <= 65535:
        raise ConfigError("checks.https_port must be a TCP port")
    parse_ip_list(config.checks.https_addresses, "checks.https_addresses")
    if not 1 <= config.edge.https_public_port <= 65535:
        raise ConfigError("edge.https_public_port must be a TCP port")
    check_acme(config)
    check_logging(config)


def check_logging(config: Config) -> None:
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("log_level must be debug, info, warning or error")
    if config.log_format not in ("text", "json"):
        raise ConfigError('log_format must be "text" or "json"')
    if config.access_log_format not in ("combined", "common"):
        raise ConfigError('access_log_format must be "combined" or "common"')


def check_backends(config: Config) -> None:
    backend = config.backend
    if backend.url and backend.urls:
        # Neither silently wins: an override of one would otherwise be ignored.
        raise ConfigError("set backend.url (one backend) or backend.urls (several), not both")
    urls = backend.backend_urls()
    if not urls:
        raise ConfigError("backend.url or backend.urls is required")
    key = "backend.urls" if backend.urls else "backend.url"
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{key}: {url!r} must be an http:// or https:// URL")
    if len(set(urls)) != len(urls):
        raise ConfigError("backend.urls lists a backend twice")
    if not backend.health_path.startswith("/"):
        raise ConfigError("backend.health_path must start with /")
    if backend.health_interval <= 0 or backend.health_timeout <= 0:
        raise ConfigError("backend.health_interval and backend.health_timeout must be positive")
    if backend.healthy_after < 1 or backend.unhealthy_after < 1:
        raise ConfigError("backend.healthy_after and backend.unhealthy_after must be at least 1")
    if backend.body_timeout <= 0 or backend.deadline <= 0:
        raise ConfigError("backend.body_timeout and backend.deadline must be positive")
    if backend.max_per_source < 1:
        raise ConfigError("backend.max_per_source must be at least 1")


def check_listen(config: Config) -> None:
    listen = config.listen
    for key in ("proxy_protocol_trusted", "forwarded_trusted"):
        try:
            TrustedNetworks(getattr(listen, key), f"listen.{key}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if (listen.https_proxy_protocol or listen.http_proxy_protocol) and not (
        listen.proxy_protocol_trusted
    ):
        raise ConfigError(
            "listen.proxy_protocol_trusted must name the load balancers' networks "
            "when a listener expects the PROXY protocol"
        )
    if listen.proxy_protocol_timeout <= 0:
        raise ConfigError("listen.proxy_protocol_timeout must be positive")
    if config.edge.event_loop not in ("asyncio", "uvloop"):
        raise ConfigError('edge.event_loop must be "asyncio" or "uvloop"')
    if not 0 <= config.tls.session_tickets <= 8:
        raise ConfigError("tls.session_tickets must be 0..8")
    if config.tls.max_pending_per_source < 1:
        raise ConfigError("tls.max_pending_per_source must be at least 1")
    if listen.idle_timeout <= 0 or listen.header_timeout <= 0:
        raise ConfigError("listen.idle_timeout and listen.header_timeout must be positive")
    if listen.max_connections_per_source < 1:
        raise ConfigError("listen.max_connections_per_source must be at least 1")
    if config.store.local_copy_max_hosts < 1:
        raise ConfigError("store.local_copy_max_hosts must be at least 1")


def check_acme(config: Config) -> None:
    """ACME settings every command that talks to a CA needs to be right."""
    if not config.acme.challenges:
        raise ConfigError("acme.challenges must name at least one challenge type")
    for typ in config.acme.challenges:
        if typ not in CHALLENGE_TYPES:
            raise ConfigError(
                f"acme.challenges: unknown challenge type {typ!r} "
                f"(supported: {', '.join(CHALLENGE_TYPES)})"
            )
    for section, eab in (("acme", config.acme), ("fallback", config.fallback)):
        if bool(eab.eab_kid) != bool(eab.eab_hmac_key):
            raise ConfigError(f"{section}.eab_kid and {section}.eab_hmac_key go together")
    if config.fallback.directory and config.fallback.directory == config.acme.directory:
        raise ConfigError("fallback.directory must differ from acme.directory")


MIN_SECRET_LENGTH = 16


def read_secret(file: str, env: str, what: str, key: str) -> str:
    """A secret from an environment variable (wins when set) or a file; never logged."""
    value = os.environ.get(env, "") if env else ""
    origin = f"${env}"
    if not value and file:
        try:
            value = Path(file).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} file {file}: {exc.strerror}") from None
        origin = file
    value = value.strip()
    if not value:
        raise ConfigError(
            f"no {what}: set {key}_file or ${env or key.upper().replace('.', '_')}"
            + (' (or admin.listen = "" to disable the admin API)' if key == "admin.token" else "")
        )
    if len(value) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"the {what} from {origin} is shorter than {MIN_SECRET_LENGTH} characters"
        )
    return value


def parse_ip_list(values: list[str], what: str) -> tuple[str, ...]:
    """IP literals (v4 or v6, brackets allowed), normalised; anything else is an error."""
    found: list[str] = []
    for value in values:
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(f"{what}: {value!r} is not an IP address") from None
        if str(address) not in found:
            found.append(str(address))
    return tuple(found)


def parse_nameserver(value: str) -> tuple[str, int]:
    """Validated here; `proxy/wire/addresses.nameserver_address` splits it where it is used."""
    if value.count(":") == 1 or value.startswith("["):
        return parse_address(value, "dns.nameservers")
    return nameserver_address(value)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(data[name], hint, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
        origin = get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings")
        return value
    if hint is bool:
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    if hint in (int, float):
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if number < 0:
            raise ConfigError(f"{key} must not be negative")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string")
        return value
    raise ConfigError(f"{key}: unsupported type")


def _apply_env(config: Config, environ: Any) -> None:
    hints = get_type_hints(Config)
    for section in dataclasses.fields(Config):
        sub = getattr(config, section.name)
        if not dataclasses.is_dataclass(sub):
            var = f"{ENV_PREFIX}{section.name.upper()}"
            if var in environ:
                setattr(config, section.name, _coerce(environ[var], hints[section.name], var))
            continue
        sub_hints = get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            var = f"{ENV_PREFIX}{section.name.upper()}_{f.name.upper()}"
            if var in environ:
                setattr(sub, f.name, _coerce(environ[var], sub_hints[f.name], var))
