"""`linkedge serve`: a preflight, then one worker in-process or N supervised processes.

The preflight runs once in the parent so that the usual mistakes (bad key, store
unreadable, an ACME server whose TLS certificate is not trusted, port taken) produce
one clear message and a non-zero exit before any worker starts, and so that the ACME
account is registered once rather than raced by N workers. An ACME server that is
merely down does not stop the edge: it starts, serves the certificates it holds, and
reaches the CA later through the CA's circuit breaker (acme_client/breaker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import time
from collections.abc import Coroutine
from types import FrameType
from typing import Any

import requests

from acme_client import AcmeError
from certstore import Store
from proxy.app import logging_setup, metrics
from proxy.app.config import Config
from proxy.app.reload import ConfigSource, supervisor_reload
from proxy.app.wiring import (
    admin_socket,
    admin_tls_context,
    listening_socket,
    make_issuer,
    open_store,
    run_worker,
)

log = logging.getLogger(__name__)
_FAST_EXIT_SECONDS = 5.0  # a worker dying this soon after start is broken, not unlucky
_PREFLIGHT_CA_SECONDS = 10.0  # how long start-up waits for the CA before starting anyway


async def preflight(config: Config, *, keep_store: bool = False) -> Store | None:
    """Check what a worker needs before any starts; with `keep_store`, return the store
    it opened (still open: the caller owns it) instead of closing it."""
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
    kept = False
    try:
        issuer = make_issuer(config, store)
        try:
            await asyncio.wait_for(issuer.start(), _PREFLIGHT_CA_SECONDS)
        except (AcmeError, TimeoutError) as exc:
            if isinstance(exc.__cause__, requests.exceptions.SSLError):
                raise  # the CA's certificate is not trusted: a configuration error
            log.warning(
                "ACME server not reachable at start-up (%s); starting anyway: stored "
                "certificates are served, orders wait until the CA answers",
                exc or f"no answer within {_PREFLIGHT_CA_SECONDS:.0f} s",
            )
        finally:
            with contextlib.suppress(Exception):
                await issuer.close()
        kept = keep_store
    finally:
        if not kept:
            await store.close()
    return store if kept else None


def run_on_loop(config: Config, main: Coroutine[Any, Any, None]) -> None:
    """Run a worker on the event loop `edge.event_loop` names (asyncio's or uvloop's)."""
    if config.edge.event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
        return
    asyncio.run(main)


def serve(config: Config, source: ConfigSource | None = None) -> int:
    """Run the edge until SIGTERM/SIGINT (a graceful stop); SIGHUP reloads `source`.

    SIGHUP stays blocked until a handler exists (here, and in each worker, which
    inherits the mask), so an early one is held rather than killing the process.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    configure_logging("warning", config.log_format)  # retries during the preflight are not news
    if config.workers == 1:
        run_on_loop(config, _preflight_and_run(config, source))
        return 0
    asyncio.run(preflight(config))
    configure_logging(config.log_level, config.log_format, config)
    return _supervise(config, source)


async def _preflight_and_run(config: Config, source: ConfigSource | None) -> None:
    """One process: the preflight and the worker share a loop, and the store the
    preflight opened is the worker's (one connection, schema and key check at start
    instead of two: on a remote database each is round trips before the first click)."""
    store = await preflight(config, keep_store=True)
    assert store is not None
    configure_logging(config.log_level, config.log_format, config)
    await run_worker(config, source=source, store=store)


def _worker_main(config: Config, primary: bool, source: ConfigSource | None) -> None:
    configure_logging(config.log_level, config.log_format, config)
    try:
        run_on_loop(config, run_worker(config, primary=primary, source=source))
    except KeyboardInterrupt:
        pass


def _supervise(config: Config, source: ConfigSource | None = None) -> int:
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    reload_requested = False

    def request_stop(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def request_reload(_sig: int, _frame: FrameType | None) -> None:
        nonlocal reload_requested
        reload_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)

    metrics_dir = metrics.prepare_multiprocess(config)  # before spawning: workers inherit it
    procs: dict[int, tuple[multiprocessing.process.BaseProcess, float]] = {}

    def spawn(slot: int) -> None:
        # slot 0 is the primary: admin listener and webhook sender (see proxy/app/wiring.py)
        proc = ctx.Process(
            target=_worker_main,
            args=(config, slot == 0, source),
            name=f"linkedge-worker-{slot}",
        )
        # The worker starts with SIGHUP blocked (the mask survives fork and exec) and
        # unblocks it once its handler is installed: a reload sent meanwhile waits.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        procs[slot] = (proc, time.monotonic())
        log.info("started worker %d (pid %s)", slot, proc.pid)

    for slot in range(config.workers):
        spawn(slot)
    exit_code = 0
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    while not stopping:
        time.sleep(0.2)
        if reload_requested and not stopping:
            # Workers reload in place (nothing restarts, nothing is dropped); the file is
            # validated here first so that a refusal is one line, not one per worker.
            reload_requested = False
            if source is None:
                log.warning("SIGHUP: no configuration source to reload from; ignored")
            else:
                new = supervisor_reload(config, source)
                if new is not None:
                    config = new  # what a restarted worker starts with
                    configure_logging(config.log_level, config.log_format, config)
                    for proc, _ in procs.values():
                        if proc.is_alive() and proc.pid is not None:
                            os.kill(proc.pid, signal.SIGHUP)
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
            metrics.worker_exited(proc.pid)
            spawn(slot)
    for proc, _ in procs.values():
        if proc.is_alive():
            proc.terminate()
    # each worker drains (config.shutdown_timeout); it is killed only well after that
    deadline = time.monotonic() + config.shutdown_timeout + 10
    for proc, _ in procs.values():
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    metrics.finish_multiprocess(metrics_dir, config)
    return exit_code


def configure_logging(level: str, log_format: str = "text", config: Config | None = None) -> None:
    """Text or JSON lines on stderr, and the access log when `config` asks for one."""
    logging_setup.configure(
        level,
        log_format,
        config.access_log if config is not None else "",
        config.access_log_format if config is not None else "combined",
    )
