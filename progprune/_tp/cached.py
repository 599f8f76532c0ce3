"""The faster paths of one pruning step (`mappings_cached`), each giving exactly what
Torch-Pruning 1.6.1's own path gives: index mappings recomputed only after a prune, groups
re-made from their structure, and the magnitude importance without Python-list indexing."""
from __future__ import annotations

from contextlib import contextmanager
from numbers import Number

import torch
import torch_pruning as tp
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping as _index_mapping
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group

# ---- index mappings computed once per graph state --------------------------------------
# Torch-Pruning 1.6.1's `DG.get_pruning_group` starts with `index_mapping.update_index_mapping(DG)`,
# which recomputes every concat/split/reshape/unbind/expand/slice mapping from the current
# widths: once per root in `get_all_groups` (every step, to rank) and once per group pruned,
# though widths only change when something is pruned. The mappings are a function of the
# graph's state (widths, concat/split sizes), recomputing them on an unchanged state changes
# nothing, and within one step of Torch-Pruning's own pruner nothing prunes but `Group.prune`,
# which appends one entry to the graph's pruning history each time. So within
# `mappings_cached` (one step) the graph recomputes them on first use and then only when its
# history has grown since: they are exactly the mappings Torch-Pruning would compute, and so
# are the groups, their indices and the channels chosen (tests/test_pruning.py checks the
# histories against `pruner.step()`'s). A pruner that brings its own `step`/`_prune` (which
# might prune some other way) and everything outside the block run Torch-Pruning's own path.
_TP_UPDATE_INDEX_MAPPING = _index_mapping.update_index_mapping


_MAPPED = (ops.OPTYPE.CONCAT, ops.OPTYPE.SPLIT, ops.OPTYPE.RESHAPE, ops.OPTYPE.UNBIND,
           ops.OPTYPE.EXPAND, ops.OPTYPE.SLICE)


def _recompute_mappings(graph, nodes) -> None:
    """`update_index_mapping(graph)`: the same updates in the same order, over the nodes it
    updates only (`nodes`: those of its types, in `module2node`'s order; types never change)."""
    for node in nodes:
        t = node.type
        if t == ops.OPTYPE.CONCAT:
            _index_mapping.update_concat_index_mapping(graph, node)
        if t == ops.OPTYPE.SPLIT:
            _index_mapping.update_split_index_mapping(graph, node)
        if t == ops.OPTYPE.RESHAPE:
            _index_mapping.update_reshape_index_mapping(graph, node)
        if t == ops.OPTYPE.UNBIND:
            _index_mapping.update_unbind_index_mapping(graph, node)
        if t == ops.OPTYPE.EXPAND and torch.__version__ >= "1.8":
            _index_mapping.update_expand_index_mapping(graph, node)
        if t == ops.OPTYPE.SLICE:
            _index_mapping.update_slice_index_mapping(graph, node)


class _Cached:
    """What a graph within `mappings_cached` remembers."""

    def __init__(self, graph):
        self.pruned = None  # the history length the mappings are for (None: not computed)
        self.nodes = [n for n in graph.module2node.values() if n.type in _MAPPED]


def _update_index_mapping(graph):
    """Torch-Pruning's `update_index_mapping`, skipped where `graph` is within
    `mappings_cached` and its history has not grown since the mappings were computed."""
    cached = getattr(graph, "_progprune_mappings", None)
    if cached is None:  # not within mappings_cached: Torch-Pruning's own path
        return _TP_UPDATE_INDEX_MAPPING(graph)
    pruned = len(graph._pruning_history)
    if cached.pruned != pruned:
        _recompute_mappings(graph, cached.nodes)
        cached.pruned = pruned
    return None


# ---- groups walked with offsets ----------------------------------------------------------
# `get_pruning_group` walks the graph from the root with one (index, root index) object per
# channel per member, maps every list through each dependency's index mappings and merges
# the members pairwise: most of a step's time on a model with concats. Where each mapping on
# the walk maps indices as they are ([None, None]) or shifts them through a concat
# (`_ConcatIndexMapping`: forward + offset; reverse - offset, keeping those in [o0, o1)) and
# every reverse one keeps all of a member's indices or none, every member's indices are the
# root's plus a constant offset, its root indices the root's. `_walk` is that walk, step for
# step (the same stack, the same visited and `has_pruning_op` checks, the same merge) with
# each list held as its offset: two shifted copies of one list are equal exactly when their
# offsets are. A concat keeping part of a member's indices, any other mapping, a merge of two
# offsets, ignored parameters, repeated or non-int indices: Torch-Pruning's own walk.
_WALKS = "_progprune_structures"  # graph attribute: {(module, fn): the last walk's [(dep, offset)] or None}
_CAT = _index_mapping._ConcatIndexMapping


def _walk(root_dep, idxs):
    """[(dep, offset)] of the group Torch-Pruning's walk builds from `root_dep` for `idxs`, in
    its order, or None where some member's indices are not the root's shifted (see above)."""
    lo, hi = min(idxs), max(idxs)
    items, stack, visited = [(root_dep, 0)], [(root_dep, 0)], set()
    while stack:
        dep, off = stack.pop()
        node, fn = dep.target, dep.handler
        visited.add(node)
        for new_dep in node.dependencies:
            if not new_dep.is_triggered_by(fn):
                continue
            first, second = new_dep.index_mapping
            new = off
            if first is not None or second is not None and type(second) is not _CAT:
                return None
            if second is not None:
                o0, o1 = second.offset[0], second.offset[1]
                if not second.reverse:
                    new = off + o0
                elif o0 <= lo + off and hi + off < o1:
                    new = off - o0
                elif hi + off < o0 or o1 <= lo + off:
                    continue  # keeps none: an empty list, not taken
                else:
                    return None  # keeps some
            target, handler = new_dep.target, new_dep.handler
            if target in visited and any(d.target == target and d.handler == handler and o == new
                                         for d, o in items):
                continue  # has_pruning_op
            items.append((new_dep, new))
            stack.append((new_dep, new))
    merged = []
    for dep, off in items:  # add_and_merge: the first dep kept, its indices and any new ones
        same = next((o for d, o in merged if d.target == dep.target and d.handler == dep.handler), None)
        if same is None:
            merged.append((dep, off))
        elif same != off:
            return None
    return merged


def _get_pruning_group(graph, module, pruning_fn, idxs):
    tp_get = type(graph).get_pruning_group
    if (isinstance(idxs, Number) or module not in graph.module2node or graph.ignored_params or not idxs
            or (_run(idxs) is None and (any(type(i) is not int for i in idxs) or len(set(idxs)) != len(idxs)))):
        return tp_get(graph, module, pruning_fn, idxs)
    fn = pruning_fn
    if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels and module.out_channels > 1:
        fn = tp.pruner.function.prune_depthwise_conv_out_channels  # as Torch-Pruning resolves it
    _update_index_mapping(graph)  # first, as Torch-Pruning's does
    node = graph.module2node[module]
    walk = _walk(Dependency(fn, fn, source=node, target=node), idxs)
    graph.__dict__.setdefault(_WALKS, {})[(module, fn)] = walk
    if walk is None:
        return tp_get(graph, module, pruning_fn, idxs)
    group = Group()
    for dep, off in walk:
        item = _helpers.GroupItem(dep, [i + off for i in idxs] if off else list(idxs))
        item.root_idxs = list(idxs)
        group._group.append(item)
    group._DG = graph
    return group


def _all_groups(graph, ignored_layers=[], root_module_types=(ops.TORCH_CONV, ops.TORCH_LINEAR)):  # noqa: B006
    """`DG.get_all_groups`, upstream's loop with its visited layers in a set (by identity, as
    `in` over a list of modules compares them) instead of a list scanned for every module."""
    ignored_layers = ignored_layers + graph.IGNORED_LAYERS_IN_TRACING
    visited = set()
    for m in list(graph.module2node.keys()):
        if m in ignored_layers or not isinstance(m, tuple(root_module_types)):
            continue
        pruner = graph.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None or id(m) in visited:
            continue
        group = graph.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        prunable_group = True
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(id(dep.target.module))
                if dep.target.module in ignored_layers:
                    prunable_group = False
        if prunable_group:
            yield group


def _own_step(pruner) -> bool:
    """Whether the pruner steps with Torch-Pruning's own `step` and `_prune`."""
    base = tp.pruner.BasePruner
    return type(pruner).step is base.step and type(pruner)._prune is base._prune


@contextmanager
def mappings_cached(pruner):
    """Within the block (one step of the pruner: nothing else may prune in it), `pruner.DG`
    recomputes its index mappings only when something was pruned since, re-makes groups
    from their structure, and a magnitude importance scores without list indexing (see
    above); everything else of Torch-Pruning runs as it is. Other graphs are unaffected."""
    graph = pruner.DG
    current = _index_mapping.update_index_mapping
    if (getattr(graph, "_progprune_mappings", None) is not None or not _own_step(pruner)
            or current not in (_update_index_mapping, _TP_UPDATE_INDEX_MAPPING)):
        yield  # nested (the outer block's), a pruner of its own, or someone else's patch
        return
    _index_mapping.update_index_mapping = _update_index_mapping  # delegates unless opted in
    graph._progprune_mappings = _Cached(graph)
    graph.get_pruning_group = lambda module, pruning_fn, idxs: _get_pruning_group(graph, module, pruning_fn, idxs)
    graph.get_all_groups = lambda *a, **k: _all_groups(graph, *a, **k)
    importance = pruner.importance
    if _fast_importance(importance):
        pruner.importance = _MagnitudeFast(importance)
    try:
        yield
    finally:
        del graph._progprune_mappings, graph.get_pruning_group, graph.get_all_groups  # the class's
        pruner.importance = importance



# ---- the magnitude importance without Python-list indexing -----------------------------
# `GroupMagnitudeImportance.__call__` (group_norm, l1, l2, group_sl, growing_reg, lamp)
# takes every member's rows with `weight[idxs]` and sums with `scatter_add_(0,
# torch.tensor(root_idxs), ...)`, both from Python lists of up to thousands of ints: the list
# conversion costs far more than the arithmetic (2.5 ms against 0.1 ms for a 1536 x 384
# Linear). Groups hold runs of consecutive indices (every ranked group: all channels; through
# a concat: shifted by an offset), so here a run is taken as a slice (the same values, the
# same layout for a contiguous weight) and added where it sits (the same float additions as
# scatter_add_, in the same order). Everything else is upstream's code, op for op: the
# arithmetic (`_power`: the same values in one pass), its order and its dtypes, so the scores
# are bit-identical (tested step by step against upstream's). Other indices, weights or
# reductions take upstream's path.
_IMP = tp.importance.GroupMagnitudeImportance
_F = tp.pruner.function
_W_OUT = (_F.prune_conv_out_channels, _F.prune_linear_out_channels)
_W_IN = (_F.prune_conv_in_channels, _F.prune_linear_in_channels)
_NORM_OUT = (_F.prune_batchnorm_out_channels, _F.prune_layernorm_out_channels)


def _run(idxs):
    """slice(a, a + n) where `idxs` is the run a, a+1, ..., a+n-1 of ints (a >= 0), else None."""
    n = len(idxs)
    if not n or type(idxs[0]) is not int or idxs[0] < 0 or idxs[-1] != idxs[0] + n - 1:
        return None
    a = idxs[0]
    return slice(a, a + n) if (idxs if type(idxs) is list else list(idxs)) == list(range(a, a + n)) else None


def _fast_importance(imp) -> bool:
    """Whether `imp` is scored by `_magnitude` (upstream's __call__, _reduce; sum or mean)."""
    cls = type(imp)
    return (isinstance(imp, _IMP) and cls.__call__ is _IMP.__call__ and cls._reduce is _IMP._reduce
            and imp.group_reduction in ("mean", "sum"))


def _rows(t, idxs):
    """t[idxs] along dim 0 (a slice where idxs is a run and `t` contiguous)."""
    run = _run(idxs)
    if run is None or run.stop > t.shape[0] or not t.is_contiguous():
        return t[idxs]  # (out of range: upstream's IndexError)
    return t[run]


def _power(w, p):
    """`w.abs().pow(p)`, the same values and layout: x * x for p = 2 (upstream's pow with
    exponent 2 is base * base, and |x| * |x| == x * x exactly), else pow in place on abs's
    result; one pass and one tensor fewer over the largest weights."""
    return w * w if p == 2 and w.dtype in (torch.float32, torch.float64) else w.abs().pow_(p)


@torch.no_grad()
def _magnitude(imp, group):
    """`GroupMagnitudeImportance.__call__(imp, group)`, its list indexing taken as slices."""
    group_imp, group_idxs = [], []
    targets = tuple(imp.target_types)
    for i, (dep, idxs) in enumerate(group):
        layer, fn, root_idxs = dep.layer, dep.pruning_fn, group[i].root_idxs
        if not isinstance(layer, targets):
            continue
        if fn in _W_OUT:
            if hasattr(layer, "transposed") and layer.transposed:
                w = layer.weight.data.transpose(1, 0)[idxs].flatten(1)
            else:
                w = _rows(layer.weight.data, idxs).flatten(1)
            group_imp.append(_power(w, imp.p).sum(1))
            group_idxs.append(root_idxs)
            if imp.bias and layer.bias is not None:
                group_imp.append(_rows(layer.bias.data, idxs).abs().pow(imp.p))
                group_idxs.append(root_idxs)
        elif fn in _W_IN:
            if hasattr(layer, "transposed") and layer.transposed:
                w = layer.weight.data.flatten(1)
            else:
                w = layer.weight.data.transpose(0, 1).flatten(1)
            local_imp = _power(w, imp.p).sum(1)
            if fn == _F.prune_conv_in_channels and layer.groups != layer.in_channels and layer.groups != 1:
                local_imp = local_imp.repeat(layer.groups)
            group_imp.append(_rows(local_imp, idxs))
            group_idxs.append(root_idxs)
        elif fn in _NORM_OUT:
            if (layer.affine if fn == _NORM_OUT[0] else layer.elementwise_affine):
                group_imp.append(_rows(layer.weight.data, idxs).abs().pow(imp.p))
                group_idxs.append(root_idxs)
                if imp.bias and layer.bias is not None:
                    group_imp.append(_rows(layer.bias.data, idxs).abs().pow(imp.p))
                    group_idxs.append(root_idxs)
    if not group_imp:
        return None
    return imp._normalize(_reduce(imp, group_imp, group_idxs), imp.normalizer)


def _reduce(imp, group_imp, group_idxs):
    """`GroupMagnitudeImportance._reduce` for "sum" and "mean": a run of root indices is added
    as a slice, anything else scattered as upstream does."""
    reduced = torch.zeros_like(group_imp[0], dtype=torch.float32)
    n_imp = 0
    for part, root_idxs in zip(group_imp, group_idxs):
        part = part.to(reduced.device, dtype=reduced.dtype)
        run = _run(root_idxs)
        if run is not None and run.stop <= len(reduced) and len(part) == run.stop - run.start:
            reduced[run].add_(part)
        elif any(r is None for r in root_idxs):
            continue
        else:
            reduced.scatter_add_(0, torch.tensor(root_idxs, device=part.device), part)
        n_imp += 1
    if imp.group_reduction == "mean":
        reduced /= n_imp
    return reduced


class _MagnitudeFast:
    """The pruner's importance within `mappings_cached`: scored by `_magnitude`, everything
    else (attributes, methods) the wrapped importance's own."""

    def __init__(self, imp):
        self._imp = imp

    def __call__(self, group):
        return _magnitude(self._imp, group)

    def __getattr__(self, name):
        return getattr(self._imp, name)
