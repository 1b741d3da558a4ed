"""Memory of idle TLS connections: RSS per connection, and RSS after they close.

Run:  PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_idle_memory.py [-n 10000]
      [--variants linkedge,stock-buffer,no-trim,trim-only,src=DIR] [--click] [--settle 60]

For each variant a fresh edge process (`proxy.app.wiring.run_worker`, real Pebble,
DNS and backend from bench_edge.py) serves one certified host. Client
processes open N TLS connections to it (full handshakes, spread over 50
loopback sources so the per-source cap is not what is measured; with --click
each also makes one request first) and hold them idle. Reported: the edge's
RSS at baseline (after the first click), with N open, per connection, and at
1, 10, 30 and 60 s (--settle) after they all closed.

Variants (monkeypatched in the edge process only, to show what each measure buys):
  linkedge      the edge as shipped (uvloop, 32 KiB TLS read buffer, malloc_trim after bursts)
  stock-buffer  asyncio's own 256 KiB TLS read buffer, trimming on
  no-trim       32 KiB buffer, no malloc_trim
  trim-only     malloc_trim at the first look that sees a burst, free lists kept (as before)
  src=DIR       another tree's `proxy` (e.g. a `git archive` of main) for a before/after,
                on CPython's own allocator (pymalloc), as trees before the launcher ran
  pymalloc      as shipped, but on pymalloc instead of the launcher's PYTHONMALLOC=malloc
  asyncio       on asyncio's loop instead of uvloop (`edge.event_loop`, the default)
BENCH_MALLOC_STATS=1 prints pymalloc's arena counts after the burst; =trace writes what
was allocated during it and is still alive (see tests/benchmarks/README.md).
Goal (issue 9): 10,000 idle TLS connections cost at most 1 GiB, and RSS returns
within 10 % of the baseline within a minute of their closing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import gc
import multiprocessing.connection
import os
import pickle
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_edge as be  # noqa: E402  (the stack and helpers of the main benchmark)

EDGE_IP = "127.0.0.211"
SOURCES = [f"127.0.2.{i}" for i in range(1, 51)]
HOST = "links.idle-bench.test"
TARGET = "edge-idle-bench.linkedge.test"


def edge_variant_main(
    config_pickle: bytes,
    variant: str,
    log_path: str,
    ready: multiprocessing.connection.Connection,
    lifeline: multiprocessing.connection.Connection,
) -> None:
    if variant.startswith("src="):  # another tree's `proxy` (imported by unpickling)
        sys.path.insert(0, variant[4:])
    config = pickle.loads(config_pickle)  # noqa: S301 (our own parent's bytes)
    from proxy.tls import connections

    if variant == "asyncio":  # the standard library's loop instead of uvloop (the default)
        config.edge.event_loop = "asyncio"
    if variant == "stock-buffer":
        from proxy.tls import listener as tls_listener

        tls_listener._CompactSSLProtocol.max_size = 256 * 1024
    elif variant == "no-trim":
        connections.MemoryTrimmer.start = lambda self: None  # type: ignore[method-assign]
    elif variant == "trim-only":  # malloc_trim as soon as a burst is seen, as before

        async def at_once(self: Any, now: int) -> int:
            return now

        connections.empty_free_lists = lambda loop: None
        connections.MemoryTrimmer._closing_stopped = at_once  # type: ignore[method-assign]
    if os.environ.get("BENCH_MALLOC_STATS"):  # SIGUSR1: Python allocator stats to a file
        dumps = [0]

        def dump(_sig: int, _frame: Any) -> None:
            dumps[0] += 1
            if os.environ.get("BENCH_MALLOC_STATS") == "trace":
                _trace(dumps[0], f"/tmp/linkedge-trace-{os.getpid()}")
            if os.environ.get("BENCH_MALLOC_STATS") == "census":
                _census(f"/tmp/linkedge-census-{os.getpid()}-{dumps[0]}.txt")
            with open(f"{log_path}.mallocstats", "w") as fh:
                saved = os.dup(2)
                os.dup2(fh.fileno(), 2)
                try:
                    sys._debugmallocstats()
                finally:
                    os.dup2(saved, 2)
                    os.close(saved)

        signal.signal(signal.SIGUSR1, dump)
    be.edge_main(config, log_path, ready, lifeline)


def _arenas() -> int:
    """pymalloc arenas allocated now (from sys._debugmallocstats, which writes to fd 2)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as fh:
        saved = os.dup(2)
        os.dup2(fh.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        fh.seek(0)
        for line in fh:
            if line.startswith("# arenas allocated current"):
                return int(line.split("=")[1].replace(",", ""))
    return -1


def _survivors(out: Any, title: str) -> None:
    import tracemalloc

    stats = sorted(tracemalloc.take_snapshot().statistics("traceback"), key=lambda st: -st.count)
    out.write(
        f"\n== {title}: {sum(st.count for st in stats)} live blocks allocated since"
        f" the baseline, {_arenas()} arenas\n"
    )
    for st in stats[:25]:
        out.write(f"{st.count} blocks {st.size} B\n")
        out.write("".join(f"  {f.filename}:{f.lineno}\n" for f in list(st.traceback)[-10:]))
        out.write("\n")


# -- BENCH_MALLOC_STATS=census: pymalloc's arenas and what holds the nearly empty ones --
# CPython 3.11 only, and needs libpython's symbol table (`nm`): reads obmalloc.c's static
# `arenas` array and each pool's header (struct arena_object, struct pool_header).

_POOL = 16 * 1024
_POOL_OVERHEAD = 48


def _libpython() -> tuple[str, int]:
    with open("/proc/self/maps") as fh:
        for line in fh:
            if "libpython3.11" in line:
                parts = line.split()
                if int(parts[2], 16) == 0:
                    return parts[5], int(parts[0].split("-")[0], 16)
    raise RuntimeError("no libpython")


def _census(out_path: str, lonely_max: int = 40) -> None:
    path, base = _libpython()
    syms: dict[str, int] = {}
    for line in subprocess.run(["nm", path], capture_output=True, text=True).stdout.splitlines():
        p = line.split()
        if len(p) == 3 and p[2] in ("arenas", "maxarenas"):
            syms[p[2]] = int(p[0], 16)
    arenas_ptr = ctypes.c_void_p.from_address(base + syms["arenas"]).value or 0
    maxarenas = ctypes.c_uint.from_address(base + syms["maxarenas"]).value
    types: dict[int, type] = {id(o): o for o in gc.get_objects() if isinstance(o, type)}
    for o in gc.get_objects():
        types.setdefault(id(type(o)), type(o))
        for r in gc.get_referents(o):
            types.setdefault(id(type(r)), type(r))
    for t in (int, str, bytes, float, tuple, type(None), bool, complex, frozenset, range, slice):
        types[id(t)] = t
    lines = []
    summary: collections.Counter[int] = collections.Counter()
    lonely_blocks: collections.Counter[tuple[int, str]] = collections.Counter()
    allocated = 0
    for i in range(maxarenas):
        ao = arenas_ptr + i * 48
        address = ctypes.c_size_t.from_address(ao).value
        if not address:
            continue
        allocated += 1
        pool_address = ctypes.c_size_t.from_address(ao + 8).value
        first = (address + _POOL - 1) & ~(_POOL - 1)
        blocks = []
        pools_used = 0
        for pool in range(first, pool_address, _POOL):
            raw = ctypes.string_at(pool, _POOL)  # one consistent copy (the walk allocates)
            count, freeblock = struct.unpack_from("<IxxxxQ", raw, 0)
            if not count:
                continue
            pools_used += 1
            szidx, nextoffset = struct.unpack_from("<II", raw, 36)
            size = (szidx + 1) * 16
            free = set()
            fb = freeblock
            while fb and pool <= fb < pool + _POOL and fb not in free:
                free.add(fb)
                fb = struct.unpack_from("<Q", raw, fb - pool)[0]
            for off in range(_POOL_OVERHEAD, min(nextoffset, _POOL), size):
                b = pool + off
                if b in free:
                    continue
                blocks.append((b, size, raw[off : off + min(size, 64)]))
        summary[min(len(blocks), 1000) // 10 * 10 if len(blocks) < 100 else 100] += 1
        if len(blocks) <= lonely_max:
            for b, size, head in blocks:
                lonely_blocks[(size, _kind(b, size, head, types))] += 1
    lines.append(f"arenas allocated: {allocated}")
    lines.append(
        "arenas by used blocks (bucket of 10; 100 = 100 or more): "
        + ", ".join(f"{k}: {v}" for k, v in sorted(summary.items()))
    )
    lines.append(f"blocks in arenas holding at most {lonely_max}, by size and what they look like:")
    for (size, kind), n in lonely_blocks.most_common(60):
        lines.append(f"{n:6d}  {size:4d} B  {kind}")
    with open(out_path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _kind(block: int, size: int, head: bytes, types: dict[int, type]) -> str:
    """A guess at what a block holds: an object's type (with or without a GC header or a
    managed-dict pre-header), else 'raw'."""
    for off, label in ((8, ""), (24, "gc "), (40, "gc+dict ")):
        if off + 8 > len(head):
            break
        tp = struct.unpack_from("<Q", head, off)[0]
        t = types.get(tp)
        if t is not None:
            extra = ""
            if t is str and not label:
                extra = " " + repr(head[48:64])
            return f"{label}{t.__module__}.{t.__qualname__}{extra}"
    return "raw " + head[:16].hex()


def _pool_of(address: int) -> tuple[int, int]:
    """(arena index, blocks in use in its pool) of a pymalloc block, from the header of
    its 16 KiB pool (CPython 3.11's obmalloc.c: `struct pool_header`)."""
    import ctypes

    pool = address & ~(16 * 1024 - 1)
    count = ctypes.c_uint.from_address(pool).value
    arena = ctypes.c_uint.from_address(pool + 32).value
    return arena, count


def _trace(dump: int, path: str) -> None:
    """Diagnostics: the first call starts tracemalloc, the second writes what was allocated
    since and is still alive, by traceback, and which pymalloc arenas hold objects
    allocated since and nothing older (what keeps them from being returned)."""
    import collections
    import gc
    import tracemalloc

    if dump == 1:
        tracemalloc.start(25)
        return
    with open(f"{path}-{dump}.part", "w") as out:
        _survivors(out, "settled")
        seen: dict[int, object] = {}
        for obj in gc.get_objects():
            seen[id(obj)] = obj
            for ref in gc.get_referents(obj):
                seen.setdefault(id(ref), ref)
        arenas: dict[int, list[str]] = collections.defaultdict(list)
        old: collections.Counter[int] = collections.Counter()
        for addr, obj in seen.items():
            try:
                size = sys.getsizeof(obj)
            except Exception:
                continue
            if size > 480 or isinstance(obj, type):  # from malloc (with any pre-header)
                continue
            tb = tracemalloc.get_object_traceback(obj)
            arena, _ = _pool_of(addr)
            if tb is None:
                old[arena] += 1
            else:
                where = " <- ".join(
                    f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(tb[-5:])
                )
                arenas[arena].append(f"{type(obj).__name__} {where}")
        pinned = {a: objs for a, objs in arenas.items() if not old[a]}
        out.write(
            f"\n{len(arenas)} arenas hold reachable objects allocated since the baseline,"
            f" {len(pinned)} of them nothing older; {len(old)} hold older objects\n"
        )
        kinds = collections.Counter(w for objs in pinned.values() for w in set(objs))
        for where, count in kinds.most_common(40):
            out.write(f"{count:5d} arenas: {where}\n")
        tracemalloc.stop()
        out.write(f"\n{_arenas()} arenas allocated (tracemalloc stopped)\n")
    os.rename(f"{path}-{dump}.part", f"{path}-{dump}.txt")  # what the bench waits for


def holder_main(
    cafile: str,
    port: int,
    sources: list[str],
    count: int,
    click: bool,
    conn: multiprocessing.connection.Connection,
) -> None:
    """Open `count` TLS connections, report, hold them until told, close them all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = be.client_context(cafile)
    held: list[ssl.SSLSocket] = []
    errors = 0
    for i in range(count):
        raw = socket.socket()
        try:
            raw.bind((sources[i % len(sources)], 0))
            raw.settimeout(be.IO_TIMEOUT)
            raw.connect((EDGE_IP, port))
            tls = ctx.wrap_socket(raw, server_hostname=HOST)
            if click:
                tls.sendall(be.request_bytes(HOST, port))
                be.read_response(tls)
            held.append(tls)
        except (OSError, ValueError):
            errors += 1
            raw.close()
    conn.send((len(held), errors))
    conn.recv()
    alive = 0
    for tls in held:
        with contextlib.suppress(OSError):
            tls.setblocking(False)
            try:
                if tls.recv(1) != b"":
                    alive += 1
            except ssl.SSLWantReadError:
                alive += 1  # still open: nothing to read
        tls.close()
    conn.send(alive)


def rss_split_mib(pid: int) -> dict[str, float]:
    """RSS by kind from /proc/<pid>/smaps: glibc's [heap], other anonymous memory
    (mmapped chunks, Python's arenas, thread stacks), file-backed (code, libraries)."""
    split = {"heap": 0, "anon": 0, "file": 0}
    kind = "anon"
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                parts = line.split()
                path = parts[5] if len(parts) > 5 else ""
                kind = "heap" if path == "[heap]" else "file" if path.startswith("/") else "anon"
            elif first == "Rss:":
                split[kind] += int(line.split()[1])
    return {k: round(v / 1024, 1) for k, v in split.items()}


async def register(config: Any, key_text: str, dns: Any) -> None:
    from certstore import open_store
    from certstore.crypto import parse_key_text

    store = await open_store(config.store.path, parse_key_text(key_text, "bench"))
    try:
        await store.add_domain(HOST, "acct-bench")
        dns.set_cname(HOST, TARGET)
    finally:
        await store.close()


def _burst(args: argparse.Namespace, port: int, pid: int) -> tuple[Any, ...]:
    """Open N connections from the holder processes, measure, close them all, watch."""
    holders = []
    per = [args.n // args.holders + (i < args.n % args.holders) for i in range(args.holders)]
    started = time.monotonic()
    for i, count in enumerate(per):
        parent, child = be.MP.Pipe()
        sources = SOURCES[i :: args.holders]
        proc = be.MP.Process(
            target=holder_main,
            args=(str(PEBBLE.root_path), port, sources, count, args.click, child),
            daemon=True,
        )
        proc.start()
        child.close()
        holders.append((proc, parent))
    opened = errors = 0
    for _, parent in holders:
        n_open, n_err = parent.recv()
        opened += n_open
        errors += n_err
    open_s = time.monotonic() - started
    time.sleep(2)
    with_open = be.rss_kib(pid)
    split_open = rss_split_mib(pid)
    for _, parent in holders:
        parent.send("close")
    alive = sum(parent.recv() for _, parent in holders)
    closed_at = time.monotonic()
    after: dict[str, int] = {}
    for mark in (1, 10, 30, args.settle):
        delay = closed_at + mark - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        after[f"{mark}s"] = be.rss_kib(pid)
    split_settled = rss_split_mib(pid)
    for proc, _ in holders:
        proc.join(10)
    return opened, errors, open_s, with_open, alive, after, split_open, split_settled


def run_variant(
    variant: str, args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack
) -> dict[str, Any]:
    from certstore import generate_key_text
    from proxy.app.config import Config

    children = be.Children()
    stack.callback(children.stop_all)
    _, backend_url = children.start_server("idle-backend", be.backend_main)
    vdir = workdir / variant.replace("/", "_")
    vdir.mkdir()
    key_text = generate_key_text()
    (vdir / "store.key").write_text(key_text)
    (vdir / "store.key").chmod(0o600)
    config = Config()
    config.listen.https = f"{EDGE_IP}:{be.free_port(EDGE_IP)}"
    config.listen.http = f"{EDGE_IP}:{PEBBLE.http_port}"
    config.listen.idle_timeout = 3600  # they must stay open while measured
    config.backend.url = backend_url
    config.edge.cname_target = TARGET
    config.acme.directory = PEBBLE.directory_url
    config.acme.ca_bundle = str(PEBBLE.ca_bundle)
    config.store.path = str(vdir / "store.db")
    config.store.key_file = str(vdir / "store.key")
    config.store.key_env = ""
    config.dns.nameservers = [DNS.nameserver]
    config.admin.listen = ""
    config.renewal.interval_seconds = 0
    config.verify.poll_seconds = 0
    # The allocator `linkedge serve` gives its processes (proxy/app/launch.py): glibc's
    # malloc; `pymalloc` and the `src=` trees (run as they shipped) on CPython's own. A
    # spawned child reads PYTHONMALLOC from the inherited environment.
    pymalloc = variant == "pymalloc" or variant.startswith("src=")
    with be.allocator_env("pymalloc" if pymalloc else "malloc"):
        edge_proc, _ = children.start_server(
            f"idle-edge-{vdir.name}",
            edge_variant_main,
            pickle.dumps(config),
            variant,
            str(vdir / "edge.log"),
        )
    pid = int(edge_proc.pid or 0)
    port = int(config.listen.https.rsplit(":", 1)[1])
    asyncio.run(register(config, key_text, DNS))
    ctx = be.client_context(str(PEBBLE.root_path))
    for _ in range(20):  # first click (issuance) and some warm-up
        assert be.one_click(ctx, EDGE_IP, port, HOST, 60)["status"] == 302
    time.sleep(1)
    baseline = be.rss_kib(pid)
    split = {"baseline": rss_split_mib(pid)}
    if os.environ.get("BENCH_MALLOC_STATS") in ("trace", "census"):
        os.kill(pid, signal.SIGUSR1)  # tracemalloc from here on
        time.sleep(1)

    bursts = [_burst(args, port, pid) for _ in range(args.bursts)]
    opened, errors, open_s, with_open, alive, after, split_open, split_settled = bursts[0]
    split["open"], split["settled"] = split_open, split_settled
    if os.environ.get("BENCH_MALLOC_STATS"):
        os.kill(pid, signal.SIGUSR1)
        time.sleep(1)
        trace = Path(f"/tmp/linkedge-trace-{pid}-2.txt")
        for _ in range(300):
            if os.environ.get("BENCH_MALLOC_STATS") != "trace" or trace.exists():
                break
            time.sleep(1)
        time.sleep(2)
        stats = Path(f"{vdir / 'edge.log'}.mallocstats").read_text()
        print("\n".join(line for line in stats.splitlines() if line.startswith("#")), flush=True)
    children.stop_all()
    return {
        "variant": variant,
        "opened": opened,
        "errors": errors,
        "still_open_at_close": alive,
        "open_seconds": round(open_s, 1),
        "baseline_mib": baseline / 1024,
        "open_mib": with_open / 1024,
        "kib_per_conn": (with_open - baseline) / max(opened, 1),
        "after_close_mib": {k: v / 1024 for k, v in after.items()},
        "rss_split_mib": split,
        "settled_vs_baseline_pct": 100.0 * (after[f"{args.settle}s"] - baseline) / baseline,
        "later_bursts_settled_mib": [b[5][f"{args.settle}s"] / 1024 for b in bursts[1:]],
        "releases": [  # the edge's gc.collect + malloc_trim runs, with how long each took
            line.split(": ", 1)[-1]
            for line in (vdir / "edge.log").read_text(errors="replace").splitlines()
            if "released memory" in line
        ],
    }


def main() -> int:
    global PEBBLE, DNS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="idle TLS connections")
    parser.add_argument("--holders", type=int, default=4, help="client processes")
    parser.add_argument("--variants", default="linkedge,stock-buffer")
    parser.add_argument("--click", action="store_true", help="one request per connection first")
    parser.add_argument("--settle", type=int, default=60, help="seconds watched after close")
    parser.add_argument("--bursts", type=int, default=1, help="open/close rounds per variant")
    args = parser.parse_args()
    from proxy.demo.dnsserver import DNSServer
    from proxy.demo.pebble import PebbleServer

    results = []
    with contextlib.ExitStack() as stack, be._workdir(False) as workdir:
        DNS = DNSServer()
        DNS.start()
        stack.callback(DNS.stop)
        DNS.set_a(TARGET, [EDGE_IP])
        PEBBLE = PebbleServer(
            workdir / "pebble", DNS.nameserver, http_port=be.free_port(), tls_port=be.free_port()
        )
        PEBBLE.start()
        stack.callback(PEBBLE.stop)
        for variant in args.variants.split(","):
            res = run_variant(variant, args, workdir, stack)
            results.append(res)
            print(res, flush=True)
    print()
    print(
        f"{args.n} idle TLS connections{' (one click each)' if args.click else ''}, "
        f"{args.holders} client processes, {len(SOURCES)} sources"
    )
    header = (
        "| variant | opened | baseline MiB | open MiB | KiB/conn | +1 s | +10 s | +30 s "
        f"| +{args.settle} s | settled vs baseline |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in results:
        a = r["after_close_mib"]
        print(
            f"| {r['variant']} | {r['opened']} | {r['baseline_mib']:.0f} | {r['open_mib']:.0f} "
            f"| {r['kib_per_conn']:.0f} | {a['1s']:.0f} | {a['10s']:.0f} | {a['30s']:.0f} "
            f"| {a[f'{args.settle}s']:.0f} | {r['settled_vs_baseline_pct']:+.1f} % |"
        )
        if r["later_bursts_settled_mib"]:
            later = ", ".join(f"{v:.0f}" for v in r["later_bursts_settled_mib"])
            print(f"  {r['variant']}: settled after later bursts of {args.n}: {later} MiB")
    return 0


PEBBLE: Any = None
DNS: Any = None

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
