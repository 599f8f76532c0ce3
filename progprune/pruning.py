"""Pruning methods (a registry) and the progressive loop that prunes to a MACs target.

The loop is torch-pruning's: `pruner.step()` with a linear schedule over
`iterative_steps`, stopping once base MACs / current MACs >= target. Two things differ
from the reference (Torch-Pruning `reproduce/main.py`):

* MACs are recomputed from layer widths (`macs.MacsCounter`), not by deep-copying the
  model and running a forward pass after every step.
* The reference overshoots by up to a whole step. Here the step that would cross the
  target is taken group by group; the group that crosses is the one whose channels cost
  the fewest MACs each, and only as many of its least important channels are removed as
  needed. The result lands at or above the target, by at most one such channel.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from progprune.config import PruneConfig, SparseConfig
from progprune.errors import ProgpruneError
from progprune.macs import MacsCounter, count_exact
from progprune.models import classifier_layers


# --------------------------------------------------------------------------------------
# Method registry
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    importance: Callable[[int], tp.importance.Importance]  # num_classes -> importance
    pruner: type = tp.pruner.BasePruner
    pruner_kwargs: Callable[[SparseConfig], dict] = lambda sl: {}
    sparse: bool = False  # needs a sparse-learning phase before pruning
    gradients: str | None = None  # "taylor": one backward before each step; "hessian": per-sample
    doc: str = ""


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def list_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ProgpruneError(
            f"unknown method '{name}'; valid: {', '.join(METHODS)}"
        ) from None


register_method(Method("random", lambda nc: tp.importance.RandomImportance(), doc="random channels (baseline)"))
register_method(Method("l1", lambda nc: tp.importance.MagnitudeImportance(p=1), doc="L1 filter norm"))
register_method(Method("l2", lambda nc: tp.importance.MagnitudeImportance(p=2), doc="L2 filter norm"))
register_method(Method("fpgm", lambda nc: tp.importance.FPGMImportance(p=2), doc="geometric median (FPGM)"))
register_method(Method("lamp", lambda nc: tp.importance.LAMPImportance(p=2), doc="layer-adaptive magnitude (LAMP)"))
class _TieBrokenBNScale(tp.importance.BNScaleImportance):
    """BN scales start at exactly 1.0: without a tie-break the global threshold ties
    everywhere and an untrained (or barely trained) model never loses a channel."""

    def __call__(self, group, **kwargs):
        imp = super().__call__(group, **kwargs)
        if imp is None:
            return None
        # a relative nudge below any meaningful difference, but above float32 resolution
        ramp = torch.arange(len(imp), device=imp.device, dtype=imp.dtype) / max(len(imp), 1)
        return imp * (1 + 1e-4 * ramp)


register_method(Method(
    "slim", lambda nc: _TieBrokenBNScale(), tp.pruner.BNScalePruner,
    lambda sl: {"reg": sl.reg}, sparse=True, doc="network slimming: BN scales + L1 sparse learning"))
register_method(Method(
    "group_slim", lambda nc: _TieBrokenBNScale(), tp.pruner.BNScalePruner,
    lambda sl: {"reg": sl.reg, "group_lasso": True}, sparse=True, doc="slimming with group lasso"))
register_method(Method(
    "group_norm", lambda nc: tp.importance.GroupMagnitudeImportance(p=2), tp.pruner.GroupNormPruner,
    doc="DepGraph group L2 norm"))
register_method(Method(
    "group_sl", lambda nc: tp.importance.GroupMagnitudeImportance(p=2, normalizer="max"),
    tp.pruner.GroupNormPruner, lambda sl: {"reg": sl.reg}, sparse=True,
    doc="DepGraph group norm + group sparse learning"))
register_method(Method(
    "growing_reg", lambda nc: tp.importance.GroupMagnitudeImportance(p=2), tp.pruner.GrowingRegPruner,
    lambda sl: {"reg": sl.reg, "delta_reg": sl.delta_reg}, sparse=True,
    doc="growing regularization"))
register_method(Method(
    "taylor", lambda nc: tp.importance.GroupTaylorImportance(), gradients="taylor",
    doc="first-order Taylor (one backward pass before each step)"))
register_method(Method(
    "hessian", lambda nc: tp.importance.GroupHessianImportance(), gradients="hessian",
    doc="second-order (per-sample gradients before each step)"))


# --------------------------------------------------------------------------------------
# Pruner construction
# --------------------------------------------------------------------------------------
def make_pruner(model: nn.Module, example_inputs: torch.Tensor, cfg: PruneConfig,
                num_classes: int, sparse: SparseConfig | None = None) -> tp.pruner.BasePruner:
    method = get_method(cfg.method)
    sparse = sparse or SparseConfig()
    model.eval()
    with torch.enable_grad():
        return method.pruner(
            model,
            example_inputs,
            importance=method.importance(num_classes),
            global_pruning=cfg.global_pruning,
            pruning_ratio=1.0,
            max_pruning_ratio=cfg.max_pruning_ratio,
            iterative_steps=cfg.iterative_steps,
            round_to=cfg.round_to,
            ignored_layers=classifier_layers(model, num_classes),
            **method.pruner_kwargs(sparse),
        )


def _prepare_gradients(kind: str | None, model, pruner, calib) -> None:
    """Importance criteria that read gradients need them fresh before each step."""
    if kind is None:
        return
    if calib is None:
        raise ProgpruneError(f"{kind} importance needs calibration data")
    x, y = calib
    model.zero_grad(set_to_none=True)
    if kind == "taylor":
        F.cross_entropy(model(x), y).backward()
    elif kind == "hessian":
        pruner.importance.zero_grad()
        out = model(x)
        losses = F.cross_entropy(out, y, reduction="none")
        for i in range(len(losses)):
            model.zero_grad(set_to_none=True)
            losses[i].backward(retain_graph=i < len(losses) - 1)
            pruner.importance.accumulate_grad(model)


# --------------------------------------------------------------------------------------
# The progressive loop
# --------------------------------------------------------------------------------------
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
    history: list = field(default_factory=list)  # pruner.pruning_history(), JSON-able

    @property
    def achieved_speedup(self) -> float:
        return self.base_macs / self.macs

    @property
    def overshoot_pct(self) -> float:
        return (self.achieved_speedup / self.target_speedup - 1.0) * 100.0


def _channels(pruner, group) -> int:
    dg, dep = pruner.DG, group[0].dep
    fn = dg.get_out_channels if dg.is_out_channel_pruning_fn(dep.handler) else dg.get_in_channels
    return fn(dep.target.module) or 0


def _least_important(pruner, group, k: int) -> list[int]:
    """The k channels of this group's selection that its importance ranks lowest."""
    idxs = list(group[0].idxs)
    if k >= len(idxs):
        return idxs
    dep = group[0].dep
    # importance is defined over a layer's whole width, so score all channels, then pick
    whole = pruner.DG.get_pruning_group(dep.target.module, dep.handler,
                                        list(range(_channels(pruner, group))))
    imp = pruner.estimate_importance(whole)
    if imp is None:
        return idxs[:k]
    scores = imp.detach().cpu()[idxs]
    return sorted(idxs[i] for i in torch.argsort(scores)[:k].tolist())


def _partial_counts(pruner, group, n: int) -> list[int]:
    """Channel counts that may be removed from this group, smallest first (round_to)."""
    if not pruner.round_to:
        return list(range(1, n + 1))
    current = _channels(pruner, group)
    first = current % pruner.round_to or pruner.round_to
    return list(range(first, n + 1, pruner.round_to))  # may be empty: no legal cut here


def _crossing(pruner, counter, group, n: int, target_macs: float):
    """(k, MACs after) for the fewest of this group's channels predicted to reach the
    target, or None if even n of them would not."""
    is_out = pruner.DG.is_out_channel_pruning_fn
    for k in _partial_counts(pruner, group, n):
        after = counter.macs_if_pruned(group, is_out, k)
        if after <= target_macs:
            return k, after
    return None


def _prune_k(pruner, group, k: int) -> None:
    dep = group[0].dep
    if k >= len(group[0].idxs):
        group.prune()
        return
    pruner.DG.get_pruning_group(dep.target.module, dep.handler, _least_important(pruner, group, k)).prune()


def _whole_layer_groups(pruner):
    """Every prunable group of the model at full width, each with how many channels it
    may still lose (always keeping one, and within max_pruning_ratio)."""
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        if pruner._get_channel_groups(group) > 1 or not pruner._check_pruning_ratio(group):
            continue
        now = len(group[0].idxs)
        initial = pruner.layer_init_out_ch.get(group[0].dep.target.module, now) \
            if pruner.DG.is_out_channel_pruning_fn(group[0].dep.handler) else now
        floor = max(1, int(round(initial * (1 - pruner.max_pruning_ratio))))
        if now - floor > 0:
            yield group, now - floor


def _cross_with_finest(pruner, counter, deferred, target_macs: float, tolerance: float) -> int:
    """Finish the crossing step so that MACs end at or just below the target.

    The step's own selection (`deferred`: groups that would each cross on their own) is
    used when its cheapest channels land within the tolerance. Otherwise the finest
    channels anywhere in the model are taken, least important first: the ranking's
    choice matters less than hitting the target, and they are the cheapest to lose.
    """
    is_out = pruner.DG.is_out_channel_pruning_fn
    floor_macs = target_macs / (1.0 + tolerance)  # below this the speedup overshoots
    macs = counter.macs()
    cost = lambda g: (macs - counter.macs_if_pruned(g, is_out)) / len(g[0].idxs)  # noqa: E731
    deferred = sorted(deferred, key=cost)
    best = None
    for group in deferred[:1]:
        if pruner._get_channel_groups(group) == 1:
            hit = _crossing(pruner, counter, group, len(group[0].idxs), target_macs)
            if hit:
                best = (hit[1], group, hit[0])
    if best is None or best[0] < floor_macs:
        for group, n in _whole_layer_groups(pruner):
            hit = _crossing(pruner, counter, group, n, target_macs)
            if hit and (best is None or hit[1] > best[0]):
                best = (hit[1], group, hit[0])
    if best is not None:
        _prune_k(pruner, best[1], best[2])
        macs = counter.macs()
    # prediction short of the target (it should not be): take the step's groups in turn
    for group in deferred:
        if macs <= target_macs:
            break
        if best is not None and group is best[1]:
            continue
        hit = _crossing(pruner, counter, group, len(group[0].idxs), target_macs)
        _prune_k(pruner, group, hit[0] if hit and pruner._get_channel_groups(group) == 1
                 else len(group[0].idxs))
        macs = counter.macs()
    return macs


def progressive_prune(
    model: nn.Module,
    pruner: tp.pruner.BasePruner,
    example_inputs: torch.Tensor,
    target_speedup: float,
    *,
    tolerance: float = 0.005,
    gradients: str | None = None,
    calib=None,
    on_step: Callable[[int, float], None] | None = None,
    exact_every_step: bool = False,
) -> PruneOutcome:
    """Prune `model` in place until base MACs / MACs >= target_speedup.

    `exact_every_step=True` is the reference behaviour (count with torch-pruning after
    every full step, overshoot allowed) and exists for the benchmark.
    """
    if not target_speedup > 1.0:
        raise ProgpruneError(f"speedup must be a number > 1, got {target_speedup}")
    t0 = time.perf_counter()
    method_grad = gradients  # the method's registry entry says whether it reads gradients
    model.eval()
    base_macs, base_params = count_exact(model, example_inputs)
    target_macs = base_macs / target_speedup
    counter = None if exact_every_step else MacsCounter(model, example_inputs, expected=base_macs)
    fast = counter is not None and counter.ok

    def measure() -> int:
        return counter.macs() if fast else count_exact(model, example_inputs)[0]

    macs, last_drop = base_macs, None
    with torch.enable_grad():
        while macs > target_macs and pruner.current_step < pruner.iterative_steps:
            _prepare_gradients(method_grad, model, pruner, calib)
            near = last_drop is None or macs - 3 * last_drop <= target_macs
            if not fast or not near:
                pruner.step()
                new = measure()
            else:
                # the step that may cross: coarse groups first, so the crossing is left
                # to the group whose channels cost the fewest MACs each
                deferred, is_out = [], pruner.DG.is_out_channel_pruning_fn
                groups = [g for g in pruner.step(interactive=True) if len(g[0].idxs)]
                now = counter.macs()
                groups.sort(key=lambda g: -(now - counter.macs_if_pruned(g, is_out)) / len(g[0].idxs))
                for group in groups:
                    if counter.macs_if_pruned(group, is_out) > target_macs:
                        group.prune()
                    else:
                        deferred.append(group)
                new = _cross_with_finest(pruner, counter, deferred, target_macs, tolerance) if deferred else measure()
            last_drop = max(macs - new, last_drop or 0) if new < macs else last_drop
            macs = new
            if on_step:
                on_step(pruner.current_step, base_macs / macs)
        model.zero_grad(set_to_none=True)

    # one exact count at the end: the figures we report are torch-pruning's own
    final_macs, final_params = count_exact(model, example_inputs)
    if fast and final_macs != macs:
        # the fast counter drifted (an unusual architecture): finish with exact counts
        macs = final_macs
        with torch.enable_grad():
            while macs > target_macs and pruner.current_step < pruner.iterative_steps:
                _prepare_gradients(method_grad, model, pruner, calib)
                pruner.step()
                macs = count_exact(model, example_inputs)[0]
        final_macs, final_params = count_exact(model, example_inputs)
    status = "ok" if final_macs <= target_macs else "unreachable"
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
    )


def _jsonable_history(history) -> list:
    return [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]
