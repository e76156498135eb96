"""Let the HTTP processes step back so the engine keeps the CPU (Linux; elsewhere a no-op).

Beside the engine run Serve's HTTP proxy and the ingress replica, each doing a little work
per streamed chunk. Whenever one of them takes a core, the engine's matmul threads, which
meet at a barrier after every op, stall on the other cores too: on 2 cores the HTTP path
lost about twice the CPU time it used. At a higher niceness they run in the time the engine
leaves idle instead. Not at the highest niceness, though: a nice-19 thread gets 15/1024 of a
nice-0 one's share, so when other work keeps every core busy the HTTP path starves. With two
nice-0 busy loops beside `helios serve` on 2 cores, 322-474 of 500 requests hung to their
120-s timeout at 19, none at 5 (335/1024), which costs ~5% of HTTP throughput on an idle
machine (`ingress.niceness`, default 5; bench/results/README.md, Ingress niceness).

Niceness is per thread on Linux; raising it needs no privilege (lowering it does), so the
helpers step back rather than the engine stepping forward.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def step_back(pid: int | str = "self", *, niceness: int) -> None:
    """Raise every thread of process `pid` (default: this one) to at least `niceness`."""
    tasks = PROC / str(pid) / "task"
    if not hasattr(os, "setpriority") or not tasks.is_dir():
        return
    for task in tasks.iterdir():
        try:
            tid = int(task.name)
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except (OSError, ValueError):  # a thread that just ended, or another user's process
            continue


def local_processes(title: str) -> list[int]:
    """This user's processes on this machine whose title (Ray names its workers) starts with `title`."""
    pids = []
    for entry in PROC.glob("[0-9]*"):
        try:
            if entry.stat().st_uid == os.getuid() and (entry / "cmdline").read_bytes().startswith(title.encode()):
                pids.append(int(entry.name))
        except OSError:  # a process that just ended
            continue
    return pids
