"""The one way progprune times a model (`Timer`): every latency column of a row
(training.measure_latency_stats) and a latency target's stop rule (`PairedTimer`: a
candidate's speedup over a base, with a confidence interval) time forwards alike. No Ray here.

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
BURST = 3  # forwards a side per round, the fastest counted ...
LONG_MS = 20.0  # ... when the first model's forward is shorter than this; 1 when it is longer


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


class Timer:
    """How progprune times a forward, for the stop rule (PairedTimer) and for every latency
    column (training.measure_latency_stats) alike: each model the fastest of `burst` back-
    to-back forwards on one input, synchronised; models timed interleaved, round by round,
    the order reversed every other round.

    `burst` None: BURST, or 1 when the first model warmed up takes LONG_MS or more a forward
    (such a forward spans many scheduler slices, so one interruption is a small share of
    it, and a burst would triple the cost of timing a large model). Every model a Timer
    times gets the same burst, so their ratio compares like with like."""

    def __init__(self, x: torch.Tensor, burst: int | None = None, sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.x, self.burst = x, burst
        self.sync = sync or cuda_sync(x.device)
        self.clock = clock

    def warm(self, fn: Forward, n: int) -> None:
        fastest = math.inf
        for _ in range(n):
            self.sync()
            t0 = self.clock()
            fn(self.x)
            self.sync()
            fastest = min(fastest, (self.clock() - t0) * 1000.0)
        if self.burst is None:
            self.burst = 1 if LONG_MS <= fastest < math.inf else BURST

    def once(self, fn: Forward) -> float:
        """The fastest of `burst` forwards, in ms: a forward that the scheduler interrupted
        (another process, an interrupt) is not one of the model's, and the shortest of a few
        back to back leaves it out."""
        best = math.inf
        for _ in range(self.burst or BURST):
            self.sync()
            t0 = self.clock()
            fn(self.x)
            self.sync()
            best = min(best, self.clock() - t0)
        return best * 1000.0

    def rounds(self, fns: list[Forward], n: int, first: int = 0) -> list[list[float]]:
        """`n` rounds of every forward in `fns`, in order in even rounds and reversed in odd
        ones (`first`: the index of the first round, so that rounds added later keep
        alternating): per forward its `n` times in ms."""
        times: list[list[float]] = [[] for _ in fns]
        order = list(range(len(fns)))
        for r in range(first, first + n):
            for i in (order if r % 2 == 0 else order[::-1]):
                times[i].append(self.once(fns[i]))
        return times


class PairedTimer:
    """Times candidates against one base forward on one input, interleaved (a Timer)."""

    def __init__(self, base: Forward, x: torch.Tensor, warmup: int = 3, burst: int | None = None,
                 sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                 scope: Callable[[], ContextManager] = contextlib.nullcontext):
        """`scope()`: entered around every timing (e.g. the thread count to time with)."""
        self.base, self.warmup, self.scope = base, warmup, scope
        self.timer = Timer(x, burst, sync, clock)
        with scope():
            self.timer.warm(base, warmup)

    def speedup(self, candidate: Forward, rounds: int) -> Speedup:
        """`rounds` interleaved rounds of base and candidate."""
        return self.samples(candidate).add(rounds)

    def samples(self, candidate: Forward) -> "Samples":
        """Rounds of `candidate` that can be added to (a test that decides as it goes)."""
        return Samples(self, candidate)


class Samples:
    """The paired rounds of one candidate so far; `add(n)` times n more and returns the
    estimate from all of them."""

    def __init__(self, paired: PairedTimer, candidate: Forward):
        self.paired, self.candidate = paired, candidate
        self.base_ms: list[float] = []
        self.cand_ms: list[float] = []

    def add(self, rounds: int) -> Speedup:
        p = self.paired
        with p.scope(), torch.no_grad():
            if not self.base_ms:
                p.timer.warm(self.candidate, p.warmup)
            b, c = p.timer.rounds([p.base, self.candidate], rounds, first=len(self.base_ms))
        self.base_ms += b
        self.cand_ms += c
        return from_times(self.base_ms, self.cand_ms)


def from_times(base_ms: list[float], cand_ms: list[float]) -> Speedup:
    """The estimate from paired round times."""
    ratios = [b / c if c > 0 else math.inf for b, c in zip(base_ms, cand_ms)]
    low, high = median_interval(ratios)
    return Speedup(statistics.median(ratios), low, high, len(ratios),
                   statistics.median(base_ms), statistics.median(cand_ms))
