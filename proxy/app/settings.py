"""The settings each component takes, derived from the one config.

Every key is defined once, in `proxy/app/config.py`; the components (tls/, http/, hosts/,
acme_client/) take their own small settings objects and never read the config. This is
the only place that maps one onto the other, for the wiring, a reload and the CLI.
"""

from __future__ import annotations

from acme_client import AcmeSettings, BreakerSettings, LimitSettings
from proxy.app.config import Config, parse_ip_list
from proxy.hosts.checks import CheckSettings
from proxy.hosts.schedule import Schedule
from proxy.hosts.verifier import VerifierSettings
from proxy.hosts.webhooks import WebhookSettings
from proxy.http.backends import HealthSettings
from proxy.tls.accept import ProxyProtocolSettings
from proxy.tls.certificates import ManagerSettings
from proxy.tls.connections import ConnectionSettings
from proxy.tls.listener import ListenerSettings
from proxy.tls.maintenance import MaintenanceSettings


def acme(config: Config) -> AcmeSettings:
    acme = config.acme
    return AcmeSettings(
        directory_url=acme.directory,
        ca_bundle=acme.ca_bundle or None,
        contact_email=acme.email or None,
        threads=acme.threads,
        order_timeout=acme.order_timeout,
        challenges=tuple(acme.challenges),
        profile=acme.profile or None,
        eab_kid=acme.eab_kid or None,
        eab_hmac_key=acme.eab_hmac_key or None,
    )


def fallback(config: Config) -> AcmeSettings | None:
    fallback = config.fallback
    if not fallback.directory:
        return None
    return AcmeSettings(
        directory_url=fallback.directory,
        ca_bundle=fallback.ca_bundle or None,
        contact_email=fallback.email or config.acme.email or None,
        threads=config.acme.threads,
        order_timeout=config.acme.order_timeout,
        challenges=tuple(config.acme.challenges),
        profile=fallback.profile or None,
        eab_kid=fallback.eab_kid or None,
        eab_hmac_key=fallback.eab_hmac_key or None,
    )


def breaker(config: Config) -> BreakerSettings:
    return BreakerSettings(
        failure_threshold=max(config.acme.breaker_failures, 1),
        probe_seconds=config.acme.breaker_probe_seconds,
    )


def limits(config: Config) -> LimitSettings:
    limits = config.limits
    return LimitSettings(
        orders_per_window=limits.orders_per_window,
        orders_window_seconds=limits.orders_window_seconds,
        per_domain=limits.per_domain,
        per_domain_window_seconds=limits.per_domain_window_seconds,
        failed_authz_per_hour=limits.failed_authz_per_hour,
        first_backoff_seconds=config.tls.failure_backoff_seconds,
        max_backoff_seconds=limits.max_backoff_seconds,
    )


def listener(
    config: Config, proxy_protocol: ProxyProtocolSettings | None, *, max_pending: int
) -> ListenerSettings:
    return ListenerSettings(
        max_pending=max_pending,  # from the descriptor budget (tls/accept.descriptor_budget)
        hello_timeout=config.tls.hello_timeout,
        selection_timeout=config.tls.issuance_wait,
        handshake_timeout=config.tls.handshake_timeout,
        max_pending_per_source=config.tls.max_pending_per_source,
        proxy_protocol=proxy_protocol,
    )


def health(config: Config) -> HealthSettings:
    backend = config.backend
    return HealthSettings(
        path=backend.health_path,
        interval=backend.health_interval,
        timeout=backend.health_timeout,
        healthy_after=backend.healthy_after,
        unhealthy_after=backend.unhealthy_after,
    )


def manager(config: Config) -> ManagerSettings:
    return ManagerSettings(
        refusal_seconds=config.tls.refusal_cache_seconds,
        failure_backoff_seconds=config.tls.failure_backoff_seconds,
        lease_seconds=config.acme.lease_seconds,
        cache_size=config.tls.cache_size,
        revalidate_seconds=config.tls.revalidate_seconds,
    )


def maintenance(config: Config) -> MaintenanceSettings:
    return MaintenanceSettings(
        interval_seconds=config.renewal.interval_seconds,
        batch_size=config.renewal.batch_size,
        concurrency=config.renewal.concurrency,
        skip_recheck_seconds=config.renewal.skip_recheck_seconds,
        lease_seconds=config.acme.lease_seconds,
        issue_via_address=config.checks.issue_via_address,
    )


def verifier(config: Config) -> VerifierSettings:
    return VerifierSettings(
        poll_seconds=config.verify.poll_seconds,
        concurrency=config.verify.concurrency,
        lease_seconds=config.acme.order_timeout + config.checks.https_timeout + 60,
    )


def connections(config: Config, *, max_total: int) -> ConnectionSettings:
    return ConnectionSettings(
        idle_timeout=config.listen.idle_timeout,
        header_timeout=config.listen.header_timeout,
        max_total=max_total,  # from the descriptor budget
        max_per_source=config.listen.max_connections_per_source,
    )


def webhooks(config: Config, secret: str) -> WebhookSettings:
    hooks = config.webhooks
    return WebhookSettings(
        url=hooks.url,
        secret=secret,
        max_attempts=max(1, hooks.max_attempts),
        backoff_seconds=hooks.backoff_seconds,
        timeout=hooks.timeout,
        poll_seconds=config.lifecycle.sync_seconds,
    )


def checks(config: Config) -> CheckSettings:
    return CheckSettings(
        edge_target=config.edge.cname_target.rstrip(".").lower(),
        nameservers=tuple(config.dns.nameservers),
        dns_timeout=config.dns.timeout,
        caa_issuer=config.checks.caa_issuer,
        https_port=config.checks.https_port,
        ca_bundle=config.checks.ca_bundle or None,
        https_timeout=config.checks.https_timeout,
        https_addresses=parse_ip_list(config.checks.https_addresses, "checks.https_addresses"),
        issue_via_address=config.checks.issue_via_address,
    )


def schedule(config: Config) -> Schedule:
    day = 86400.0
    return Schedule(
        pending_first=config.verify.pending_first_seconds,
        pending_max=config.verify.pending_max_seconds,
        give_up=config.verify.give_up_days * day,
        active_interval=config.verify.active_interval_seconds,
        moved_grace=config.lifecycle.moved_grace_days * day,
    )
