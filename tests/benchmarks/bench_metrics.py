"""CPU per click with metrics on vs off: bench_edge.py with a second edge, metrics off.

Run:  .venv/bin/python tests/benchmarks/bench_metrics.py [--aa] [bench_edge.py options]

Two linkedge workers run side by side in their own processes, pinned to the same CPU,
sharing the store and the certificate: `linkedge` with the default configuration
(`metrics.enabled = true`: the selector wrapper, the metered forwarder and issuer, the
2-second copy task) and `linkedge-nometrics` with `metrics.enabled = false`. Rounds
alternate the servers (bench_edge.py); the comparison is the per-round ratio of server
CPU per operation, new TLS connection + click and keep-alive click, median over rounds.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_edge as be  # noqa: E402

NOMETRICS = "linkedge-nometrics"
NOMETRICS_IP = "127.0.0.204"


SECOND_EDGE_METRICS = False  # --aa: the second edge has metrics on too (an A/A control run)


class MetricsBench(be.Bench):
    def start_stack(self) -> None:
        super().start_stack()
        config = copy.deepcopy(self.config)
        config.metrics.enabled = SECOND_EDGE_METRICS
        config.listen.https = f"{NOMETRICS_IP}:{be.free_port(NOMETRICS_IP)}"
        config.listen.http = f"{NOMETRICS_IP}:{be.free_port(NOMETRICS_IP)}"
        assert self.config.metrics.enabled
        proc, _ = self.children.start_server(
            "bench-edge-nometrics", be.edge_main, config, str(self.workdir / "edge-nm.log")
        )
        self.pids[NOMETRICS] = int(proc.pid or 0)
        self.procs[NOMETRICS] = proc
        self.ports[NOMETRICS] = int(config.listen.https.rsplit(":", 1)[1])
        self.ips[NOMETRICS] = NOMETRICS_IP


def compare(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("new_connections", "keepalive"):
        rows = results[key]
        ratios = []
        on_us, off_us = [], []
        for r in sorted({x["round"] for x in rows}):
            on = [x for x in rows if x["round"] == r and x["server"] == "linkedge"]
            off = [x for x in rows if x["round"] == r and x["server"] == NOMETRICS]
            if on and off:
                on_us.append(on[0]["server_cpu_us_per_op"])
                off_us.append(off[0]["server_cpu_us_per_op"])
                ratios.append(on_us[-1] / off_us[-1])
        out[key] = {
            "metrics_on_us_per_op_median": statistics.median(on_us),
            "metrics_off_us_per_op_median": statistics.median(off_us),
            "on_off_ratio_per_round": ratios,
            "on_off_ratio_median": statistics.median(ratios),
        }
    return out


def main(argv: list[str]) -> int:
    global SECOND_EDGE_METRICS
    if "--aa" in argv:
        argv = [a for a in argv if a != "--aa"]
        SECOND_EDGE_METRICS = True
        print("A/A control: both edges have metrics on; ratios show the run's bias and noise")
    be.SERVERS[:] = ["linkedge", NOMETRICS, "aiohttp-fwd"]
    be.Bench = MetricsBench  # type: ignore[misc]
    out = Path(tempfile.mkdtemp(prefix="linkedge-bench-metrics-")) / "results.json"
    code = be.main([*argv, "--json", str(out)])
    if code:
        return code
    comparison = compare(json.loads(out.read_text()))
    print("\nmetrics on vs off (server CPU per operation, median over rounds):")
    for kind, c in comparison.items():
        print(
            f"  {kind:16s} on {c['metrics_on_us_per_op_median']:7.1f} us   "
            f"off {c['metrics_off_us_per_op_median']:7.1f} us   "
            f"ratio {c['on_off_ratio_median']:.3f} "
            f"(per round: {', '.join(f'{x:.3f}' for x in c['on_off_ratio_per_round'])})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
