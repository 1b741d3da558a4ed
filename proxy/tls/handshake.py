"""The handshake policy: which TLS context a ClientHello gets.

The listener (`proxy/tls/listener.py`) peeks at the ClientHello and calls `HandshakePolicy.select`
before any TLS happens; this module decides, from the SNI and the ALPN offer alone:

* a name with a ready context in the cache is served from it (the warm path: a dict lookup);
* no SNI: the configured `edge.no_sni_host`'s certificate, else `handshake_failure`;
* ALPN `acme-tls/1` (RFC 8737): the CA's TLS-ALPN-01 validation, never a recipient's click;
* otherwise the name is normalised and the certificate manager finds or issues the context.

The host the handshake is for is recorded for the HTTP layer (`peers.set_tls_host`): a request
whose Host names another host gets `421` (`proxy/http/app.py`).
"""

from __future__ import annotations

import ssl

from acme_client import ACME_TLS_ALPN
from proxy.tls.certificates import CertificateManager
from proxy.tls.refusals import Refused
from proxy.wire.clienthello import HANDSHAKE_FAILURE, ClientHello
from proxy.wire.hostnames import InvalidHostname, normalize_hostname
from proxy.wire.peers import set_tls_host


class HandshakePolicy:
    def __init__(self, manager: CertificateManager, no_sni_host: str = "") -> None:
        self._manager = manager
        self._no_sni_host = no_sni_host

    async def select(self, hello: ClientHello) -> ssl.SSLContext:
        manager = self._manager
        name = hello.server_name
        if name is not None and ACME_TLS_ALPN not in hello.alpn:
            # Cache keys are normalised names, so a hit proves the SNI was one too.
            cached = manager.cached_context(name)
            if cached is not None:
                set_tls_host(name)  # Host must name it (421 otherwise, proxy/http/app.py)
                return cached
        if name is None:
            # Policy for clients without SNI (old tools, `openssl s_time`): serve the
            # configured host's certificate if there is one, otherwise refuse.
            if not self._no_sni_host:
                raise Refused("no SNI in ClientHello", HANDSHAKE_FAILURE)
            name = self._no_sni_host
        try:
            hostname = normalize_hostname(name)
        except InvalidHostname as exc:
            raise Refused(str(exc)) from None
        if ACME_TLS_ALPN in hello.alpn:
            # RFC 8737: the CA's TLS-ALPN-01 validation, never a recipient's click
            return await manager.challenge_context_for(hostname)
        context = await manager.context_for(hostname)
        set_tls_host(hostname)
        return context
