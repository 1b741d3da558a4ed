"""JSON shapes of hosts, checks, certificates, events and files (API and status page)."""

from __future__ import annotations

import time
from typing import Any

from certstore import Domain, Event, HostFile, StoredCertificate
from proxy.hosts.association_files import SERVED_AT
from proxy.hosts.lifecycle import load_report
from proxy.wire.hostnames import display_hostname

_DAY = 86400.0


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def certificate_summary(
    validity: tuple[float, float, str] | None, now: float
) -> dict[str, Any] | None:
    if validity is None:
        return None
    not_before, not_after, issuer = validity
    return {
        "not_before": iso(not_before),
        "not_after": iso(not_after),
        "issuer": issuer,
        "days_left": round((not_after - now) / _DAY, 2),
        "expired": now >= not_after,
        # the https check's rule: less than a third of the lifetime left (renewal overdue)
        "expiring": now < not_after and not_after - now < (not_after - not_before) / 3,
    }


def host_json(
    domain: Domain, validity: tuple[float, float, str] | None, now: float
) -> dict[str, Any]:
    report = load_report(domain)
    return {
        "hostname": domain.hostname,
        "hostname_unicode": display_hostname(domain.hostname),
        "account": domain.account,
        "state": domain.state.value,
        "state_reason": domain.state_reason,
        "state_changed_at": iso(domain.state_changed_at),
        "created_at": iso(domain.created_at),
        "verified_at": iso(domain.verified_at),
        "last_check_at": iso(domain.last_check_at),
        "next_check_at": iso(domain.next_check_at),
        "checks": [r.to_json() for r in report.results] if report else [],
        "certificate": certificate_summary(validity, now),
    }


def event_json(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": iso(event.at),
        "hostname": event.hostname,
        "kind": event.kind,
        "detail": event.detail,
        "from_state": event.from_state,
        "to_state": event.to_state,
    }


def certificate_json(cert: StoredCertificate, now: float) -> dict[str, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    leaf = x509.load_pem_x509_certificate(cert.chain_pem)
    summary = certificate_summary((cert.not_before, cert.not_after, cert.issuer), now)
    assert summary is not None
    return {
        "hostname": cert.hostname,
        "names": list(cert.names),
        **summary,
        "serial": format(leaf.serial_number, "x"),
        "sha256_fingerprint": leaf.fingerprint(hashes.SHA256()).hex(":").upper(),
        "created_at": iso(cert.created_at),
        "chain_pem": cert.chain_pem.decode("ascii"),
    }


def host_file_json(found: HostFile) -> dict[str, Any]:
    return {
        "hostname": found.hostname,
        "kind": found.kind,
        "size": len(found.content),
        "etag": found.etag,
        "updated_at": iso(found.updated_at),
        "urls": [f"https://{found.hostname}{p}" for p, k in SERVED_AT.items() if k == found.kind],
    }
