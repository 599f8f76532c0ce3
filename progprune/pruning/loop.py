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

    @property
    def achieved_speedup(self) -> float:
        return self.base_macs / self.macs

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


def _check(target_speedup, settings, method, pruner, calib) -> Method | None:
    """The method whose hooks run; BadInput before anything is pruned."""
    if not target_speedup > 1.0:
        raise BadInput(f"speedup must be a number > 1, got {target_speedup}")
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
    """Prune `model` in place until base MACs / MACs >= target_speedup.

    `settings`: the run's pruning settings (`PruneConfig`, or anything with its
    `.crossing` and `.tolerance`). `method`: whose step hooks to run (default: the one
    `make_pruner` built the pruner for; none for a hand-built pruner). `calib`: (x, y),
    for methods that read gradients. `on_step(step, speedup)` after every step.
    """
    method = _check(target_speedup, settings, method, pruner, calib)
    t0 = time.perf_counter()
    model.eval()
    base_macs, base_params = count_exact(model, example_inputs)
    target_macs = base_macs / target_speedup
    steps = _Steps(model, pruner, example_inputs, settings, method, calib, base_macs, target_macs)

    def prune_until_target(macs: int) -> int:
        with torch.enable_grad():
            while macs > target_macs and pruner.current_step < pruner.iterative_steps and not steps.at_floor:
                macs = steps.step(macs)
                if on_step:
                    on_step(pruner.current_step, base_macs / macs)
            model.zero_grad(set_to_none=True)
        return macs

    macs = prune_until_target(base_macs)
    # one exact count at the end: the figures we report are torch-pruning's own
    final_macs, final_params = count_exact(model, example_inputs)
    if steps.fast and final_macs != macs:
        # the fast counter drifted (an unusual architecture): finish with exact counts
        steps.fast = False
        steps.fallback = (f"its count drifted from Torch-Pruning's while pruning ({macs:,} against "
                          f"{final_macs:,})")
        prune_until_target(final_macs)
        final_macs, final_params = count_exact(model, example_inputs)
    status = "ok" if final_macs <= target_macs else "unreachable"
    cut, channels = steps.cut, steps.channels
    if status != "ok":
        cut, channels = CUT_NONE, [0, 0]
    elif channels is None:
        channels = [0, 0]  # a plain step: not counted
    return PruneOutcome(
        status=status,
        target_speedup=float(target_speedup),
        base_macs=base_macs,
        base_params=base_params,
        macs=final_macs,
        params=final_params,
        steps=pruner.current_step,
        seconds=time.perf_counter() - t0,
        history=_jsonable_history(pruner.pruning_history()),
        crossing=settings.crossing,
        crossing_cut=cut,
        crossing_channels=[int(c) for c in channels],
        max_pruning_ratio=steps.ratio,
        at_floor=bool(steps.at_floor and status != "ok"),
        macs_counter=MACS_FAST if steps.fast else MACS_TP,
        macs_fallback=steps.fallback,
        heads_whole=steps.heads_whole,
    )


def _jsonable_history(history) -> list:
    return [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]
