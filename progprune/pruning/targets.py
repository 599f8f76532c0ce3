"""A target speedup in latency or parameters, reached by the progressive loop through MACs
targets: the loop stays the method's (its ranking, its small steps); this decides how far
to drive it, from measurements of the metric at a few points along the way.

The search moves forward only (pruning is not undone). From the points measured so far it
fits log(metric speedup) against log(MACs speedup) (far from the aim the larger slope of
the chord from the base and the secant through the last two points, near it the secant; 1
before the first point), and drives the loop to the MACs speedup the fit predicts for the
aim, the middle of the accepted window [target, target x (1 + tolerance)]. Far from the
window a move covers 80% of the predicted way, so the search nears it from below. A timed metric is measured in few rounds far from the
target and in more while the answer is open near it; the target is reached only when the measurement's 95%
interval lies at or above it (docs/design.md, "Latency targets"). A move that lands above the
window is settled back over its steps by interpolation (regula falsi in log-log on the
MACs each step reached), a few candidates at most. The target is
unreachable when the schedule or the cap ends first, or when the metric flattens: the MACs
speedup doubled since the metric last grew by 2%.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from progprune.config import TARGET_METRICS
from progprune.errors import BadInput
from progprune.macs import count_exact
from progprune.models import logits_of, sync_attention
from progprune.pruning.loop import ProgressiveLoop, PruneOutcome, check_speedup, progressive_prune
from progprune.timing import PairedTimer, Speedup

# model -> add(rounds): its speedup in the target metric from all the rounds so far (a
# counted metric ignores rounds)
Measure = Callable[[nn.Module], Callable[[int], Speedup]]


@dataclass(frozen=True)
class Rounds:
    """How many timed rounds a measurement takes: `coarse` first; while the answer is open,
    as many again, to at least `fine` near the target and at most `most`."""

    coarse: int = 10
    fine: int = 20
    most: int = 160


FAR = 1.10  # "far from the aim": more than 10% below it
APPROACH = 0.8  # the share of the predicted way a move covers while far
MAX_JUMP = 2.0  # a move at most doubles the MACs speedup
FLAT_MACS = 2.0  # unreachable: the MACs speedup doubled since the metric last grew ...
FLAT_GAIN = 1.02  # ... by this factor
SETTLE = 4  # candidates timed at most while settling an overshooting move back into the window


@dataclass
class Point:
    step: int
    macs_speedup: float
    estimate: Speedup


class MetricSearch:
    def __init__(self, loop: ProgressiveLoop, target: float, measure: Measure, tolerance: float, *,
                 timed: bool, rounds: Rounds = Rounds(), log: Callable[[str], None] | None = None,
                 metric: str = "latency"):
        self.loop, self.target, self.measure, self.timed = loop, target, measure, timed
        self.aim = target * (1 + tolerance / 2)
        self.rounds, self.log, self.metric = rounds, log or (lambda _m: None), metric
        self.window = target * (1 + tolerance)
        self.points: list[Point] = []
        self.before: tuple[nn.Module, int] | None = None
        self.flat = ""  # why the metric is judged flat (unreachable), if it is

    def _estimate(self, model: nn.Module, last: bool = False) -> Speedup:
        """`model`'s speedup: `coarse` rounds, then, while the answer is open, as many again
        (up to `most`); see `_open`. `last`: no move can follow (the schedule has run out)."""
        add = self.measure(model)
        est = add(self.rounds.coarse)
        if not self.timed:
            return est
        while est.rounds < self.rounds.most and self._open(est, last):
            est = add(min(est.rounds, self.rounds.most - est.rounds))
        return est

    def _open(self, est: Speedup, last: bool = False) -> bool:
        """Whether more rounds would change the decision: with fewer than `fine` rounds, the
        interval straddles the target or the estimate is within 10% below it (the fit needs
        it there), or it clears the target above the window with an interval that reaches
        into the window (it may be inside: to settle back or not). After that, up to `most`,
        the interval straddles the target with the estimate at or above the aim (the
        window's middle), or, when no move can follow (`last`), at or above the target. An
        estimate below the aim is moved on from: a short move to the aim costs fewer rounds
        than proving that a point at the window's edge clears it (or that one below it does
        not)."""
        if not self._clears(est):
            if est.rounds < self.rounds.fine:
                return est.high >= self.target or est.speedup * FAR >= self.target
            return est.high >= self.target and est.speedup >= (self.target if last else self.aim)
        return est.speedup > self.window >= est.low and est.rounds < self.rounds.fine

    def _clears(self, est: Speedup) -> bool:
        """The stop rule: the 95% interval's lower end at or above the target (a counted
        metric: the figure itself)."""
        return (est.low if self.timed else est.speedup) >= self.target

    def _show(self, est: Speedup, where: str) -> None:
        interval = f" [{est.low:.3f}, {est.high:.3f}] ({est.rounds} rounds)" if self.timed else ""
        self.log(f"  {self.metric} {est.speedup:.3f}x{interval} {where}")

    def _record(self) -> Speedup:
        est = self._estimate(self.loop.model, last=self.loop.exhausted)
        p = Point(self.loop.pruner.current_step, self.loop.base_macs / self.loop.macs, est)
        self.points.append(p)
        self._show(est, f"at {p.macs_speedup:.3f}x MACs, step {p.step}")
        return est

    def _slope(self, near: bool) -> float:
        """d log(metric) / d log(MACs) from the chord from the base and the secant through the
        last two points (when they lie at least 10% apart in MACs); 1 before the first point.
        Far from the aim the larger of the two, so that a move errs short; near it (`near`)
        the secant: latency flattens as MACs fall, so the chord overstates the local slope
        and a move short of the window would cost another timed point, while a move past it
        is settled back over its steps (a candidate or two)."""
        if not self.points:
            return 1.0
        pts = [(0.0, 0.0)] + [(math.log(p.macs_speedup), math.log(max(p.estimate.speedup, 1e-9)))
                              for p in self.points]
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        slope = y1 / x1 if x1 > 1e-6 else 1.0
        if x1 - x0 >= math.log(1.1):
            secant = (y1 - y0) / (x1 - x0)
            slope = secant if near else max(slope, secant)
        return min(max(slope, 0.1), 2.0)

    def _next_macs_speedup(self, est: Speedup) -> float:
        m = self.loop.base_macs / self.loop.macs
        need = self.aim / max(est.speedup, 1e-9)
        near = need <= FAR
        share = 1.0 if near else APPROACH
        nxt = m * math.exp(share * math.log(max(need, 1.0)) / self._slope(near))
        least = m * (1 + 1e-3)  # at least a step's worth
        return min(max(nxt, least), m * MAX_JUMP)

    def _flattened(self) -> bool:
        best = None  # the point where the metric last grew by FLAT_GAIN
        for p in self.points:
            if best is None or p.estimate.speedup >= best.estimate.speedup * FLAT_GAIN:
                best = p
        now = self.points[-1]
        if best is not None and now.macs_speedup >= best.macs_speedup * FLAT_MACS:
            self.flat = (f"the {self.metric} speedup flattened: {best.estimate.speedup:.3f}x at "
                         f"{best.macs_speedup:.3f}x MACs, {now.estimate.speedup:.3f}x at {now.macs_speedup:.3f}x")
            return True
        return False

    def run(self) -> tuple[bool, Speedup]:
        """Drive the loop until the target is reached; (reached, the last estimate)."""
        est, loop = Speedup.exact(1.0), self.loop
        while True:
            if self._clears(est):
                if est.speedup > self.window and self.before is not None:
                    est = self._settle(est)
                return True, est
            if loop.exhausted or (self.points and self._flattened()):
                return False, est
            # the model before the move: where a move that overshoots is settled back from
            self.before = (copy.deepcopy(loop.model), loop.pruner.current_step,
                           self.points[-1].estimate if self.points else Speedup.exact(1.0))
            loop.run_to(loop.base_macs / self._next_macs_speedup(est))
            est = self._record()

    def _settle(self, est: Speedup) -> Speedup:
        """The last move overshot the window: search its steps for one whose measurement
        clears the target inside the window. Each candidate is the prefix of the recorded
        history up to a step, replayed on the model before the move; the step is the one
        whose MACs the line through the bracket (log metric against log MACs, the last
        candidate below the target and the last above the window) puts at the aim (regula
        falsi). The first candidate inside the window is kept; after SETTLE candidates, the
        one that cleared nearest the target (measurements are noisy: not the last one
        timed), or the overshoot itself if none cleared nearer."""
        loop = self.loop
        before, lo, lo_est = self.before
        hi, history = loop.pruner.current_step, loop.pruner.pruning_history()
        start, hi_est, best = loop.marks[lo], est, None  # best: (step, model, estimate) nearest the target
        for _ in range(SETTLE):
            step = self._step_for_aim(lo, lo_est, hi, hi_est)
            if step is None:
                break
            try:
                cand = _replayed(before, history[start: loop.marks[step]], loop.example_inputs)
            # broad on purpose: a history Torch-Pruning cannot replay keeps the overshoot
            except Exception as e:  # noqa: BLE001
                self.log(f"  cannot step back ({type(e).__name__}: {e}); keeping step {loop.pruner.current_step}")
                break
            e = self._estimate(cand, last=True)  # no move follows a candidate: settle it here
            self._show(e, f"at {self._macs_x(step):.3f}x MACs, step {step} (stepping back)")
            if not self._clears(e):
                lo, lo_est = step, e
                continue
            hi, hi_est = step, e
            if best is None or e.speedup <= best[2].speedup:  # a tie: the earlier step (less pruned)
                best = (step, cand, e)
            if e.speedup <= self.window:
                break
        if best is None or best[2].speedup > est.speedup:
            return est  # nothing nearer the target than the overshoot itself
        loop.keep(best[0], best[1])
        return best[2]

    def _step_for_aim(self, lo: int, lo_est: Speedup, hi: int, hi_est: Speedup) -> int | None:
        """The step strictly between `lo` and `hi` whose MACs speedup is nearest the one where
        the line through (log MACs speedup, log metric speedup) at lo and hi reaches the aim
        (the middle of the bracket when the line does not rise); None if no step lies between.
        A step at the MACs of `lo` or `hi` is left out: it pruned nothing more (a round_to
        multiple not yet crossed), so it is the model already timed."""
        macs = self.loop.step_macs
        ends = {macs.get(lo), macs.get(hi)}
        inner = [s for s in range(lo + 1, hi) if s in macs and macs[s] not in ends]
        if not inner:
            return None
        x0, x1 = (math.log(self._macs_x(s)) for s in (lo, hi))
        y0, y1 = (math.log(max(e.speedup, 1e-9)) for e in (lo_est, hi_est))
        if y1 - y0 > 1e-9:
            x = x0 + (math.log(self.aim) - y0) * (x1 - x0) / (y1 - y0)
        else:
            x = (x0 + x1) / 2
        return min(inner, key=lambda s: abs(math.log(self._macs_x(s)) - x))

    def _macs_x(self, step: int) -> float:
        """The MACs speedup the loop reached at `step`."""
        return self.loop.base_macs / self.loop.step_macs[step]

    def best(self) -> Speedup:
        return max((p.estimate for p in self.points), key=lambda e: e.speedup, default=Speedup.exact(1.0))


@torch.enable_grad()  # DepGraph traces and prunes with autograd; callers may sit in no_grad()
def replay_history(model: nn.Module, history: list, example_inputs) -> None:
    """Prune `model` in place as `history` (Torch-Pruning's records, as PruneOutcome.history
    and artifacts keep them) says, with head counts following the widths."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, output_transform=logits_of)
    dg.load_pruning_history([(n, bool(o), list(i)) for n, o, i in history])
    sync_attention(model)


def _replayed(model: nn.Module, history: list, example_inputs) -> nn.Module:
    """A copy of `model` with `history` pruned on it."""
    model = copy.deepcopy(model)
    replay_history(model, history, example_inputs)
    return model.eval()


def prune_to_metric(loop: ProgressiveLoop, metric: str, target: float, measure: Measure, tolerance: float,
                    *, timed: bool, rounds: Rounds = Rounds(), log=None) -> PruneOutcome:
    """Prune until the model's speedup in `metric` (`measure`) reaches `target`."""
    search = MetricSearch(loop, target, measure, tolerance, timed=timed, rounds=rounds, log=log, metric=metric)
    reached, est = search.run()
    _, params = loop.finish(resume=False)
    shown = est if reached else search.best()
    return loop.outcome(params, target, reached, target_metric=metric, metric_speedup=shown.speedup,
                        metric_low=shown.low, metric_high=shown.high, metric_points=len(search.points),
                        metric_flat=search.flat)


def prune_to_target(model, pruner, example_inputs, target: float, settings, *, timer: PairedTimer | None = None,
                    prepare: Callable | None = None, calib=None, on_step=None, log=None) -> PruneOutcome:
    """Prune `model` in place until its speedup in `settings.target_metric` reaches
    `target`: MACs (the progressive loop alone), parameters (counted after each move) or
    latency (`timer` times `prepare(model)` against its base, interleaved)."""
    metric = getattr(settings, "target_metric", "macs")
    if metric == "macs":
        return progressive_prune(model, pruner, example_inputs, target, settings, calib=calib, on_step=on_step)
    check_speedup(target)
    loop = ProgressiveLoop(model, pruner, example_inputs, settings, calib=calib, on_step=on_step)
    if metric == "params":
        def measure(m):
            exact = Speedup.exact(loop.base_params / count_exact(m, example_inputs)[1])
            return lambda _rounds: exact
        return prune_to_metric(loop, metric, target, measure, settings.tolerance, timed=False, log=log)
    if metric != "latency":
        raise BadInput(f"target_metric must be one of {', '.join(TARGET_METRICS)}, got {metric!r}")
    if timer is None or prepare is None:
        raise ValueError("a latency target needs a PairedTimer of the base model and the runtime's prepare")
    return prune_to_metric(loop, metric, target, lambda m: timer.samples(prepare(m)).add,
                           settings.latency_tolerance, timed=True, log=log)


def why_unreachable(o: PruneOutcome, p, target: float) -> str:
    """Why `target` was not reached, in terms of what the settings (`PruneConfig`) allow."""
    n = p.iterative_steps
    if p.target_metric != "macs":
        msg = (f"target {target}x {p.target_metric} unreachable: reached {o.achieved_speedup:.3f}x "
               f"{p.target_metric} at {o.macs_speedup:.3f}x MACs after {o.steps} steps")
        if o.metric_flat:
            return msg + f"; {o.metric_flat}, so pruning further would not reach it"
    else:
        msg = f"target {target}x unreachable: reached {o.achieved_speedup:.3f}x after {o.steps} steps"
    if o.at_floor:
        rt = f", a multiple of round_to {p.round_to}" if p.round_to else ""
        return msg + (f"; every prunable layer is at its max_pruning_ratio {p.max_pruning_ratio:g} floor "
                      f"(each keeps ceil((1 - {p.max_pruning_ratio:g}) x its width){rt}); the target "
                      "needs a larger max_pruning_ratio")
    if o.steps >= n:  # the schedule ran out, not the channels
        msg += (f"; the schedule is {n} steps, step k asking for k/{n} of the channels (each layer "
                f"capped at max_pruning_ratio {p.max_pruning_ratio:g})")
        if n <= 2:
            msg += (", and a step asking for all of a layer's channels prunes none of them (Torch-"
                    "Pruning keeps every layer alive)")
        msg += "; use more iterative_steps (Torch-Pruning's recipes use 400)"
    else:
        msg += "; every prunable group is at its floor (max_pruning_ratio, round_to, the classifier kept whole)"
    return msg
