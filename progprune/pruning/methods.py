"""Pruning methods (a registry): Torch-Pruning's importance + pruner, the hooks a method
runs around each step, and the pruner built for a method."""
from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from progprune import _tp
from progprune.errors import BadInput, ProgpruneError, one_line
from progprune.models import attention_heads, classifier_layers, logits_of
from progprune.models._attention import HEAD_PRUNING_RATIO
from progprune.registry import Registry

if TYPE_CHECKING:  # duck-typed: any object with these attributes will do
    from progprune.config import PruneConfig, SparseConfig


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


# the spec names methods in its top-level `methods:` list
METHODS: Registry[Method] = Registry("method", field="methods")


def register_method(method: Method) -> Method:
    """Add `method` under its name; a name registered twice is a ValueError."""
    return METHODS.register(method.name, method)


def list_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str | Method) -> Method:
    """The method registered as `name` (a Method passes through); else BadInput."""
    return name if isinstance(name, Method) else METHODS.get(name)


# ---- what the gradient-based methods do before each step ------------------------------
def _taylor_before(model, pruner, calib) -> None:
    """GroupTaylorImportance reads .grad: one backward pass on the calibration batch."""
    x, y = calib
    model.zero_grad(set_to_none=True)
    F.cross_entropy(logits_of(model(x)), y).backward()


def _hessian_before(model, pruner, calib) -> None:
    """GroupHessianImportance accumulates squared per-sample gradients."""
    x, y = calib
    pruner.importance.zero_grad()
    losses = F.cross_entropy(logits_of(model(x)), y, reduction="none")
    for i in range(len(losses)):
        model.zero_grad(set_to_none=True)
        losses[i].backward(retain_graph=i < len(losses) - 1)
        pruner.importance.accumulate_grad(model)


def _zero_grads(model, pruner) -> None:
    model.zero_grad(set_to_none=True)


OBDC_BATCHES = 10  # reproduce/main.py: the first 10 training batches before every step


def _obdc_before(model, pruner, calib) -> None:
    """reproduce/main.py's obdc branch: hooks, then up to 10 batches of forward + backward
    against labels sampled from the model's own softmax (the true Fisher), `imp.step()`
    after each. The calibration batch is split into those batches."""
    x, _ = calib
    imp = pruner.importance
    imp.reset(model)
    model.zero_grad(set_to_none=True)
    imp.prepare(model, pruner)
    gen = torch.Generator(device=x.device).manual_seed(int(pruner.current_step))
    for xb in torch.tensor_split(x, min(OBDC_BATCHES, len(x))):
        with warnings.catch_warnings():  # upstream's non-full backward hooks, as upstream
            warnings.filterwarnings("ignore", message="Using a non-full backward hook")
            out = logits_of(model(xb))
            sampled = torch.multinomial(F.softmax(out.detach(), dim=1), 1, generator=gen).squeeze(1)
            F.cross_entropy(out, sampled).backward()
        imp.step()


def _obdc_after(model, pruner) -> None:
    pruner.importance.reset(model)
    model.zero_grad(set_to_none=True)


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


register_method(Method("random", lambda nc: tp.importance.RandomImportance(), doc="random channels (baseline)"))
register_method(Method("l1", lambda nc: tp.importance.MagnitudeImportance(p=1), doc="L1 filter norm"))
register_method(Method("l2", lambda nc: tp.importance.MagnitudeImportance(p=2), doc="L2 filter norm"))
register_method(Method("fpgm", lambda nc: tp.importance.FPGMImportance(p=2), doc="geometric median (FPGM)"))
register_method(Method(
    "obdc", lambda nc: _tp.OBDCImportance(group_reduction="mean", num_classes=nc), gradients="obdc",
    before_step=_obdc_before, after_step=_obdc_after,
    doc="OBD-C: diagonal Fisher from sampled-label gradients before each step"))
register_method(Method("lamp", lambda nc: tp.importance.LAMPImportance(p=2), doc="layer-adaptive magnitude (LAMP)"))
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


# ---- the pruner ------------------------------------------------------------------------
def ignored_modules(model: nn.Module, patterns) -> list[nn.Module]:
    """The modules whose names match any of `patterns` (fnmatch: `features.0.*`, `*.fc`),
    kept whole along with the classifier. A pattern that matches nothing is an error."""
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
    ignored = classifier_layers(model, example_inputs=example_inputs)
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
                output_transform=logits_of,
                out_channel_groups=groups,
                **attention,
                **method.pruner_kwargs(sparse),
            )
    except ProgpruneError:
        raise
    # broad on purpose: DepGraph traces the user's model, and an architecture it cannot
    # trace (e.g. ShuffleNet's channel shuffle) fails with whatever the tracing hits
    except Exception as e:
        raise BadInput(f"Torch-Pruning cannot build the dependency graph of this model "
                       f"({one_line(e, 160, with_type=True)}); choose another model") from None
    if next(iter(_tp.all_groups(pruner)), None) is None:
        patterns = list(getattr(cfg, "ignore", ()) or ())
        if patterns:
            raise BadInput(f"{patterns} leave nothing to prune: every prunable layer matches, is kept "
                           "whole with the classifier head, or is coupled to one that is; narrow the patterns",
                           field="pruning.ignore")
        head = ", ".join(repr(n) for n, m in model.named_modules() if any(m is i for i in ignored)) or "none"
        raise BadInput(f"the model has nothing Torch-Pruning can prune: no Conv/Linear layer besides the "
                       f"classifier head, which is kept whole ({head}); choose a model with hidden layers")
    pruner.progprune_method = method
    return pruner
