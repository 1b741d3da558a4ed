"""A worker's shutdown is bounded per step: one step that never ends (a listener, a
runner, the store) is cancelled after `CLOSE_STEP_SECONDS`, logged by name, and the
steps after it still run, so the process exits."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.app import wiring
from proxy.app.config import Config


async def test_a_step_that_never_ends_is_cancelled_and_the_rest_still_close(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(wiring, "CLOSE_STEP_SECONDS", 0.2)
    worker = wiring.EdgeWorker(Config())
    closed: list[str] = []
    cancelled = asyncio.Event()

    async def store_close() -> None:  # registered first: closes last
        closed.append("store")

    async def stuck_runner_cleanup() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def listener_close() -> None:
        closed.append("listener")

    worker._closers.extend([store_close, stuck_runner_cleanup, listener_close])
    with caplog.at_level(logging.WARNING, logger="proxy.app.wiring"):
        await asyncio.wait_for(worker.close(), 5)
    assert closed == ["listener", "store"]
    assert cancelled.is_set()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stuck_runner_cleanup did not finish" in warnings[0], warnings
