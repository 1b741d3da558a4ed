"""Revoking a host's certificate and purging its key; removing a host.

Revocation is signed with the certificate's own key, so it works whichever account
(and whichever of the configured CAs) issued it. The key is deleted only after the
CA confirmed: a failed revocation leaves everything as it was, so it can be retried.

`remove_host` is the one implementation of "remove a host" (`DELETE /v1/hosts/{host}`
and `linkedge domains remove`): revoke, then unregister and purge; with `force`, a
revocation the CA cannot make does not stop the removal (event `removed_unrevoked`).
Both run under the host's issuance lease, so no order or renewal in another worker
can store a certificate between the revocation and the purge. Every step logs an
event (`revoked`, `purged`, `removed`) that the other workers follow.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from acme_client import CESSATION_OF_OPERATION, AcmeError
from certstore import CertStore
from proxy.hosts.events import EventKind
from proxy.hosts.leases import lease_name

LEASE_SECONDS = 120.0  # > one revocation; a killed holder frees the host
LEASE_WAIT_SECONDS = 10.0  # a renewal check holds the lease for a moment: wait that out


class Revoker(Protocol):
    """What revocation needs from ACME (a FailoverIssuer)."""

    @property
    def directory_url(self) -> str: ...

    async def revoke(
        self, chain_pem: bytes, key_pem: bytes, directory_url: str, reason: int = ...
    ) -> None: ...


class HostBusy(Exception):
    """An order or renewal for the host holds its lease; nothing was changed."""


class RevocationFailed(Exception):
    """The CA could not be reached or refused; nothing was removed."""

    def __init__(self, hostname: str, cause: Exception) -> None:
        super().__init__(f"cannot revoke the certificate of {hostname}: {cause}")
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Removal:
    hostname: str
    revoked: bool  # False: no certificate, an expired one, or not revoked (force)
    outcome: str  # what happened to the certificate, one line


@asynccontextmanager
async def host_lease(store: CertStore, hostname: str) -> AsyncIterator[None]:
    """Hold the host's issuance lease (the one every order and renewal takes)."""
    lease = lease_name(hostname)
    holder = f"revoke:{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + LEASE_WAIT_SECONDS
    while not await store.try_acquire_lease(lease, holder, LEASE_SECONDS):
        if time.monotonic() >= deadline:
            raise HostBusy(f"an order for {hostname} is in progress; try again in a minute")
        await asyncio.sleep(0.1)
    try:
        yield
    finally:
        await store.release_lease(lease, holder)


async def revoke_and_purge(
    store: CertStore,
    issuer: Revoker | None,
    hostname: str,
    clock: Callable[[], float] = time.time,
) -> tuple[bool, str]:
    """Revoke (reason cessationOfOperation) and delete the certificate: (revoked, what
    happened). An expired certificate is only purged.

    The caller holds the host's lease (`host_lease`). Raises AcmeError when the CA cannot
    be reached or refuses; nothing is deleted then.
    """
    cert = await store.get_certificate(hostname)
    if cert is None:
        return False, "no certificate"
    if cert.not_after <= clock():
        await store.delete_certificate(hostname)
        await store.record_event(
            hostname, EventKind.PURGED, f"serial {cert.serial}: expired, not revoked"
        )
        return False, f"certificate {cert.serial} had expired; key purged"
    if issuer is None:
        raise AcmeError("no ACME client in this process to revoke with")
    directory = cert.directory_url or issuer.directory_url
    await issuer.revoke(cert.chain_pem, cert.key_pem, directory, CESSATION_OF_OPERATION)
    await store.delete_certificate(hostname)
    await store.record_event(
        hostname,
        EventKind.REVOKED,
        f"serial {cert.serial} at {directory}, reason cessationOfOperation",
    )
    return True, f"certificate {cert.serial} revoked at {directory}; key purged"


async def revoke_certificate(
    store: CertStore,
    issuer: Revoker | None,
    hostname: str,
    clock: Callable[[], float] = time.time,
) -> str:
    """`linkedge certs revoke`: revoke and purge; the host stays registered."""
    async with host_lease(store, hostname):
        _revoked, outcome = await revoke_and_purge(store, issuer, hostname, clock)
    return outcome


async def remove_host(
    store: CertStore,
    issuer: Revoker | None,
    hostname: str,
    *,
    force: bool = False,
    clock: Callable[[], float] = time.time,
) -> Removal:
    """Revoke the certificate, then unregister the host and purge everything it had.

    Raises RevocationFailed (nothing removed) when the CA cannot revoke and not `force`,
    HostBusy when an order holds the host's lease.
    """
    async with host_lease(store, hostname):
        try:
            revoked, outcome = await revoke_and_purge(store, issuer, hostname, clock)
        except AcmeError as exc:
            if not force:
                raise RevocationFailed(hostname, exc) from exc
            revoked, outcome = False, f"NOT revoked ({exc}); certificate deleted anyway (forced)"
            await store.record_event(hostname, EventKind.REMOVED_UNREVOKED, str(exc))
        await store.remove_domain(hostname)
    return Removal(hostname, revoked, outcome)
