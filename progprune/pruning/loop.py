"""The progressive loop: Torch-Pruning's `progressive_pruning` (reproduce/main.py), with
named hooks where ours differs. docs/design.md, "The progressive loop", says how and why."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, get_args

import torch
import torch.nn as nn
import torch_pruning as tp

from progprune import _tp
from progprune.config import PruningConfig
from progprune.errors import BadInput
from progprune.macs import MacsCounter, count_exact
from progprune.models import sync_attention
from progprune.pruning.methods import Method, get_method
from progprune.pruning.planner import CUT_NONE, CUT_WHOLE, _Cap, planned_step

if TYPE_CHECKING:
    from progprune.config import PruneConfig

CROSSINGS = get_args(PruningConfig.model_fields["crossing"].annotation)  # "fine", "reference"

# Which counter the loop read MACs from between steps (PruneOutcome.macs_counter). Reported
# MACs are Torch-Pruning's count either way; with "torch_pruning" every step deep-copies and
# runs the model, and the crossing step is taken whole (the fine cut needs the fast counter).
MACS_FAST = "fast"  # progprune.macs.MacsCounter, from layer widths
MACS_TP = "torch_pruning"  # tp.utils.count_ops_and_params: the model has layers the fast one lacks


@dataclass
class PruneOutcome:
    status: str  # "ok" or "unreachable"
    target_speedup: float
    base_macs: int
    base_params: int
    macs: int
    params: int
    steps: int
    seconds: float
    crossing: str  # the crossing mode that ran: "fine" | "reference"
    max_pruning_ratio: float  # the per-layer cap the run enforced (1.0: none)
    history: list = field(default_factory=list)  # pruner.pruning_history(), JSON-able
    crossing_cut: str = CUT_NONE  # how the last step was cut: one of CROSSING_CUTS
    crossing_channels: list = field(default_factory=lambda: [0, 0])  # last step: [pruned, selected]
    at_floor: bool = False  # stopped early: every prunable group was at its cap's floor
    macs_counter: str = "fast"  # what counted MACs between steps: MACS_FAST or MACS_TP
    macs_fallback: str = ""  # with MACS_TP: why the fast counter was not used (for the log)
    heads_whole: bool = False  # attention heads were pruned whole: the crossing step was taken whole
    # the target's metric (config.TARGET_METRICS); for "latency" and "params", the speedup
    # in that metric where the search stopped (the best one reached when unreachable), its
    # 95% interval (timed metrics), the points measured, and why it stopped short
    target_metric: str | None = None  # None: MACs
    metric_speedup: float | None = None
    metric_low: float | None = None
    metric_high: float | None = None
    metric_points: int = 0
    metric_flat: str = ""

    @property
    def macs_speedup(self) -> float:
        return self.base_macs / self.macs

    @property
    def achieved_speedup(self) -> float:
        """The speedup in the target's metric."""
        return self.macs_speedup if self.metric_speedup is None else self.metric_speedup

    @property
    def overshoot_pct(self) -> float:
        return (self.achieved_speedup / self.target_speedup - 1.0) * 100.0


class _Steps:
    """How one step of the loop runs: `pruner.step()` with the method's hooks around it,
    planned instead where ours differs (the step that may cross the target, a cap < 1),
    and the MACs counted after it (from layer widths while that counter is right)."""

    def __init__(self, model, pruner, example_inputs, settings, method: Method | None,
                 calib, base_macs: int, target_macs: float):
        self.model, self.pruner, self.example_inputs = model, pruner, example_inputs
        self.method, self.calib = method, calib
        self.tolerance, self.target_macs = settings.tolerance, target_macs
        self.counter = MacsCounter(model, example_inputs, expected=base_macs)
        self.fast = self.counter.ok
        self.fallback = "" if self.fast else self.counter.reason
        # heads pruned whole (timm's Attention): a head is one unit of Torch-Pruning's ranking and
        # qkv must stay 3 x heads x head_dim wide, so the crossing step cannot be cut channel by
        # channel; it is taken whole (the count stays fast)
        self.heads_whole = bool(getattr(pruner, "num_heads", None)) and bool(getattr(pruner, "prune_num_heads", False))
        self.fine = settings.crossing == "fine" and not self.heads_whole
        self.ratio = float(getattr(pruner, "max_pruning_ratio", 1.0))
        self.cap = _Cap(pruner, self.ratio) if self.ratio < 1.0 else None
        self.cut, self.channels = CUT_NONE, [0, 0]  # how the last step was cut
        self.at_floor = False  # the last step pruned nothing and every group is at the cap's floor
        self.last_drop = None  # the largest MAC drop of one step so far

    def may_cross(self, macs: int) -> bool:
        """Whether the next step may cross the target: planned then, so it can be cut.
        Four of the largest drops so far is the margin; a step outside it is taken whole."""
        return (self.fast and self.fine and
                (self.last_drop is None or macs - 4 * self.last_drop <= self.target_macs))

    def step(self, macs: int) -> int:
        """One step (`macs` before it); returns the MACs after it."""
        model, pruner, method = self.model, self.pruner, self.method
        if method and method.before_step:
            method.before_step(model, pruner, self.calib)
        try:
            cross = self.may_cross(macs)
            with _tp.mappings_cached(pruner):  # nothing prunes in it but the step's own pruning
                if cross or self.cap is not None:
                    self.cut, self.channels, pruned = planned_step(
                        pruner, self.counter, self.target_macs, self.tolerance, self.cap, cross)
                    self.at_floor = self.cap is not None and pruned == 0 and self.cap.exhausted(pruner)
                else:
                    with _tp.one_step(pruner):
                        pruner.step()
                    self.cut, self.channels, self.at_floor = CUT_WHOLE, None, False
        finally:
            sync_attention(model)
            if method and method.after_step:
                method.after_step(model, pruner)
        new = self.count()
        if new < macs:
            self.last_drop = max(macs - new, self.last_drop or 0)
        return new

    def count(self) -> int:
        return self.counter.macs() if self.fast else count_exact(self.model, self.example_inputs)[0]


def check_speedup(target_speedup) -> None:
    if not target_speedup > 1.0:
        raise BadInput(f"speedup must be a number > 1, got {target_speedup}")


def _check(settings, method, pruner, calib) -> Method | None:
    """The method whose hooks run; BadInput before anything is pruned."""
    if settings.crossing not in CROSSINGS:
        raise BadInput(f"crossing must be one of {', '.join(CROSSINGS)}, got {settings.crossing!r}")
    if method is None:
        method = getattr(pruner, "progprune_method", None)
    method = get_method(method) if method is not None else None
    if method is not None and method.gradients and calib is None:
        raise BadInput(f"{method.gradients} importance needs calibration data")
    bad = next((n for n, p in pruner.model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:  # nan scores rank nothing: the loop would run out of steps at 1.0x
        raise BadInput(f"the model has non-finite weights ({bad} holds nan/inf): no channel can be ranked "
                       "or pruned; start from finite weights")
    return method


class ProgressiveLoop:
    """The progressive loop, which may be driven to several MACs targets in turn (a target
    in another metric is reached through MACs targets: `progprune.pruning.targets`):
    `run_to(target_macs)` steps until the MACs are at most `target_macs` (or the schedule,
    or the cap, ends), `finish()` counts exactly once, `outcome()` is the run's record.

    `settings`: the run's pruning settings (`PruneConfig`, or anything with its
    `.crossing` and `.tolerance`). `method`: whose step hooks to run (default: the one
    `make_pruner` built the pruner for; none for a hand-built pruner). `calib`: (x, y),
    for methods that read gradients. `on_step(step, macs_speedup)` after every step.
    """

    def __init__(self, model: nn.Module, pruner: tp.pruner.BasePruner, example_inputs: torch.Tensor,
                 settings: PruneConfig, *, method: str | Method | None = None, calib=None,
                 on_step: Callable[[int, float], None] | None = None):
        self.method = _check(settings, method, pruner, calib)
        self.t0 = time.perf_counter()
        self.model, self.pruner, self.example_inputs, self.settings = model, pruner, example_inputs, settings
        self.on_step = on_step
        model.eval()
        self.base_macs, self.base_params = count_exact(model, example_inputs)
        self.macs = self.base_macs
        self.steps = _Steps(model, pruner, example_inputs, settings, self.method, calib,
                            self.base_macs, self.base_macs)
        self.marks = {pruner.current_step: len(pruner.pruning_history())}  # step -> history length
        self.step_macs = {pruner.current_step: self.base_macs}  # step -> the MACs after it
        self.kept: tuple[int, list] | None = None  # (step, history) of a prefix put in place (keep())

    @property
    def exhausted(self) -> bool:
        """No step is left: the schedule ran out, or every group is at its cap's floor."""
        return self.pruner.current_step >= self.pruner.iterative_steps or self.steps.at_floor

    def run_to(self, target_macs: float) -> int:
        """Step until the MACs are at most `target_macs`; returns the MACs then."""
        pruner, steps, macs = self.pruner, self.steps, self.macs
        steps.target_macs = target_macs
        with torch.enable_grad():
            while macs > target_macs and not self.exhausted:
                macs = steps.step(macs)
                self.marks[pruner.current_step] = len(pruner.pruning_history())
                self.step_macs[pruner.current_step] = macs
                if self.on_step:
                    self.on_step(pruner.current_step, self.base_macs / macs)
            self.model.zero_grad(set_to_none=True)
        self.macs = macs
        return macs

    def keep(self, step: int, pruned: nn.Module) -> None:
        """End at an earlier step: `pruned` (this model's start with the history up to
        `step` replayed) takes the model's place, in place. Nothing is pruned after it."""
        self.model.__dict__.update(pruned.__dict__)
        self.kept = (step, self.pruner.pruning_history()[: self.marks[step]])
        self.macs = count_exact(self.model, self.example_inputs)[0]

    def finish(self, resume: bool = True) -> tuple[int, int]:
        """One exact count: the figures we report are Torch-Pruning's own. Where the fast
        counter drifted from it (an unusual architecture), the last target is finished with
        exact counts (`resume`; a target in another metric was measured, not counted)."""
        final_macs, final_params = count_exact(self.model, self.example_inputs)
        if self.steps.fast and final_macs != self.macs:
            self.steps.fast = False
            self.steps.fallback = (f"its count drifted from Torch-Pruning's while pruning ({self.macs:,} "
                                   f"against {final_macs:,})")
            self.macs = final_macs
            if resume:
                self.run_to(self.steps.target_macs)
                final_macs, final_params = count_exact(self.model, self.example_inputs)
        self.macs = final_macs
        return final_macs, final_params

    def outcome(self, params: int, target_speedup: float, reached: bool, **metric) -> PruneOutcome:
        """The run's record; `reached`: whether the target (in its metric) was reached."""
        steps = self.steps
        cut, channels = steps.cut, steps.channels
        if not reached:
            cut, channels = CUT_NONE, [0, 0]
        elif channels is None:
            channels = [0, 0]  # a plain step: not counted
        return PruneOutcome(
            status="ok" if reached else "unreachable",
            target_speedup=float(target_speedup),
            base_macs=self.base_macs,
            base_params=self.base_params,
            macs=self.macs,
            params=params,
            steps=self.kept[0] if self.kept else self.pruner.current_step,
            seconds=time.perf_counter() - self.t0,
            history=_jsonable_history(self.kept[1] if self.kept else self.pruner.pruning_history()),
            crossing=self.settings.crossing,
            crossing_cut=cut,
            crossing_channels=[int(c) for c in channels],
            max_pruning_ratio=steps.ratio,
            at_floor=bool(steps.at_floor and not reached),
            macs_counter=MACS_FAST if steps.fast else MACS_TP,
            macs_fallback=steps.fallback,
            heads_whole=steps.heads_whole,
            **metric,
        )


def progressive_prune(
    model: nn.Module,
    pruner: tp.pruner.BasePruner,
    example_inputs: torch.Tensor,
    target_speedup: float,
    settings: PruneConfig,
    *,
    method: str | Method | None = None,
    calib=None,
    on_step: Callable[[int, float], None] | None = None,
) -> PruneOutcome:
    """Prune `model` in place until base MACs / MACs >= target_speedup (see ProgressiveLoop
    for the arguments)."""
    check_speedup(target_speedup)
    loop = ProgressiveLoop(model, pruner, example_inputs, settings, method=method, calib=calib, on_step=on_step)
    target_macs = loop.base_macs / target_speedup
    loop.run_to(target_macs)
    macs, params = loop.finish()
    return loop.outcome(params, target_speedup, macs <= target_macs)


def _jsonable_history(history) -> list:
    return [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]
