"""The small metrics interface: components count, one adapter exports.

A component keeps its counters in a `Counters` object (plain numeric attributes, bumped
on its own path at the cost of an attribute increment) and knows nothing of Prometheus.
The worker registers each one with its `Meter` under a source name; whatever wants the
numbers reads them there: the Prometheus adapter (`proxy/app/metrics.py`,
`WorkerMetrics.sync`), the tests, a future exporter of another kind. Counters only grow;
gauges (a number "right now") say so in their name's comment and may go down.

No imports from the rest of proxy/: every lane may use it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable


class Counters:
    """Base of a component's counters. `snapshot` reads every int/float attribute; a
    `dict[str, int]` attribute is flattened (`errors.overloaded`)."""

    __slots__ = ()

    def snapshot(self) -> dict[str, float]:
        if dataclasses.is_dataclass(self):
            names = [f.name for f in dataclasses.fields(self)]
        else:
            names = [n for cls in type(self).__mro__ for n in getattr(cls, "__slots__", ())]
        out: dict[str, float] = {}
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                out[name] = value
            elif isinstance(value, dict):
                for key, item in value.items():
                    out[f"{name}.{key}"] = item
        return out


Source = Counters | Callable[[], Counters | None]  # a callable: the component may be swapped


class Meter:
    """One worker's counters by source name (`https_listener`, `forward`, ...)."""

    def __init__(self) -> None:
        self._sources: dict[str, Source] = {}

    def register(self, name: str, source: Source) -> None:
        self._sources[name] = source

    def sources(self) -> list[str]:
        return list(self._sources)

    def read(self, name: str) -> dict[str, float]:
        """The source's counters now; {} for an unknown source or one not running."""
        source = self._sources.get(name)
        counters = source() if callable(source) else source
        return counters.snapshot() if counters is not None else {}

    def value(self, name: str, counter: str) -> float:
        return self.read(name).get(counter, 0)

    def read_all(self) -> dict[str, dict[str, float]]:
        return {name: self.read(name) for name in self._sources}


class LogBudget:
    """At most one log line per `interval` seconds; counts the ones left out (so the
    next line that goes out can say how many were suppressed)."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last = -interval
        self._suppressed = 0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            return True
        self._suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self._suppressed = self._suppressed, 0
        return count
