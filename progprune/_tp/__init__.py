"""The one place that reaches into Torch-Pruning 1.6.1's internals.

progprune prunes with Torch-Pruning's public pruners, but plans steps, enforces the
per-layer cap and fixes OBD-C with names Torch-Pruning does not promise to keep: the
pruner's private helpers (`_get_channel_groups`, `_check_pruning_ratio`,
`_downstream_node_as_root_if_attention`), its `estimate_importance` (replaced for one step
to record the scores), `layer_init_out_ch`, the dependency graph `pruner.DG`, the layout
of a `Group`, `OBDCImportance`'s private methods and buffers, the op counter's table, and
the index-mapping updates, group walk and magnitude importance that `mappings_cached`
shortens (`cached.py`). Everything else calls the small functions here, so an upgrade of
Torch-Pruning is this package. It sits at the bottom of the layers (torch and torch_pruning
only), so `macs` and `models` may use it as well as `pruning`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch_pruning as tp

from progprune._tp.cached import mappings_cached  # noqa: F401  (the loop's steps)

# Module types `tp.utils.count_ops_and_params` counts (the fast counter declines the others)
COUNTED_BY_TP = tuple(tp.utils.op_counter.MODULES_MAPPING)
# ... of those, the ones counted with timm's attention formula (timm's `Attention` and
# `WindowAttention` where timm is installed: QKV, scores, softmax, projection from `qkv`)
TIMM_ATTENTION = tuple(t for t, hook in tp.utils.op_counter.MODULES_MAPPING.items()
                       if hook is tp.utils.op_counter.timm_multihead_attention_counter_hook)


# ---- the dependency graph and its groups ---------------------------------------------
def is_out(pruner, handler) -> bool:
    """Whether `handler` prunes output channels (else input channels)."""
    return bool(pruner.DG.is_out_channel_pruning_fn(handler))


def out_channels(pruner, module) -> int | None:
    return pruner.DG.get_out_channels(module)


def width(pruner, module, handler) -> int:
    """The current width `handler` prunes `module` along (0 when unknown)."""
    dg = pruner.DG
    fn = dg.get_out_channels if is_out(pruner, handler) else dg.get_in_channels
    return fn(module) or 0


def root(group):
    """(module, handler, idxs) of the group's root: what `prune_group` takes back."""
    dep = group[0].dep
    return dep.target.module, dep.handler, [int(i) for i in group[0].idxs]


def members(pruner, group) -> Iterator[tuple]:
    """(module, is_out, [idx], [root idx]) for every member of the group."""
    for k, (dep, idxs) in enumerate(group):
        yield (dep.target.module, is_out(pruner, dep.handler), [int(i) for i in idxs],
               [int(r) for r in group[k].root_idxs])


def all_groups(pruner):
    """Every group the pruner may rank, each from the current graph."""
    return pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                    root_module_types=pruner.root_module_types)


def prune_group(pruner, module, handler, idxs) -> None:
    """Prune `idxs` of `module` along `handler`, the group re-derived from the current graph
    (index mappings through torch.cat shift when an earlier group is pruned)."""
    group = pruner.DG.get_pruning_group(module, handler, idxs)
    if pruner.DG.check_pruning_group(group):
        group.prune()


def channel_groups(pruner, group) -> int:
    """The group's channel groups (grouped convs, attention): its indices repeat per group."""
    return max(1, pruner._get_channel_groups(group))


def ranked(pruner, group) -> bool:
    """Whether Torch-Pruning still ranks the group (no member below its max_pruning_ratio floor)."""
    return pruner._check_pruning_ratio(group)


def _heads_to_remove(pruner) -> int | None:
    """How many heads the next step's global head ranking removes, by Torch-Pruning's own
    count (`_prune`, 2.1: heads ranked now - int(initial heads x (1 - the step's head
    ratio))); None where no global head ranking happens. The heads ranked are those of the
    attention groups `_prune` puts in its head scope (ranked, re-rooted, head ratio > 0)."""
    if not (getattr(pruner, "global_pruning", False) and getattr(pruner, "prune_num_heads", False)
            and getattr(pruner, "num_heads", None)):
        return None
    step = pruner.current_step + 1  # step() counts the step before it ranks
    if step > pruner.iterative_steps:
        return None
    ranked = 0
    for group in all_groups(pruner):
        if not pruner._check_pruning_ratio(group):
            continue
        is_atten, qkv = pruner._is_atten_group(group)
        if not is_atten or pruner._downstream_node_as_root_if_attention(group) is None:
            continue
        if min(pruner.head_pruning_ratio_dict.get(qkv[0], pruner.per_step_head_pruning_ratio)[step], 1) > 0:
            ranked += max(pruner.num_heads[q] for q in qkv)
    if not ranked:
        return None
    return ranked - int(pruner.initial_total_heads * (1 - pruner.per_step_head_pruning_ratio[step]))


@contextmanager
def one_step(pruner):
    """Wrap one `pruner.step()`, or the whole iteration of `pruner.step(interactive=True)`.

    Torch-Pruning 1.6.1's global head ranking sets its threshold `head_thres` only when the
    step removes at least one head, but reads it for every attention group it then prunes
    in width: a step whose head ranking is empty (the schedule's head count, truncated
    with int(), has not moved since the last head went: with 400 steps, most steps) raises
    `UnboundLocalError: cannot access local variable 'head_thres'`. Such a step removes no
    head, so here it runs with head pruning off: attention groups then lose nothing in that
    step, exactly what a threshold below every head would do, and every other group is
    ranked as before. The next step that removes a head runs with it on again.
    """
    n = _heads_to_remove(pruner)
    if n is None or n > 0:
        yield
        return
    pruner.prune_num_heads = False
    try:
        yield
    finally:
        pruner.prune_num_heads = True


def initial_out_modules(pruner) -> list:
    """The modules whose starting output width the pruner recorded."""
    return list(pruner.layer_init_out_ch)


@contextmanager
def scores_recorded(pruner):
    """Within the block the pruner's importance scores are recorded into the yielded dict:
    {(root module, handler): importance over the root's channels}."""
    scores: dict = {}
    estimate = pruner.estimate_importance

    def recording(group):
        imp = estimate(group)
        if imp is not None:
            dep = group[0].dep
            scores[(dep.target.module, dep.handler)] = imp.detach().float().cpu()
        return imp

    pruner.estimate_importance = recording
    try:
        yield scores
    finally:
        del pruner.estimate_importance  # back to the class's method


# ---- OBD-C ---------------------------------------------------------------------------
_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


class OBDCImportance(tp.importance.OBDCImportance):
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
        for group in all_groups(pruner):
            group = pruner._downstream_node_as_root_if_attention(group) or group
            for dep, _ in group:
                layer = dep.target.module
                if (isinstance(layer, tuple(self.target_types)) and dep.handler in _OUT_FNS
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
            if layer not in self.Fisher or layer.weight.grad is None or dep.handler not in _OUT_FNS:
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

    def reset(self, model) -> None:
        """No hooks on `model`, an empty Fisher."""
        self._rm_hooks(model)
        self._clear_buffer()

    def prepare(self, model, pruner) -> None:
        """Hooks on the layers whose Fisher the next scoring reads."""
        self._prepare_model(model, pruner)
