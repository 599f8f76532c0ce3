"""Pruning methods (a registry) and the progressive loop that prunes to a MACs target.

The loop is torch-pruning's (`reproduce/main.py::progressive_pruning`): `pruner.step()`
with a linear schedule over `iterative_steps`, stopping once base MACs / current MACs >=
target. Two things may differ from that reference:

* MACs are recomputed from layer widths (`macs.MacsCounter`), not by deep-copying the
  model and running a forward pass after every step. Every step before the last removes
  exactly the channels the reference removes.
* The crossing step (`crossing="fine"`, the default). The reference takes the whole step
  that crosses the target and overshoots by up to a whole step. Here that step's
  selection is computed first (without pruning) and only a part of it is pruned: its
  least important channels in the method's own order (lowest importance first; with
  local pruning, the same fraction of every layer's selection), as few as reach the
  target. If that prefix lands more than `tolerance` above the target, channels of the
  order whose cut would overshoot are passed over for later, cheaper ones of the same
  selection. So the pruned model is, layer by layer, at least as wide as the reference's
  and the two are identical up to the last step; the speedup is >= the target and never
  above the reference's. `PruneOutcome.crossing_cut` says how the last step was cut.
  `crossing="reference"` takes whole steps and reproduces Torch-Pruning's channels and
  numbers exactly (with `max_pruning_ratio` < 1: Torch-Pruning's loop with the cap
  enforced, see below).
* `max_pruning_ratio` (the pruner's) is a cap per layer over the whole run: every
  pruning group keeps at least ceil(width * (1 - max_pruning_ratio)) of the output
  channels it had when the run started (and a multiple of round_to, if set). Torch-
  Pruning 1.6.1 only leaves a group out of a step's ranking once it is already *below*
  that floor (`BasePruner._check_pruning_ratio`); a group still above it may lose any
  number of channels in one step (global pruning: all its channels under the threshold;
  local: the schedule's k/iterative_steps of it), so its layers end up to ~10 points
  past the cap, and a cap of 1e-6 prunes anyway. Here, with a cap < 1, every step is
  planned and each group's part of the selection is trimmed to its least important
  channels (in the method's order) that the cap still allows before anything is pruned;
  the crossing rule then applies to that trimmed step. Torch-Pruning's global count
  still asks for the trimmed channels, so later steps take them from groups above their
  floor. Once a step prunes nothing and every group is at its floor, the loop stops
  (`PruneOutcome.at_floor`): a target the cap puts out of reach ends "unreachable".
  With the default 1.0 nothing is trimmed and the loop is Torch-Pruning's.

Groups are always pruned in the order `step(interactive=True)` yields them, each one
re-derived from the current graph right before it is pruned: index mappings through
torch.cat shift when an earlier group is pruned, so groups built in advance go stale.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from progprune.errors import BadInput
from progprune.macs import _BNS, MacsCounter, count_exact
from progprune.models import attention_heads, classifier_layers, sync_attention
from progprune.models._attention import HEAD_PRUNING_RATIO

if TYPE_CHECKING:  # duck-typed: any object with these attributes will do
    from progprune.config import PruneConfig, SparseConfig

CROSSINGS = ("fine", "reference")


# --------------------------------------------------------------------------------------
# Method registry
# --------------------------------------------------------------------------------------
def _frozen(d: Mapping | None = None) -> Mapping:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Method:
    """One pruning method: Torch-Pruning's importance + pruner, and what it needs.

    `sparse_defaults`: the sparse-learning settings (pruner keyword arguments, e.g. `reg`,
    `delta_reg`) from Torch-Pruning's published recipe; a setting given explicitly
    overrides its default. `pruner_extra`: constant pruner keyword arguments.
    `before_step(model, pruner, calib)` runs before every pruning step (gradients or
    statistics the importance reads), `after_step(model, pruner)` right after it.
    `gradients` names what `before_step` computes; a method with one needs calibration data.
    """

    name: str
    importance: Callable[[int], tp.importance.Importance]  # num_classes -> importance
    pruner: type = tp.pruner.BasePruner
    sparse: bool = False  # needs a sparse-learning phase before pruning
    sparse_defaults: Mapping[str, float] = field(default_factory=_frozen)
    pruner_extra: Mapping[str, Any] = field(default_factory=_frozen)
    gradients: str | None = None  # "taylor" | "hessian" | "obdc": needs calibration data
    before_step: Callable[[nn.Module, Any, Any], None] | None = None
    after_step: Callable[[nn.Module, Any], None] | None = None
    doc: str = ""

    def pruner_kwargs(self, sparse: SparseConfig | None = None) -> dict:
        """The pruner's keyword arguments: sparse settings (explicit over defaults) + extras."""
        kwargs = dict(self.pruner_extra)
        for key, default in self.sparse_defaults.items():
            given = getattr(sparse, key, None) if sparse is not None else None
            kwargs[key] = default if given is None else given
        return kwargs


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def list_methods() -> list[str]:
    return list(METHODS)


def get_method(name: str | Method) -> Method:
    if isinstance(name, Method):
        return name
    try:
        return METHODS[name]
    except KeyError:
        raise BadInput(
            f"unknown method '{name}'; valid: {', '.join(METHODS)}"
        ) from None


# ---- what the gradient-based methods do before each step ------------------------------
def _taylor_before(model, pruner, calib) -> None:
    """GroupTaylorImportance reads .grad: one backward pass on the calibration batch."""
    x, y = calib
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _hessian_before(model, pruner, calib) -> None:
    """GroupHessianImportance accumulates squared per-sample gradients."""
    x, y = calib
    pruner.importance.zero_grad()
    losses = F.cross_entropy(model(x), y, reduction="none")
    for i in range(len(losses)):
        model.zero_grad(set_to_none=True)
        losses[i].backward(retain_graph=i < len(losses) - 1)
        pruner.importance.accumulate_grad(model)


def _zero_grads(model, pruner) -> None:
    model.zero_grad(set_to_none=True)


OBDC_BATCHES = 10  # reproduce/main.py: the first 10 training batches before every step


class _OBDC(tp.importance.OBDCImportance):
    """Torch-Pruning's OBD-C (EigenDamage diagonal Fisher), usable on every model here.

    Torch-Pruning 1.6.1's version fails on every model in `_prepare_model` (see there),
    reads a Fisher for every Conv/Linear in a group, so it fails on a Conv classifier
    (MobileNetV2), and cannot score grouped/depthwise convs (its `ComputeMatGrad` ignores
    groups). Here such layers contribute no term to the group's score, the same as a
    Linear classifier does upstream, and a group's scores use the Fisher rows of its own
    channels; everything else is upstream's.
    """

    def _prepare_model(self, model, pruner):
        # upstream's, less its 1.6.1 bug (`_downstream_node_as_root_if_attention` returns
        # None for every non-attention group, so upstream raises a TypeError on any model)
        out_fns = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
        for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                              root_module_types=pruner.root_module_types):
            group = pruner._downstream_node_as_root_if_attention(group) or group
            for dep, _ in group:
                layer = dep.target.module
                if (isinstance(layer, tuple(self.target_types)) and dep.handler in out_fns
                        and layer not in self.modules
                        and not (isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1)):
                    self.modules.append(layer)
                    layer.register_forward_pre_hook(self._save_input)
                    layer.register_backward_hook(self._save_grad_output)

    def _rm_hooks(self, model):
        for m in model.modules():  # upstream clears only the modules it kept
            if isinstance(m, tuple(self.target_types)):
                for hooks in (m._backward_hooks, m._forward_pre_hooks):
                    for k in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                        del hooks[k]

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if layer not in self.Fisher or layer.weight.grad is None or dep.handler not in (
                    tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                continue
            idxs = sorted(idxs)
            w = (layer.weight.data.transpose(1, 0) if getattr(layer, "transposed", False)
                 else layer.weight.data)[idxs].flatten(1)
            # the Fisher's rows for these channels (upstream assumes all of them), weight
            # columns only (ComputeMatGrad appends one for a bias)
            f_diag = self.Fisher[layer][idxs, : w.shape[1]] / self.steps + self.eps
            group_imp.append((w ** 2 * f_diag).sum(1))
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


def _obdc_before(model, pruner, calib) -> None:
    """reproduce/main.py's obdc branch: hooks, then up to 10 batches of forward + backward
    against labels sampled from the model's own softmax (the true Fisher), `imp.step()`
    after each. The calibration batch is split into those batches."""
    x, _ = calib
    imp = pruner.importance
    imp._rm_hooks(model)
    imp._clear_buffer()
    model.zero_grad(set_to_none=True)
    imp._prepare_model(model, pruner)
    gen = torch.Generator(device=x.device).manual_seed(int(pruner.current_step))
    for xb in torch.tensor_split(x, min(OBDC_BATCHES, len(x))):
        with warnings.catch_warnings():  # upstream's non-full backward hooks, as upstream
            warnings.filterwarnings("ignore", message="Using a non-full backward hook")
            out = model(xb)
            sampled = torch.multinomial(F.softmax(out.detach(), dim=1), 1, generator=gen).squeeze(1)
            F.cross_entropy(out, sampled).backward()
        imp.step()


def _obdc_after(model, pruner) -> None:
    pruner.importance._rm_hooks(model)
    pruner.importance._clear_buffer()
    model.zero_grad(set_to_none=True)


register_method(Method("random", lambda nc: tp.importance.RandomImportance(), doc="random channels (baseline)"))
register_method(Method("l1", lambda nc: tp.importance.MagnitudeImportance(p=1), doc="L1 filter norm"))
register_method(Method("l2", lambda nc: tp.importance.MagnitudeImportance(p=2), doc="L2 filter norm"))
register_method(Method("fpgm", lambda nc: tp.importance.FPGMImportance(p=2), doc="geometric median (FPGM)"))
register_method(Method(
    "obdc", lambda nc: _OBDC(group_reduction="mean", num_classes=nc), gradients="obdc",
    before_step=_obdc_before, after_step=_obdc_after,
    doc="OBD-C: diagonal Fisher from sampled-label gradients before each step"))
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


# sparse-learning defaults: Torch-Pruning's published recipes (reproduce/ scripts and logs)
register_method(Method(
    "slim", lambda nc: _TieBrokenBNScale(), tp.pruner.BNScalePruner, sparse=True,
    sparse_defaults=_frozen({"reg": 1e-5}), doc="network slimming: BN scales + L1 sparse learning"))
register_method(Method(
    "group_slim", lambda nc: _TieBrokenBNScale(), tp.pruner.BNScalePruner, sparse=True,
    sparse_defaults=_frozen({"reg": 1e-5}), pruner_extra=_frozen({"group_lasso": True}),
    doc="slimming with group lasso"))
register_method(Method(
    "group_norm", lambda nc: tp.importance.GroupMagnitudeImportance(p=2), tp.pruner.GroupNormPruner,
    doc="DepGraph group L2 norm"))
register_method(Method(
    "group_sl", lambda nc: tp.importance.GroupMagnitudeImportance(p=2, normalizer="max"),
    tp.pruner.GroupNormPruner, sparse=True, sparse_defaults=_frozen({"reg": 5e-4}),
    doc="DepGraph group norm + group sparse learning"))
register_method(Method(
    "growing_reg", lambda nc: tp.importance.GroupMagnitudeImportance(p=2), tp.pruner.GrowingRegPruner,
    sparse=True, sparse_defaults=_frozen({"reg": 1e-4, "delta_reg": 1e-5}),
    doc="growing regularization"))
register_method(Method(
    "taylor", lambda nc: tp.importance.GroupTaylorImportance(), gradients="taylor",
    before_step=_taylor_before, after_step=_zero_grads,
    doc="first-order Taylor (one backward pass before each step)"))
register_method(Method(
    "hessian", lambda nc: tp.importance.GroupHessianImportance(), gradients="hessian",
    before_step=_hessian_before, after_step=_zero_grads,
    doc="second-order (per-sample gradients before each step)"))


# --------------------------------------------------------------------------------------
# Pruner construction
# --------------------------------------------------------------------------------------
def ignored_modules(model: nn.Module, patterns) -> list[nn.Module]:
    """The modules whose names match any of `patterns` (fnmatch: `features.0.*`, `*.fc`),
    kept whole along with the classifier. A pattern that matches nothing is an error."""
    import fnmatch

    named = [(n, m) for n, m in model.named_modules() if n]
    out = []
    for pattern in patterns:
        hits = [m for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            names = ", ".join(n for n, _ in named[:5])
            raise BadInput(f"{pattern!r} matches no module name (they read like {names}, ...)",
                                 field="pruning.ignore")
        out += [m for m in hits if m not in out]
    return out


def make_pruner(model: nn.Module, example_inputs: torch.Tensor, cfg: PruneConfig,
                num_classes: int, sparse: SparseConfig | None = None) -> tp.pruner.BasePruner:
    """Torch-Pruning's pruner for `cfg.method`. `cfg` needs .method, .global_pruning,
    .iterative_steps, .max_pruning_ratio, .round_to; `sparse` (optional) .reg/.delta_reg
    (None or missing: the method's `sparse_defaults`). The pruner remembers its method
    (`pruner.progprune_method`), so `progressive_prune` runs the method's step hooks."""
    method = get_method(cfg.method)
    model.eval()
    ignored = classifier_layers(model, num_classes, example_inputs)
    ignored += [m for m in ignored_modules(model, getattr(cfg, "ignore", ()) or ()) if m not in ignored]
    heads, groups = attention_heads(model)
    attention = {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False,
                 "head_pruning_ratio": HEAD_PRUNING_RATIO} if heads else {}
    try:
        with torch.enable_grad():
            pruner = method.pruner(
                model,
                example_inputs,
                importance=method.importance(num_classes),
                global_pruning=cfg.global_pruning,
                pruning_ratio=1.0,
                max_pruning_ratio=cfg.max_pruning_ratio,
                iterative_steps=cfg.iterative_steps,
                round_to=cfg.round_to,
                ignored_layers=ignored,
                out_channel_groups=groups,
                **attention,
                **method.pruner_kwargs(sparse),
            )
    except ProgpruneError:
        raise
    except Exception as e:  # an architecture DepGraph cannot trace (e.g. ShuffleNet's shuffle)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise BadInput(f"Torch-Pruning cannot build the dependency graph of this model "
                             f"({type(e).__name__}: {first}); choose another model") from None
    pruner.progprune_method = method
    return pruner


# --------------------------------------------------------------------------------------
# The outcome
# --------------------------------------------------------------------------------------
# How the last step was cut (PruneOutcome.crossing_cut):
CUT_NONE = "none"      # the target was not reached: no step crossed it
CUT_WHOLE = "whole"    # the whole last step was pruned, as the reference loop does: with
                       # crossing="reference", when counting fell back to exact counts, or
                       # when nothing less than the whole step reaches the target
CUT_PREFIX = "prefix"  # the last step's least important channels, in the method's order,
                       # as few as reach the target
CUT_SUBSET = "subset"  # part of the last step's selection that passes over channels of the
                       # method's order whose cut would land more than the tolerance above
                       # the target. With "prefix"/"subset" an overshoot above the tolerance
                       # means no subset that was tried lands within it.
CROSSING_CUTS = (CUT_NONE, CUT_WHOLE, CUT_PREFIX, CUT_SUBSET)

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
    history: list = field(default_factory=list)  # pruner.pruning_history(), JSON-able
    crossing: str = "fine"  # the crossing mode that ran: "fine" | "reference"
    crossing_cut: str = CUT_NONE  # how the last step was cut: one of CROSSING_CUTS
    crossing_channels: list = field(default_factory=lambda: [0, 0])  # last step: [pruned, selected]
    max_pruning_ratio: float = 1.0  # the per-layer cap the run enforced (1.0: none)
    at_floor: bool = False  # stopped early: every prunable group was at its cap's floor
    macs_counter: str = "fast"  # what counted MACs between steps: MACS_FAST or MACS_TP

    @property
    def achieved_speedup(self) -> float:
        return self.base_macs / self.macs

    @property
    def overshoot_pct(self) -> float:
        return (self.achieved_speedup / self.target_speedup - 1.0) * 100.0


# --------------------------------------------------------------------------------------
# One step, planned before it is pruned
# --------------------------------------------------------------------------------------
_COUNTED = (nn.modules.conv._ConvNd, nn.Linear) + _BNS


@dataclass
class _Planned:
    """One group of a step's selection, as step(interactive=True) yielded it."""
    module: nn.Module
    handler: Callable
    idxs: list  # root indices (the root module's own channel coordinates)
    cuts: list  # [(module, is_out, [idx], [root idx])] for MAC-counted layers
    ch_groups: int = 1  # channel groups (grouped convs): indices repeat per group


def _plan_step(pruner) -> tuple[list[_Planned], dict]:
    """Advance the pruner by one step and return what that step selects, without pruning.

    Torch-Pruning 1.6.1 scores every group before it yields the first one, so the
    selection does not depend on pruning in between; only the index mappings of the
    yielded groups do, and `_apply` re-derives them. Also returns the scores the step
    ranked with: {(root module, handler): importance over the root's channels}.
    """
    scores: dict = {}
    estimate = pruner.estimate_importance

    def recording(group):
        imp = estimate(group)
        if imp is not None:
            scores[(group[0].dep.target.module, group[0].dep.handler)] = imp.detach().float().cpu()
        return imp

    is_out = pruner.DG.is_out_channel_pruning_fn
    plan = []
    pruner.estimate_importance = recording
    try:
        for group in pruner.step(interactive=True):
            root = group[0].dep
            cuts = [(dep.target.module, bool(is_out(dep.handler)), [int(i) for i in idxs],
                     [int(r) for r in group[k].root_idxs])
                    for k, (dep, idxs) in enumerate(group) if isinstance(dep.target.module, _COUNTED)]
            plan.append(_Planned(root.target.module, root.handler, [int(i) for i in group[0].idxs], cuts,
                                 max(1, pruner._get_channel_groups(group))))
    finally:
        del pruner.estimate_importance  # back to the class's method
    return plan, scores


def _apply(pruner, plan: list[_Planned], keep: dict | None = None) -> None:
    """Prune the planned groups in their yield order, each re-derived from the current
    graph. `keep` maps plan index -> the root indices to prune (default: all)."""
    for i, p in enumerate(plan):
        idxs = p.idxs if keep is None else sorted(keep.get(i, ()))
        if not idxs and keep is not None:
            continue  # (a whole step prunes empty groups too: the history then matches)
        group = pruner.DG.get_pruning_group(p.module, p.handler, idxs)
        if pruner.DG.check_pruning_group(group):
            group.prune()


@dataclass
class _Item:
    """The smallest piece of a step's selection that may be pruned on its own."""
    group: int  # index into the plan
    roots: list  # root indices
    key: tuple  # position in the method's order


def _items(pruner, plan: list[_Planned], scores: dict) -> list[_Item]:
    """The step's selection split into items, in the method's order: lowest importance
    first (global), or the same fraction of every layer's selection first (local).
    With round_to, an item is a block that keeps the layer a multiple of round_to;
    with channel groups (grouped convs), a dimension across all its groups."""
    items = []
    for gi, p in enumerate(plan):
        imp = scores.get((p.module, p.handler))
        n = len(imp) if imp is not None else 0
        ch_groups = p.ch_groups if n else 1
        size = n // ch_groups if n else 0
        if size and ch_groups > 1:
            dim_imp = imp.view(ch_groups, -1).mean(0)
            dims = sorted({i % size for i in p.idxs})
            units = [[d + g * size for g in range(ch_groups) if d + g * size in set(p.idxs)] for d in dims]
            unit_score = [float(dim_imp[d]) for d in dims]
        else:
            units = [[i] for i in p.idxs]
            unit_score = [float(imp[i]) if imp is not None and i < n else 0.0 for i in p.idxs]
        order = sorted(range(len(units)), key=lambda j: (unit_score[j], units[j][0]))
        units = [units[j] for j in order]
        unit_score = [unit_score[j] for j in order]
        blocks = [(u, s) for u, s in zip(units, unit_score)]
        if pruner.round_to and ch_groups == 1:
            # blocks that keep the width a multiple of round_to: the first block tops up
            # the remainder, the rest are round_to wide (the selection is such a cut too)
            r = pruner.round_to
            width = _root_width(pruner, p)
            first = width % r or r
            cuts = [0] + list(range(first, len(units) + 1, r))
            if cuts[-1] != len(units):
                cuts.append(len(units))  # cannot happen for a round_to selection; keep it whole
            blocks = [(sum(units[a:b], []), unit_score[b - 1]) for a, b in zip(cuts, cuts[1:])]
        elif pruner.round_to:
            blocks = [(sum(units, []), max(unit_score, default=0.0))]
        for j, (roots, score) in enumerate(blocks):
            key = (score, gi, j) if pruner.global_pruning else ((j + 1) / len(blocks), gi, j)
            items.append(_Item(gi, roots, key))
    items.sort(key=lambda it: it.key)
    return items


def _root_width(pruner, p: _Planned) -> int:
    dg = pruner.DG
    fn = dg.get_out_channels if dg.is_out_channel_pruning_fn(p.handler) else dg.get_in_channels
    return fn(p.module) or 0


class _CutSet:
    """A set of items and the MACs the model would have without them."""

    def __init__(self, counter: MacsCounter, plan: list[_Planned]):
        self.counter, self.plan = counter, plan
        self.sets: dict = {}  # module -> (set of removed out idxs, set of removed in idxs)
        self.items: list[_Item] = []

    def _touch(self, item: _Item):
        roots = set(item.roots)
        for module, is_out, idxs, root_idxs in self.plan[item.group].cuts:
            yield module, is_out, {i for i, r in zip(idxs, root_idxs) if r in roots}

    def add(self, item: _Item) -> list:
        undo = []
        for module, is_out, idxs in self._touch(item):
            out_in = self.sets.setdefault(module, (set(), set()))
            new = idxs - out_in[0 if is_out else 1]
            out_in[0 if is_out else 1].update(new)
            undo.append((module, is_out, new))
        self.items.append(item)
        return undo

    def remove(self, undo: list) -> None:
        for module, is_out, new in undo:
            self.sets[module][0 if is_out else 1].difference_update(new)
        self.items.pop()

    def macs(self) -> int:
        return self.counter.macs({m: (len(o), len(i)) for m, (o, i) in self.sets.items()})

    def keep(self) -> dict:
        keep: dict = {}
        for it in self.items:
            keep.setdefault(it.group, set()).update(it.roots)
        return keep


def _choose(counter, plan, items, target_macs: float, tolerance: float):
    """Which items of the crossing step to prune: (items, cut kind, MACs predicted).

    1. The shortest prefix of the method's order that reaches the target, if it lands
       within the tolerance ("prefix"; "whole" if that is every item).
    2. Otherwise, greedily in the same order, every item whose cut keeps the MACs within
       the tolerance window, until the target is reached ("subset").
    3. Otherwise the least overshooting of: the prefix of 1, and the items of 2 plus any
       one more item that reaches the target.
    """
    floor = target_macs / (1.0 + tolerance)  # fewer MACs than this overshoots the tolerance
    cs = _CutSet(counter, plan)
    prefix = None
    for n, item in enumerate(items, 1):
        cs.add(item)
        m = cs.macs()
        if m <= target_macs:
            prefix = (list(cs.items), m)
            break
    if prefix is None:  # the whole step does not reach the target
        return list(items), CUT_WHOLE, cs.macs()
    kind = CUT_WHOLE if len(prefix[0]) == len(items) else CUT_PREFIX
    if prefix[1] >= floor:
        return prefix[0], kind, prefix[1]
    greedy = _CutSet(counter, plan)
    now = counter.macs()
    for item in items:
        undo = greedy.add(item)
        m = greedy.macs()
        if m < floor:
            greedy.remove(undo)
            continue
        now = m
        if now <= target_macs:
            return list(greedy.items), CUT_SUBSET, now
    best = prefix + (kind,)
    chosen = {id(it) for it in greedy.items}
    for item in items:
        if id(item) in chosen:
            continue
        undo = greedy.add(item)
        m = greedy.macs()
        if target_macs >= m > best[1]:
            best = (list(greedy.items), m, CUT_SUBSET)
        greedy.remove(undo)
    return best[0], best[2], best[1]


class _Cap:
    """`max_pruning_ratio` as a floor per layer: each layer keeps at least
    ceil(width * (1 - ratio)) of the output channels it had when the run started."""

    def __init__(self, pruner, ratio: float):
        self.ratio = float(ratio)
        dg = pruner.DG
        self.floor: dict = {}
        for module in pruner.layer_init_out_ch:
            width = dg.get_out_channels(module)
            if width:  # 1e-9: 10 * (1 - 0.3) is 7.000000000000001, and its floor is 7
                self.floor[module] = min(width, math.ceil(width * (1.0 - self.ratio) - 1e-9))

    def room(self, pruner, modules) -> int | None:
        """How many channels a group whose members are `modules` [(module, is_out)] may
        still lose (None: no member is capped)."""
        dg, room = pruner.DG, None
        for module, is_out in modules:
            if is_out and module in self.floor:
                left = (dg.get_out_channels(module) or 0) - self.floor[module]
                room = left if room is None else min(room, left)
        return None if room is None else max(room, 0)

    def trim(self, pruner, plan: list[_Planned], items: list[_Item]) -> tuple[list[_Item], bool]:
        """The step's items that the cap allows: per group, the longest run of its items in
        the method's order (least important first) that stays within the group's room.
        Returns (items kept, in the given order; whether any was dropped)."""
        rooms = {gi: self.room(pruner, [(m, o) for m, o, _, _ in p.cuts] + [(p.module, True)])
                 for gi, p in enumerate(plan)}
        used: dict = {}
        full: set = set()
        kept: set = set()
        for it in sorted(items, key=lambda it: (it.group, it.key[2])):  # each group's own order
            room = rooms[it.group]
            if it.group in full:
                continue
            if room is None or used.get(it.group, 0) + len(it.roots) <= room:
                used[it.group] = used.get(it.group, 0) + len(it.roots)
                kept.add(id(it))
            else:
                full.add(it.group)  # a prefix of the group's order, never a later channel
        out = [it for it in items if id(it) in kept]
        return out, len(out) < len(items)

    def exhausted(self, pruner) -> bool:
        """True when no group can lose another channel: each one is at its floor (less
        than the smallest cut it allows: one channel, a round_to block, one channel per
        channel group) or Torch-Pruning no longer ranks it."""
        dg, is_out = pruner.DG, pruner.DG.is_out_channel_pruning_fn
        for group in dg.get_all_groups(ignored_layers=pruner.ignored_layers,
                                       root_module_types=pruner.root_module_types):
            if not pruner._check_pruning_ratio(group):
                continue
            room = self.room(pruner, [(dep.target.module, bool(is_out(dep.handler))) for dep, _ in group])
            if room is None:
                return False
            ch_groups = max(1, pruner._get_channel_groups(group))
            width = dg.get_out_channels(group[0].dep.target.module) or 0
            unit = ch_groups if ch_groups > 1 else (
                (width % pruner.round_to or pruner.round_to) if pruner.round_to else 1)
            if room >= unit and width > 1:
                return False
        return True


def _planned_step(pruner, counter, target_macs: float, tolerance: float,
                  cap: _Cap | None, cross: bool):
    """One step, planned before it is pruned: its selection, trimmed to what `cap` allows,
    and, with `cross`, cut down if it is the step that crosses the target.
    Returns (cut kind, [channels pruned, channels selected] or None without `cross`,
    channels pruned)."""
    plan, scores = _plan_step(pruner)
    if not plan:
        return CUT_WHOLE, ([0, 0] if cross else None), 0
    items = _items(pruner, plan, scores)
    trimmed = False
    if cap is not None:
        items, trimmed = cap.trim(pruner, plan, items)
    selected = sum(len(it.roots) for it in items)
    chosen, kind = items, CUT_WHOLE
    if cross and items:
        everything = _CutSet(counter, plan)
        for item in items:
            everything.add(item)
        if everything.macs() <= target_macs:  # the crossing step (else: prune it whole)
            chosen, kind, _ = _choose(counter, plan, items, target_macs, tolerance)
    if kind == CUT_WHOLE and not trimmed:
        _apply(pruner, plan)
    else:
        keep: dict = {}
        for it in chosen:
            keep.setdefault(it.group, set()).update(it.roots)
        _apply(pruner, plan, keep)
    pruned = sum(len(it.roots) for it in chosen)
    return kind, ([pruned, selected] if cross else None), pruned


# --------------------------------------------------------------------------------------
# The progressive loop
# --------------------------------------------------------------------------------------
def progressive_prune(
    model: nn.Module,
    pruner: tp.pruner.BasePruner,
    example_inputs: torch.Tensor,
    target_speedup: float,
    *,
    tolerance: float = 0.005,
    crossing: str = "fine",
    method: str | Method | None = None,
    calib=None,
    on_step: Callable[[int, float], None] | None = None,
) -> PruneOutcome:
    """Prune `model` in place until base MACs / MACs >= target_speedup.

    `crossing`: "fine" cuts the step that crosses the target down to part of its own
    selection (see the module docstring); "reference" takes whole steps, as Torch-Pruning's
    loop does, with the same channels and numbers. The pruner's `max_pruning_ratio` is
    enforced per layer over the whole run (module docstring). `method`: whose step hooks to run
    (default: the one `make_pruner` built the pruner for; none for a hand-built pruner).
    `calib`: (x, y), for methods that read gradients (the method's registry entry says so).
    """
    if not target_speedup > 1.0:
        raise BadInput(f"speedup must be a number > 1, got {target_speedup}")
    if crossing not in CROSSINGS:
        raise BadInput(f"crossing must be one of {', '.join(CROSSINGS)}, got {crossing!r}")
    if method is None:
        method = getattr(pruner, "progprune_method", None)
    method = get_method(method) if method is not None else None
    before = method.before_step if method else None
    after = method.after_step if method else None
    if method is not None and method.gradients and calib is None:
        raise BadInput(f"{method.gradients} importance needs calibration data")
    t0 = time.perf_counter()
    model.eval()
    base_macs, base_params = count_exact(model, example_inputs)
    target_macs = base_macs / target_speedup
    counter = MacsCounter(model, example_inputs, expected=base_macs)
    # attention: heads go whole, so a step cannot be cut channel by channel
    fast = counter.ok and not getattr(pruner, "num_heads", None)
    fine = fast and crossing == "fine"
    ratio = float(getattr(pruner, "max_pruning_ratio", 1.0))
    cap = _Cap(pruner, ratio) if ratio < 1.0 else None
    at_floor = False

    def measure() -> int:
        return counter.macs() if fast else count_exact(model, example_inputs)[0]

    def one_step(planned: bool):
        """(cut kind, channels or None, whether the loop may stop: all at the cap's floor)."""
        if before:
            before(model, pruner, calib)
        try:
            if planned or cap is not None:
                cut, channels, pruned = _planned_step(pruner, counter, target_macs, tolerance, cap, planned)
                return cut, channels, cap is not None and pruned == 0 and cap.exhausted(pruner)
            pruner.step()
            return CUT_WHOLE, None, False
        finally:
            sync_attention(model)
            if after:
                after(model, pruner)

    macs, last_drop = base_macs, None
    cut, channels = CUT_NONE, [0, 0]
    with torch.enable_grad():
        while macs > target_macs and pruner.current_step < pruner.iterative_steps and not at_floor:
            # plan the steps that may cross; the others are plain pruner.step()s (planned
            # too, without crossing, when a cap < 1 trims them)
            near = last_drop is None or macs - 4 * last_drop <= target_macs
            cut, channels, at_floor = one_step(fine and near)
            new = measure()
            last_drop = max(macs - new, last_drop or 0) if new < macs else last_drop
            macs = new
            if on_step:
                on_step(pruner.current_step, base_macs / macs)
        model.zero_grad(set_to_none=True)

    # one exact count at the end: the figures we report are torch-pruning's own
    final_macs, final_params = count_exact(model, example_inputs)
    if fast and final_macs != macs:
        # the fast counter drifted (an unusual architecture): finish with exact counts
        fast, macs = False, final_macs
        with torch.enable_grad():
            while macs > target_macs and pruner.current_step < pruner.iterative_steps and not at_floor:
                cut, channels, at_floor = one_step(False)
                macs = count_exact(model, example_inputs)[0]
        final_macs, final_params = count_exact(model, example_inputs)
    status = "ok" if final_macs <= target_macs else "unreachable"
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
        crossing=crossing,
        crossing_cut=cut,
        crossing_channels=[int(c) for c in channels],
        max_pruning_ratio=ratio,
        at_floor=bool(at_floor and status != "ok"),
        macs_counter=MACS_FAST if fast else MACS_TP,
    )


def _jsonable_history(history) -> list:
    return [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]
