"""The peak private memory of a process and its children, sampled: what a preparation (or any
step) really holds. File pages that a memory map touches (datasets' arrow cache, token shards)
are page cache the kernel takes back under pressure, so ru_maxrss, which counts them, makes any
reader of a large file look large. Anonymous pages are counted proportionally (Pss_Anon): a
forked worker shares its parent's pages until either writes them, and summing the processes'
RssAnon would count those pages once per process (Linux only)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def private_mb(pid: int) -> float:
    """Pss_Anon of a process in MB (0 when it is gone)."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0.0
    return int(rollup.split("Pss_Anon:")[1].split()[0]) / 1024


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ...: a pool's workers are the children of its fork server."""
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *descendants(kid)]
    return found


class PeakPrivateMemory:
    """Samples this process's and its descendants' private memory every `interval` seconds from
    construction to :meth:`stop`, which returns the peak of their sum in MB."""

    def __init__(self, interval: float = 0.005) -> None:
        self.pid, self.interval, self.peak, self.running = os.getpid(), interval, 0.0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            total = private_mb(self.pid) + sum(private_mb(c) for c in descendants(self.pid))
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak
