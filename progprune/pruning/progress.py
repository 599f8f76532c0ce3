"""The progress line of a prune that takes long (no Ray, no I/O beyond the `log` given)."""
from __future__ import annotations

import math
import time
from typing import Callable


class PruneProgress:
    """`on_step` of a prune that takes long: at most every EVERY_S seconds, one line
    with the steps done, the speedup reached and an estimate of the time left. The estimate
    extrapolates the time per unit of log-speedup so far (each step removes a fraction of
    what is left, so log MACs falls about evenly per step); a short prune prints nothing."""

    EVERY_S = 10.0

    def __init__(self, target: float | None, steps: int, log: Log):
        """`target`: the MACs target (None: a target in another metric; no estimate)."""
        self.log, self.steps, self.target = log, steps, target
        self.goal = math.log(target) if target else None
        self.t0 = self.last = time.perf_counter()

    def __call__(self, step: int, speedup: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.EVERY_S:
            return
        self.last = now
        if not self.goal:
            self.log(f"  step {step}/{self.steps}: {speedup:.3f}x MACs, {_duration(now - self.t0)} so far")
            return
        done = math.log(max(speedup, 1.0)) / self.goal
        left = f", about {_duration((now - self.t0) * (1 - done) / done)} left" if 0 < done < 1 else ""
        self.log(f"  step {step}/{self.steps}: {speedup:.3f}x of {self.target:g}x, "
                 f"{_duration(now - self.t0)} so far{left}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m{seconds % 60:02d}s"
