"""Which process holds a lease: this node's name and whether a local pid still runs.

Backend-neutral: every backend records (NODE, pid) with a lease and frees, at start,
those of this node's dead processes.
"""

from __future__ import annotations

import os

NODE = os.uname().nodename


def process_alive(pid: int) -> bool:
    """Is a process with this pid running on this machine (a zombie is not)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True  # no /proc: trust kill()
    # "pid (comm) S ...": the state follows the last ')'
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")
