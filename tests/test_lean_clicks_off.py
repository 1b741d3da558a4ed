"""Issue 12: the forwarding tests again with the lean click protocol off.

The suite runs with `listen.lean_clicks` on (the default): common clicks are answered
by `proxy/http/click_protocol.py`, everything else by aiohttp's server. Here every
edge started in-process has it off, so every request goes through aiohttp's server, as
with `lean_clicks = false`: test_forwarding.py, test_forward_bounds.py,
test_connection_bounds.py, test_proxy_protocol.py, test_strict_requests.py and
test_tracked_links.py run again (with their fixtures).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from proxy.app.wiring import EdgeWorker

STARTED = {"edges": 0}


@pytest.fixture(autouse=True)
def lean_clicks_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    original_start = EdgeWorker.start

    async def start(self: EdgeWorker, *args: Any, **kwargs: Any) -> None:
        self.config.listen.lean_clicks = False
        await original_start(self, *args, **kwargs)
        assert self.clicks is None
        STARTED["edges"] += 1

    monkeypatch.setattr(EdgeWorker, "start", start)
    yield


from test_connection_bounds import *  # noqa: E402, F403
from test_forward_bounds import *  # noqa: E402, F403
from test_forwarding import *  # noqa: E402, F403
from test_proxy_protocol import *  # noqa: E402, F403
from test_strict_requests import *  # noqa: E402, F403
from test_tracked_links import *  # noqa: E402, F403


def test_the_rerun_tests_ran_with_lean_clicks_off() -> None:
    # runs after the rerun tests of this module (pytest keeps definition order)
    assert STARTED["edges"] > 10
