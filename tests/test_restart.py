"""Issue 2, scenario 5: certificates survive a restart; a bad store key stops start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from support.clicks import certify, edge_store, get_status
from support.edge import EdgeHandle, client_context, tls_handshake
from support.net import port_free

from certstore import StoreKeyError, generate_key_text
from proxy.app.wiring import EdgeWorker
from proxy.demo.dnsserver import DNSServer
from proxy.demo.pebble import PebbleServer


async def served_leaf(edge: EdgeHandle, pebble: PebbleServer, host: str) -> bytes:
    obj = await tls_handshake(edge.ip, edge.https_port, host, client_context(pebble))
    assert obj is not None
    der = obj.getpeercert(binary_form=True)
    assert der is not None
    return der


def stored_leaf(chain_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificates(chain_pem)[0].public_bytes(Encoding.DER)


async def test_certificate_comes_back_from_the_store_after_restart(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = await certify(edge, pebble, dns_server)
    leaf_before = await served_leaf(edge, pebble, host)
    await edge.stop()

    orders_before = pebble.order_count()
    edge.worker = EdgeWorker(edge.config)  # a new worker on the same config and store
    await edge.worker.start()
    assert edge.worker.manager is not None
    assert edge.worker.manager.cached_contexts == 0

    assert await get_status(edge, pebble, host, "/c/after-restart") == 302
    assert await served_leaf(edge, pebble, host) == leaf_before
    assert pebble.order_count() == orders_before
    assert edge.worker.meter.value("certificates", "orders_started") == 0
    assert edge.worker.manager.cached_contexts == 1

    async with edge_store(edge) as store:
        cert = await store.get_certificate(host)
        kinds = [e.kind for e in await store.list_events(host)]
        all_kinds = [e.kind for e in await store.list_events(None)]
    assert cert is not None and stored_leaf(cert.chain_pem) == leaf_before
    assert kinds.count("order_started") == 1 and kinds.count("issued") == 1
    # the ACME account was loaded, not registered again
    assert all_kinds.count("acme_account_registered") == 1


async def test_wrong_store_key_is_a_startup_error(
    edge: EdgeHandle, pebble: PebbleServer, dns_server: DNSServer
) -> None:
    host = await certify(edge, pebble, dns_server)
    await edge.stop()
    Path(edge.config.store.key_file).write_text(generate_key_text())

    worker = EdgeWorker(edge.config)
    try:
        with pytest.raises(StoreKeyError, match="does not match this store"):
            await worker.start()
    finally:
        await worker.close()
    assert worker.tls_listener is None  # failed before listening
    assert port_free(edge.ip, edge.https_port)

    # the right key still opens it: nothing was damaged by the failed start
    Path(edge.config.store.key_file).write_text(edge.key_text)
    await edge.start()
    assert await get_status(edge, pebble, host) == 302


async def test_missing_key_file_is_a_startup_error(edge_config: EdgeHandle) -> None:
    Path(edge_config.config.store.key_file).unlink()
    worker = EdgeWorker(edge_config.config)
    try:
        with pytest.raises(StoreKeyError, match="does not exist") as info:
            await worker.start()
    finally:
        await worker.close()
    assert edge_config.config.store.key_file in str(info.value)
    assert worker.tls_listener is None
    assert not Path(edge_config.config.store.path).exists()  # no keyless store was created


async def test_malformed_key_file_is_a_startup_error(edge_config: EdgeHandle) -> None:
    Path(edge_config.config.store.key_file).write_text("not a key\n")
    worker = EdgeWorker(edge_config.config)
    try:
        with pytest.raises(StoreKeyError, match="base64"):
            await worker.start()
    finally:
        await worker.close()
    assert not Path(edge_config.config.store.path).exists()
