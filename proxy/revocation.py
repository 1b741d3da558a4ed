"""Revoking a host's certificate and purging its key (host removed or retired).

Revocation is signed with the certificate's own key, so it works whichever account
(and whichever of the configured CAs) issued it. The key is deleted only after the
CA confirmed: a failed revocation leaves everything as it was, so it can be retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from acme_client import CESSATION_OF_OPERATION, FailoverIssuer
from certstore import CertStore


async def revoke_and_purge(
    store: CertStore,
    issuer: FailoverIssuer,
    hostname: str,
    clock: Callable[[], float] = time.time,
) -> str:
    """Revoke (reason cessationOfOperation) and delete the certificate; says what happened.

    Raises AcmeError when the CA cannot be reached or refuses; nothing is deleted then.
    """
    cert = await store.get_certificate(hostname)
    if cert is None:
        return "no certificate"
    if cert.not_after <= clock():
        await store.delete_certificate(hostname)
        await store.record_event(hostname, "purged", f"serial {cert.serial}: expired, not revoked")
        return f"certificate {cert.serial} had expired; key purged"
    directory = cert.directory_url or issuer.directory_url
    await issuer.revoke(cert.chain_pem, cert.key_pem, directory, CESSATION_OF_OPERATION)
    await store.delete_certificate(hostname)
    await store.record_event(
        hostname, "revoked", f"serial {cert.serial} at {directory}, reason cessationOfOperation"
    )
    return f"certificate {cert.serial} revoked at {directory}; key purged"
