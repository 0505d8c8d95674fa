"""Where a run's wall time goes: a clock that attributes the time since the last mark to a phase.

The first run of a process starts its clock when this module was first imported: scripts/train.py
imports it before anything heavy, so that run's first phase ("imports and config") covers Python's
imports of torch, Lightning and Hydra and the composition of the config. Later runs of the same
process (a multirun's jobs) start theirs when they are created.
"""

from __future__ import annotations

import time

IMPORTED_AT = time.perf_counter()
_first_clock = True


class PhaseClock:
    """seconds[name] += time since the previous mark, for each mark(name)."""

    def __init__(self) -> None:
        global _first_clock
        self.last = IMPORTED_AT if _first_clock else time.perf_counter()
        _first_clock = False
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def summary(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{name} {s:.2f}" for name, s in self.seconds.items())
        return f"{total:.2f} s: {parts}"
