"""`linkedge serve`: a preflight, then one worker in-process or N supervised processes.

The preflight runs once in the parent so that the usual mistakes (bad key, store
unreadable, ACME server unreachable, port taken) produce one clear message and a
non-zero exit before any worker starts, and so that the ACME account is
registered once rather than raced by N workers.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import time
from types import FrameType

from .config import Config
from .edge import (
    admin_socket,
    admin_tls_context,
    listening_socket,
    make_issuer,
    open_store,
    run_worker,
)

log = logging.getLogger(__name__)
_FAST_EXIT_SECONDS = 5.0  # a worker dying this soon after start is broken, not unlucky


async def preflight(config: Config) -> None:
    for address, what in (
        (config.listen.https, "listen.https"),
        (config.listen.http, "listen.http"),
    ):
        listening_socket(address, what, reuse_port=True).close()
    if config.admin.listen:
        sock = admin_socket(config.admin.listen)
        if sock.family == socket.AF_UNIX:
            os.unlink(sock.getsockname())
        sock.close()
        if config.admin.tls_cert:
            admin_tls_context(config.admin.tls_cert, config.admin.tls_key)
    store = await open_store(config)
    try:
        issuer = make_issuer(config, store)
        try:
            await issuer.start()
        finally:
            await issuer.close()
    finally:
        await store.close()


def serve(config: Config) -> int:
    configure_logging("warning")  # retries during the preflight are not news
    asyncio.run(preflight(config))
    configure_logging(config.log_level)
    if config.workers == 1:
        asyncio.run(run_worker(config))
        return 0
    return _supervise(config)


def _worker_main(config: Config, primary: bool) -> None:
    configure_logging(config.log_level)
    try:
        asyncio.run(run_worker(config, primary=primary))
    except KeyboardInterrupt:
        pass


def _supervise(config: Config) -> int:
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def request_stop(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    procs: dict[int, tuple[multiprocessing.process.BaseProcess, float]] = {}

    def spawn(slot: int) -> None:
        # slot 0 is the primary: admin listener and webhook sender (see proxy/edge.py)
        proc = ctx.Process(
            target=_worker_main, args=(config, slot == 0), name=f"linkedge-worker-{slot}"
        )
        proc.start()
        procs[slot] = (proc, time.monotonic())
        log.info("started worker %d (pid %s)", slot, proc.pid)

    for slot in range(config.workers):
        spawn(slot)
    exit_code = 0
    while not stopping:
        time.sleep(0.2)
        for slot, (proc, started) in list(procs.items()):
            if proc.is_alive() or stopping:
                continue
            if time.monotonic() - started < _FAST_EXIT_SECONDS:
                log.error(
                    "worker %d exited with %s right after start; stopping", slot, proc.exitcode
                )
                stopping, exit_code = True, 1
                break
            log.warning("worker %d exited with %s; restarting it", slot, proc.exitcode)
            spawn(slot)
    for proc, _ in procs.values():
        if proc.is_alive():
            proc.terminate()
    for proc, _ in procs.values():
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return exit_code


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        force=True,
    )
    # asyncio reports every client that aborts a TLS handshake; those are counted instead.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
