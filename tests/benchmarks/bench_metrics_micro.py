"""What metrics add to one click, measured alone (CPU time, no network, no noise from
other processes' load): the selector wrapper on a cache hit and the metered forwarder's
bookkeeping, in single-process and in multiprocess mode (PROMETHEUS_MULTIPROC_DIR).

Run:  .venv/bin/python tests/benchmarks/bench_metrics_micro.py

Compare the µs it prints with the edge's CPU per new connection + click (bench_edge.py;
~500 µs on this machine kind, REFERENCE.md section 9) and per keep-alive click (~100 µs).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
N = 200_000


def _per_call_us(fn, n: int = N) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(5):
        t0 = time.process_time()
        fn(n)
        best = min(best, time.process_time() - t0)
    return best / n * 1e6


def measure() -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from proxy.app import metrics
    from proxy.wire.clienthello import ClientHello

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cache = {"links.shop.test": ctx}
    hello = ClientHello(server_name="links.shop.test", alpn=("http/1.1",), record_bytes=512)

    async def select(h: ClientHello) -> ssl.SSLContext:  # the edge's own hit path
        hit = cache.get(h.server_name or "")
        if hit is not None:
            return hit
        raise AssertionError

    wrapped = metrics.instrument_selector(select, cache.get)

    def run(selector):  # type: ignore[no-untyped-def]
        def loop(n: int) -> None:
            for _ in range(n):
                coro = selector(hello)
                try:
                    coro.send(None)
                except StopIteration:
                    pass

        return loop

    tally = metrics._CLICKS
    monotonic = time.monotonic

    def forward_bookkeeping(n: int) -> None:  # what MeteredForwarder adds per click
        for _ in range(n):
            started = monotonic()
            tally.record(302, monotonic() - started)
        tally.flush()  # the sync task's share: once per 2 s, here once per n clicks

    def empty(n: int) -> None:
        for _ in range(n):
            pass

    base = _per_call_us(empty)
    plain = _per_call_us(run(select))
    with_metrics = _per_call_us(run(wrapped))
    return {
        "selector_hit_plain_us": plain - base,
        "selector_hit_wrapped_us": with_metrics - base,
        "selector_added_us": with_metrics - plain,
        "forwarder_added_us": _per_call_us(forward_bookkeeping) - base,
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        for key, value in measure().items():
            print(f"{key} {value:.3f}")
        return 0
    for mode in ("single-process", "multiprocess"):
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with tempfile.TemporaryDirectory() as tmp:
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = tmp
            out = subprocess.run(
                [sys.executable, __file__, "--child"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        print(f"{mode}:")
        for line in out.splitlines():
            key, value = line.split()
            print(f"  {key:28s} {float(value):6.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
