"""The `linkedge` command: chooses the memory allocator, then runs the CLI.

CPython's small-object allocator (pymalloc) gives memory back to the system only in
whole 1 MiB arenas, and after a burst of connections has closed, a few objects the
worker allocates later land in the burst's nearly empty arenas and keep them: an edge
that held 10,000 idle TLS connections settled ~55 % above its baseline for good. With
glibc's malloc for those objects too (and the edge's `malloc_trim` after bursts,
`proxy/tls/connections.py`), it settles within a few per cent; the CPU per click moved
by 0-7 % in the same side-by-side run (`bench_peers.py` variant `malloc`). Both
figures: tests/benchmarks/README.md, `bench_idle_memory.py`.

PYTHONMALLOC is read when the interpreter starts, so the long-running commands execute
themselves again once with it set, before anything heavy is imported (the process id
stays: systemd and container runtimes see one process). An allocator the operator chose
(`PYTHONMALLOC=pymalloc`, for instance) is kept.
"""

from __future__ import annotations

import os
import sys

LONG_RUNNING = ("serve", "demo")  # commands whose memory after bursts matters
ALLOCATOR = "malloc"


def wants_reexec(argv: list[str], environ: dict[str, str] | os._Environ[str]) -> bool:
    # any argument, not argv[1]: global options (`-c FILE`) come before the command; a
    # short command that names "serve" as an argument only costs one exec
    return "PYTHONMALLOC" not in environ and any(arg in LONG_RUNNING for arg in argv[1:])


def main() -> int:
    if wants_reexec(sys.argv, os.environ):
        # the same command again (the console script, or `-m proxy.app.launch`), now
        # with the allocator set, which this check then lets through
        as_module = os.path.abspath(sys.argv[0]) == os.path.abspath(__file__)
        how = ["-m", "proxy.app.launch"] if as_module else [sys.argv[0]]
        os.execve(  # noqa: S606 (our own interpreter and command line, no shell)
            sys.executable,
            [sys.executable, *how, *sys.argv[1:]],
            {**os.environ, "PYTHONMALLOC": ALLOCATOR},
        )
    from proxy.app.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
