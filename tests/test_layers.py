"""The structure shows the architecture: proxy/ is cut into lanes that depend downward.

    app -> admin -> ops -> tls, http -> hosts -> wire        (counters: anyone)

Read from the code (imports outside `if TYPE_CHECKING:`), so a new import against the
grain fails here rather than growing a cycle. And the small metrics interface.
"""

from __future__ import annotations

import ast
from pathlib import Path

from proxy.counters import Counters, Meter
from proxy.http.forward import ForwardStats
from proxy.tls.accept import ListenerStats

PROXY = Path(__file__).resolve().parent.parent / "proxy"

# lane -> the lanes it may import (besides itself and proxy.counters)
ALLOWED = {
    "wire": set(),
    "hosts": {"wire"},
    "http": {"hosts", "wire"},
    "tls": {"hosts", "wire"},
    "ops": {"tls", "http", "hosts", "wire"},
    "admin": {"ops", "tls", "http", "hosts", "wire"},
    "app": {"admin", "ops", "tls", "http", "hosts", "wire", "demo"},
    "demo": set(),
}


def _runtime_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy"):
            if node.level:
                raise AssertionError(f"{path}: relative import (say which lane it reaches)")
            if node.module == "proxy":
                found.update(f"proxy.{a.name}" for a in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("proxy"))
    return found


def test_lanes_depend_downward() -> None:
    lanes = {p.name for p in PROXY.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert lanes == set(ALLOWED), lanes ^ set(ALLOWED)
    top = {p.stem for p in PROXY.glob("*.py")} - {"__init__"}
    assert top == {"counters"}, f"every module belongs to a lane: {top - {'counters'}}"
    wrong = []
    for path in PROXY.rglob("*.py"):
        rel = path.relative_to(PROXY)
        if len(rel.parts) == 1:
            continue
        lane = rel.parts[0]
        for module in _runtime_imports(path):
            parts = module.split(".")
            if len(parts) < 2 or parts[1] in (lane, "counters"):
                continue
            if parts[1] not in ALLOWED[lane]:
                wrong.append(f"{rel}: imports {module}")
    assert not wrong, "\n".join(sorted(wrong))


def test_counters_read_through_the_meter() -> None:
    listener, forward = ListenerStats(), ForwardStats()
    listener.accepted += 2
    listener.errors["overloaded"] = 1
    forward.cancelled += 1
    swapped: list[Counters | None] = [None]
    meter = Meter()
    meter.register("https_listener", listener)
    meter.register("forward", lambda: swapped[0])
    assert meter.read("https_listener")["accepted"] == 2
    assert meter.value("https_listener", "errors.overloaded") == 1
    assert meter.read("forward") == {}  # not running (yet)
    swapped[0] = forward
    assert meter.value("forward", "cancelled") == 1
    assert set(meter.read("forward")) == {
        "per_source_limited",
        "body_timeouts",
        "deadlines",
        "cancelled",
    }
    assert meter.read_all().keys() == {"https_listener", "forward"}
