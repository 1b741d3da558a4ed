"""Issue 12: a worker that has just issued a host's certificate keeps the context it
cached when its own `issued` and `state` (to active) events come back through the event
follower (dropping it cost a store read and a context build at the next handshake);
a certificate stored by another process still replaces it."""

from __future__ import annotations

import dataclasses

from support.clicks import edge_store, get_status, new_host
from support.edge import EdgeHandle, client_context, register, tls_handshake

from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer
from proxy.hosts.events import EventKind


async def test_own_issuance_keeps_its_context_and_anothers_replaces_it(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    await edge_config.start()
    try:
        assert edge_config.worker is not None and edge_config.worker.manager is not None
        manager = edge_config.worker.manager
        worker = edge_config.worker
        assert worker.verifier is not None
        host = new_host(edge_config)
        async with edge_store(edge_config) as store:
            # verified first, and that event followed: the click's own events are then
            # the only ones after its context is cached (a loaded follower reading the
            # verification after the issuance would drop the context, as it should)
            await register(store, dns_server, host, edge_config.target)
            await worker.verifier.verify(host, https=False, issue=False)
            await edge_config.followed(await store.last_event_id())
        assert await get_status(edge_config, pebble, host) == 302  # a real first click
        async with edge_store(edge_config) as store:
            kinds = [e.kind for e in await store.list_events(host, limit=20)]
            assert EventKind.ISSUED in kinds and EventKind.STATE in kinds, kinds
            await edge_config.followed(await store.last_event_id())
            own = manager.cached_context(host)
            assert own is not None  # still cached after following its own events
            assert not manager._own_events  # each expected event was taken once
            # another process stores a newer certificate: its event drops the context
            cert = await store.get_certificate(host)
            assert cert is not None
            newer = dataclasses.replace(cert, serial="another-process")
            await store.put_certificate(newer, event=(EventKind.RENEWED, "by another process"))
            await edge_config.followed(await store.last_event_id())
        assert manager.cached_context(host) is None
        # and the next handshake reads the newer one
        await tls_handshake(edge_config.ip, edge_config.https_port, host, client_context(pebble))
        entry = manager._contexts.entry(host, manager._clock())
        assert entry is not None and entry.serial == "another-process"
    finally:
        await edge_config.stop()


async def test_a_click_that_verifies_the_host_keeps_its_context_too(
    edge_config: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    """The first click finds the host pending: its live check verifies it (a `state`
    event of this worker's) before the order. Whenever the follower reads that event,
    before the order ends or after, the context stays, and every expected own event is
    taken exactly once (none left over to swallow a later event of another process)."""
    await edge_config.start()
    try:
        assert edge_config.worker is not None and edge_config.worker.manager is not None
        manager = edge_config.worker.manager
        host = new_host(edge_config)
        async with edge_store(edge_config) as store:
            # the registration is another process's event, followed before the click (as
            # when a customer registers first and clicks come later): read only after the
            # order, it would drop the new context, not knowing it is older
            await register(store, dns_server, host, edge_config.target)
            await edge_config.followed(await store.last_event_id())
        assert await get_status(edge_config, pebble, host) == 302  # verifies, then orders
        async with edge_store(edge_config) as store:
            states = [e.to_state for e in await store.list_events(host, limit=20)]
            assert "verified" in states and "active" in states, states
            await edge_config.followed(await store.last_event_id())
        assert manager.cached_context(host) is not None
        assert not manager._own_events
    finally:
        await edge_config.stop()
