"""Paired timing (progprune.timing): the interval for a median, and the timer's rounds, on
a virtual clock so that every figure is known in advance."""
from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest
import torch

from progprune.timing import PairedTimer, Speedup, from_times, median_interval


def _below(n: int, k: int) -> Fraction:
    """P(Binomial(n, 1/2) < k), exactly."""
    return sum((Fraction(comb(n, i), 2 ** n) for i in range(k)), Fraction(0))


@pytest.mark.parametrize("n", [6, 7, 10, 20, 41, 100, 160])
def test_median_interval_is_the_binomial_one(n):
    values = list(range(n))[::-1]  # unsorted on purpose
    lo, hi = median_interval(values)
    k = lo + 1  # rank of the lower end
    assert hi == n - k  # symmetric: order statistic n + 1 - k
    assert 1 - 2 * _below(n, k) >= Fraction(95, 100)  # covers the median with >= 95%
    assert 1 - 2 * _below(n, k + 1) < Fraction(95, 100)  # and is the narrowest that does


@pytest.mark.parametrize("n", [1, 2, 5])
def test_too_few_values_give_the_whole_range(n):
    assert median_interval([3.0 + i for i in range(n)]) == (3.0, 3.0 + n - 1)


class Clock:
    """A virtual clock advanced by the forwards themselves."""

    def __init__(self):
        self.t = 0.0
        self.calls: list[str] = []

    def __call__(self):
        return self.t


def _forward(clock, name, ms, spikes=()):
    count = [0]

    def fn(_x):
        count[0] += 1
        clock.calls.append(name)
        clock.t += (ms + (50.0 if count[0] in spikes else 0.0)) / 1000

    return fn


def test_rounds_alternate_and_a_burst_drops_an_interrupted_forward():
    clock = Clock()
    base = _forward(clock, "b", 10.0, spikes={6})  # a forward the 'scheduler' interrupted
    timer = PairedTimer(base, torch.zeros(1), warmup=2, burst=3, clock=clock)
    cand = _forward(clock, "c", 4.0, spikes={5})
    clock.calls.clear()
    est = timer.speedup(cand, rounds=4)
    # warm-up of the candidate, then b-first and c-first rounds in turn, 3 forwards a side
    assert clock.calls == ["c"] * 2 + ["b"] * 3 + ["c"] * 3 + ["c"] * 3 + ["b"] * 3 + ["b"] * 3 + \
        ["c"] * 3 + ["c"] * 3 + ["b"] * 3
    assert est.speedup == pytest.approx(2.5) and est.low == pytest.approx(2.5)
    assert est.base_ms == pytest.approx(10.0) and est.candidate_ms == pytest.approx(4.0)
    assert est.rounds == 4


def test_from_times_is_the_median_of_the_rounds_ratios():
    est = from_times([10, 10, 10, 10, 10, 10, 10], [5, 4, 5, 2, 5, 5, 10])
    assert est.speedup == 2.0  # ratios 2, 2.5, 2, 5, 2, 2, 1: median 2
    assert (est.low, est.high) == (1.0, 5.0)  # n = 7: the whole range at 95%
    exact = Speedup.exact(1.5)
    assert (exact.speedup, exact.low, exact.high, exact.rounds) == (1.5, 1.5, 1.5, 0)


@pytest.mark.parametrize("ms, burst", [(10.0, 3), (30.0, 1)])
def test_the_burst_follows_the_first_models_forward(ms, burst):
    """A forward of LONG_MS or more is timed once a round (an interruption is a small share of
    it); a shorter one the fastest of 3. The base decides for every model the timer times."""
    clock = Clock()
    base = _forward(clock, "b", ms)
    timer = PairedTimer(base, torch.zeros(1), warmup=2, clock=clock)
    assert timer.timer.burst == burst
    cand = _forward(clock, "c", 50.0 - ms)  # a candidate on the other side of LONG_MS: same burst
    clock.calls.clear()
    timer.speedup(cand, rounds=2)
    assert clock.calls == ["c"] * 2 + ["b"] * burst + ["c"] * burst + ["c"] * burst + ["b"] * burst
