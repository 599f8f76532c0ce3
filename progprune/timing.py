"""Paired timing: a candidate model's latency speedup over a base, with a confidence
interval, from forward passes timed interleaved round by round. No Ray here.

A latency target stops on these estimates (progprune.pruning.targets). Each round times
the base and the candidate (each the fastest of a short burst of forwards), the order
alternating from round to round, so that load from anything else on the machine, and any
order effect (caches, clock boost), falls on both alike. The round's speedup is base ms / candidate ms; the estimate is the median
of the rounds' speedups and its 95% interval is the distribution-free one for a median
(binomial order statistics: no assumption about how timing noise is distributed).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

Forward = Callable[[torch.Tensor], object]  # runs one forward, returns when its result is ready

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Speedup:
    """A measured speedup (base / candidate) and its 95% interval."""

    speedup: float  # median of the rounds' base ms / candidate ms
    low: float
    high: float
    rounds: int
    base_ms: float  # medians of the rounds' times
    candidate_ms: float

    @classmethod
    def exact(cls, value: float) -> "Speedup":
        """A figure that is counted, not timed (MACs, parameters): no interval."""
        return cls(value, value, value, 0, math.nan, math.nan)


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The distribution-free interval for the median of `values`: order statistics k and
    n + 1 - k, k the largest rank with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2.
    With fewer than 6 values no such rank exists at 95%: the interval is the whole range."""
    xs = sorted(values)
    n = len(xs)
    alpha, cdf, k = (1 - confidence) / 2, 0.0, 0
    while k < n:
        nxt = cdf + math.comb(n, k) / 2 ** n  # P(B <= k) = P(B < k + 1)
        if nxt > alpha:
            break
        cdf, k = nxt, k + 1
    if k == 0:
        return xs[0], xs[-1]
    return xs[k - 1], xs[n - k]


def cuda_sync(device) -> Callable[[], None]:
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class PairedTimer:
    """Times candidates against one base forward on one input, interleaved."""

    def __init__(self, base: Forward, x: torch.Tensor, warmup: int = 3, burst: int = 3,
                 sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                 scope: Callable[[], ContextManager] = contextlib.nullcontext):
        """`scope()`: entered around every timing (e.g. the thread count to time with)."""
        self.base, self.x, self.warmup, self.burst = base, x, warmup, burst
        self.sync = sync or cuda_sync(x.device)
        self.clock, self.scope = clock, scope
        with scope():
            self._warm(base)

    def _warm(self, fn: Forward) -> None:
        for _ in range(self.warmup):
            fn(self.x)
        self.sync()

    def _time(self, fn: Forward) -> float:
        """The fastest of `burst` forwards: a forward that the scheduler interrupted (another
        process, an interrupt) is not one of the model's, and the shortest of a few back to
        back leaves it out."""
        best = math.inf
        for _ in range(self.burst):
            self.sync()
            t0 = self.clock()
            fn(self.x)
            self.sync()
            best = min(best, self.clock() - t0)
        return best * 1000.0

    def speedup(self, candidate: Forward, rounds: int) -> Speedup:
        """`rounds` interleaved rounds of base and candidate."""
        return self.samples(candidate).add(rounds)

    def samples(self, candidate: Forward) -> "Samples":
        """Rounds of `candidate` that can be added to (a test that decides as it goes)."""
        return Samples(self, candidate)


class Samples:
    """The paired rounds of one candidate so far; `add(n)` times n more and returns the
    estimate from all of them."""

    def __init__(self, timer: PairedTimer, candidate: Forward):
        self.timer, self.candidate = timer, candidate
        self.base_ms: list[float] = []
        self.cand_ms: list[float] = []

    def add(self, rounds: int) -> Speedup:
        t = self.timer
        with t.scope(), torch.no_grad():
            if not self.base_ms:
                t._warm(self.candidate)
            for _ in range(rounds):
                if len(self.base_ms) % 2:
                    c = t._time(self.candidate)
                    b = t._time(t.base)
                else:
                    b = t._time(t.base)
                    c = t._time(self.candidate)
                self.base_ms.append(b)
                self.cand_ms.append(c)
        return from_times(self.base_ms, self.cand_ms)


def from_times(base_ms: list[float], cand_ms: list[float]) -> Speedup:
    """The estimate from paired round times."""
    ratios = [b / c if c > 0 else math.inf for b, c in zip(base_ms, cand_ms)]
    low, high = median_interval(ratios)
    return Speedup(statistics.median(ratios), low, high, len(ratios),
                   statistics.median(base_ms), statistics.median(cand_ms))


def eager(model: torch.nn.Module) -> Forward:
    """The model's own forward, without autograd."""
    def forward(x):
        with torch.no_grad():
            return model(x)
    return forward
