"""Targets in latency and parameters (progprune.pruning.targets): the search over MACs
targets and its stop rule, with injected, deterministic metrics (a latency is a function of
the model's MACs here, so that every outcome is decided in advance), and the params target
on real counts."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from progprune.config import PruneConfig
from progprune.macs import count_exact
from progprune.models import build_model, example_inputs
from progprune.pruning import ProgressiveLoop, make_pruner, prune_to_metric, prune_to_target
from progprune.pruning.targets import SETTLE, MetricSearch, _replayed
from progprune.timing import Speedup

NUM_CLASSES = 10


def _setup(name="resnet20", **settings):
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES).eval()
    ex = example_inputs()
    cfg = PruneConfig(**settings)
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    return model, ex, cfg, pruner


class FakeLatency:
    """A 'latency speedup' that is a function of the model's MACs speedup, with an interval
    of +-`spread` around it whatever the rounds; records the rounds each measurement ended
    with."""

    def __init__(self, base_macs, ex, curve, spread=0.01):
        self.base_macs, self.ex, self.curve, self.spread = base_macs, ex, curve, spread
        self.rounds: list[int] = []

    def speedup_of(self, model) -> float:
        return self.curve(self.base_macs / count_exact(model, self.ex)[0])

    def __call__(self, model):
        s, total = self.speedup_of(model), [0]
        self.rounds.append(total)

        def add(rounds):
            total[0] += rounds
            return Speedup(s, s * (1 - self.spread), s * (1 + self.spread), total[0], math.nan, math.nan)
        return add


def _search(curve, target, spread=0.01, tolerance=0.05, name="resnet20"):
    model, ex, cfg, pruner = _setup(name)
    loop = ProgressiveLoop(model, pruner, ex, cfg)
    fake = FakeLatency(loop.base_macs, ex, curve, spread)
    lines: list[str] = []
    out = prune_to_metric(loop, "latency", target, fake, tolerance, timed=True, log=lines.append)
    return model, ex, out, fake, lines


def test_a_smooth_latency_lands_in_the_window_in_few_points():
    model, ex, out, fake, _ = _search(lambda m: m ** 0.6, 2.0)
    assert out.status == "ok" and out.target_metric == "latency"
    truth = fake.speedup_of(model)
    assert out.metric_speedup == pytest.approx(truth)
    assert out.metric_low >= 2.0  # the stop rule: the interval's low end clears the target
    assert 2.0 <= truth <= 2.0 * 1.05
    assert out.achieved_speedup == out.metric_speedup
    assert out.macs_speedup == pytest.approx(truth ** (1 / 0.6), rel=1e-6)
    assert 1 <= out.metric_points <= 8
    assert (out.macs, out.params) == count_exact(model, ex)


def test_near_the_target_a_flattening_latency_is_followed_by_its_secant():
    """Latency flattens as MACs fall (overheads): near the target the move follows the local
    slope, not the chord from the dense model, so it is not short of the window (a point
    short of it, straddling the target from below, would cost another timed point)."""
    model, _, out, fake, lines = _search(lambda m: 2.2 * m / (m + 1.2), 1.5)
    assert out.status == "ok" and 1.5 <= fake.speedup_of(model) <= 1.5 * 1.05
    assert [t[0] for t in fake.rounds] == [10, 20, 10], lines  # far, near (for the fit), inside


def test_the_interval_must_clear_the_target_not_the_estimate():
    # a wide interval (+-10%): the estimate passes the target well before its low end does
    model, _, out, fake, _ = _search(lambda m: m ** 0.6, 2.0, spread=0.10, tolerance=0.30)
    assert out.status == "ok"
    assert out.metric_low >= 2.0
    assert out.metric_speedup >= 2.0 / 0.9 - 1e-9
    # rounds grow while the answer is open: 10 far below, more while the interval straddles
    ends = [t[0] for t in fake.rounds]
    assert ends[0] == 10 and max(ends) > 10 and set(ends) <= {10, 20, 40, 80, 160}


def test_an_overshooting_move_is_settled_back_and_its_history_reloads():
    # flat, then steep: the fit from the flat part asks for a large move, which overshoots
    def curve(m):
        return m ** 0.15 if m < 2.5 else 2.5 ** 0.15 * (m / 2.5) ** 3

    model, ex, out, fake, lines = _search(curve, 2.0)
    back = [line for line in lines if "stepping back" in line]
    assert 1 <= len(back) <= SETTLE, lines  # interpolation: a few candidates, not a bisection
    truth = fake.speedup_of(model)
    assert out.status == "ok" and 2.0 <= truth <= 2.0 * 1.05  # inside the window
    assert out.metric_speedup == pytest.approx(truth)
    # the step kept is before the step the overshooting move reached
    reached = max(int(line.rsplit("step ", 1)[1]) for line in lines if "MACs, step" in line and line not in back)
    assert out.steps < reached
    # the history recorded is the kept model's: replayed on a fresh model it gives its widths
    torch.manual_seed(0)
    fresh = build_model("resnet20", NUM_CLASSES).eval()
    again = _replayed(fresh, out.history, ex)
    widths = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    assert widths(again) == widths(model)
    assert (out.macs, out.params) == count_exact(model, ex)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)


def test_a_latency_that_flattens_is_unreachable_with_the_best_reached():
    model, _, out, fake, _ = _search(lambda m: min(m ** 0.6, 1.3), 2.0)
    assert out.status == "unreachable"
    assert "flattened" in out.metric_flat
    assert out.metric_speedup == pytest.approx(1.3)
    assert out.crossing_cut == "none"


def test_the_schedule_running_out_is_unreachable():
    model, ex, cfg, pruner = _setup(iterative_steps=20, max_pruning_ratio=0.3)
    loop = ProgressiveLoop(model, pruner, ex, cfg)
    fake = FakeLatency(loop.base_macs, ex, lambda m: m)
    out = prune_to_metric(loop, "latency", 50.0, fake, 0.05, timed=True)
    assert out.status == "unreachable" and loop.exhausted
    assert out.metric_speedup == pytest.approx(fake.speedup_of(model))


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_a_params_target_lands_within_the_tolerance_on_real_counts(name):
    model, ex, cfg, pruner = _setup(name, target_metric="params")
    base_params = count_exact(model, ex)[1]
    out = prune_to_target(model, pruner, ex, 2.0, cfg)
    params = count_exact(model, ex)[1]
    assert out.status == "ok" and out.target_metric == "params"
    assert out.achieved_speedup == pytest.approx(base_params / params)
    assert 2.0 <= base_params / params <= 2.0 * (1 + cfg.tolerance)
    assert out.metric_low == out.metric_high == out.achieved_speedup  # counted: no interval


def test_a_macs_target_is_the_loop_alone():
    model, ex, cfg, pruner = _setup()
    out = prune_to_target(model, pruner, ex, 2.0, cfg)
    assert out.target_metric is None and out.metric_points == 0
    assert out.achieved_speedup == out.macs_speedup == out.base_macs / out.macs


def test_a_latency_target_needs_a_timer_and_a_speedup_above_one():
    from progprune.errors import BadInput

    model, ex, cfg, pruner = _setup(target_metric="latency")
    with pytest.raises(BadInput, match="speedup must be a number > 1"):
        prune_to_target(model, pruner, ex, 1.0, cfg)
    with pytest.raises(ValueError, match="PairedTimer"):
        prune_to_target(model, pruner, ex, 2.0, cfg)


def test_a_real_latency_target_keeps_the_model_usable():
    """The real timer on this CPU: the outcome follows the stop rule (its figures are this
    machine's; the landing is measured by benchmarks/bench_latency.py, not here)."""
    from progprune.runtimes import get_runtime
    from progprune.timing import PairedTimer

    model, ex, cfg, pruner = _setup(target_metric="latency")
    base, x = copy.deepcopy(model), torch.randn(1, 3, 32, 32)

    def eager(m):
        return get_runtime("eager").prepare(m, x, "cpu", "fp32", None)
    timer = PairedTimer(eager(base), x)
    out = prune_to_target(model, pruner, ex, 1.3, cfg, timer=timer, prepare=eager)
    assert out.status == "ok"
    assert out.metric_low >= 1.3 and out.metric_points >= 1
    assert out.macs_speedup > 1.0
    assert isinstance(model, nn.Module) and model(torch.randn(1, 3, 32, 32)).shape == (1, NUM_CLASSES)


def _rounds_to_decide(speedup, spread, target=2.0, tolerance=0.05, last=False):
    """The rounds `_estimate` takes on a measurement that stays at `speedup` +- `spread`."""
    fake = FakeLatency(1, None, None, spread)
    fake.speedup_of = lambda _m: speedup
    search = MetricSearch(None, target, fake, tolerance, timed=True)
    return search._estimate(None, last=last).rounds


def test_more_rounds_only_while_the_decision_is_open():
    assert _rounds_to_decide(1.0, 0.01) == 10  # far below: the coarse rounds decide
    assert _rounds_to_decide(1.9, 0.01) == 20  # within 10% below: the fine rounds, for the fit
    # straddles the target with the estimate at or above the window's middle (2.05): up to the most
    assert _rounds_to_decide(2.06, 0.04) == 160
    # straddles it below the middle: the fine rounds, then a short move to the middle
    assert _rounds_to_decide(2.0, 0.01) == 20
    assert _rounds_to_decide(1.99, 0.02) == 20
    assert _rounds_to_decide(1.5, 0.40) == 20  # a wide interval far below: likewise
    # ... unless no move can follow (the schedule ran out): then up to the most
    assert _rounds_to_decide(2.0, 0.01, last=True) == 160
    assert _rounds_to_decide(1.99, 0.02, last=True) == 20  # below the target: unreachable
    assert _rounds_to_decide(2.05, 0.01) == 10  # clears, inside the window: done
    assert _rounds_to_decide(2.3, 0.01) == 10  # clears, plainly above the window: done
    # clears above the window with an interval reaching into it: it may be inside, so the fine rounds
    assert _rounds_to_decide(2.13, 0.03) == 20


def test_a_jump_over_the_window_keeps_the_clearing_step_nearest_the_target():
    # the latency jumps from 1.9x to 2.3x between two steps: no step lies in the window
    def curve(m):
        return 1.9 if m < 3.0 else 2.3

    model, ex, out, fake, lines = _search(lambda m: m ** 0.6 if m < 2.9 else curve(m), 2.0)
    back = [line for line in lines if "stepping back" in line]
    assert back and len(back) <= SETTLE
    truth = fake.speedup_of(model)
    assert out.status == "ok" and truth == pytest.approx(2.3)  # the overshoot is honest, not hidden
    assert out.metric_speedup == pytest.approx(2.3) and out.metric_low >= 2.0
    tried = [int(line.split("step ")[1].split(" ")[0]) for line in back]
    cleared = [s for s, line in zip(tried, back) if float(line.split()[1].rstrip("x")) >= 2.0]
    assert out.steps == min(cleared + [out.steps])


def test_settling_skips_steps_that_pruned_nothing_more():
    """With round_to, several steps can end at the same widths (the same MACs): a candidate
    at the MACs of a bracket end is the model already timed, so it is not timed again."""
    from types import SimpleNamespace

    loop = SimpleNamespace(base_macs=100, step_macs={10: 50, 11: 45, 12: 45, 13: 45, 14: 40})
    search = MetricSearch(loop, 2.0, None, 0.05, timed=True)
    low, high = Speedup(1.8, 1.78, 1.82, 20, math.nan, math.nan), Speedup(2.3, 2.28, 2.32, 20, math.nan, math.nan)
    assert search._step_for_aim(10, low, 14, high) == 11
    assert search._step_for_aim(11, low, 14, high) is None  # 12 and 13 are step 11's model
    assert search._step_for_aim(10, low, 11, high) is None


def test_a_settle_candidate_is_timed_to_a_decision():
    """No move follows a settle candidate: one straddling the target at or above it gets
    rounds up to the most (`last`), as at the end of the schedule."""
    def curve(m):
        return m ** 0.15 if m < 2.5 else 2.5 ** 0.15 * (m / 2.5) ** 3

    model, ex, cfg, pruner = _setup()
    loop = ProgressiveLoop(model, pruner, ex, cfg)
    search = MetricSearch(loop, 2.0, FakeLatency(loop.base_macs, ex, curve), 0.05, timed=True)
    calls, estimate = [], search._estimate

    def spy(m, last=False):
        calls.append((m is loop.model, last))
        return estimate(m, last)
    search._estimate = spy
    reached, _ = search.run()
    candidates = [last for on_loop, last in calls if not on_loop]
    assert reached and candidates and all(candidates)
    assert not any(last for on_loop, last in calls if on_loop)  # the schedule did not run out
