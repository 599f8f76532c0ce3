"""One pruning step, planned before it is pruned: the step's selection (what
`pruner.step()` would prune), split into the items that may go on their own, trimmed to
what the per-layer cap allows and, at the step that crosses the target, cut down to land
within the tolerance. docs/design.md, "The progressive loop", says why."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from progprune import _tp
from progprune.macs import CUT_TYPES, MacsCounter

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

_COUNTED = CUT_TYPES


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
    plan = []
    with _tp.scores_recorded(pruner) as scores, _tp.one_step(pruner):
        for group in pruner.step(interactive=True):
            cuts = [c for c in _tp.members(pruner, group) if isinstance(c[0], _COUNTED)]
            plan.append(_Planned(*_tp.root(group), cuts, _tp.channel_groups(pruner, group)))
    return plan, scores


def _apply(pruner, plan: list[_Planned], keep: dict | None = None) -> None:
    """Prune the planned groups in their yield order, each re-derived from the current
    graph. `keep` maps plan index -> the root indices to prune (default: all)."""
    for i, p in enumerate(plan):
        idxs = p.idxs if keep is None else sorted(keep.get(i, ()))
        if not idxs and keep is not None:
            continue  # (a whole step prunes empty groups too: the history then matches)
        _tp.prune_group(pruner, p.module, p.handler, idxs)


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
            width = _tp.width(pruner, p.module, p.handler)
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


def _by_group(items: list[_Item]) -> dict:
    """plan index -> the root indices of `items` in that group (what `_apply` keeps)."""
    keep: dict = {}
    for it in items:
        keep.setdefault(it.group, set()).update(it.roots)
    return keep


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
    for item in items:
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
        self.floor: dict = {}
        for module in _tp.initial_out_modules(pruner):
            width = _tp.out_channels(pruner, module)
            if width:  # 1e-9: 10 * (1 - 0.3) is 7.000000000000001, and its floor is 7
                self.floor[module] = min(width, math.ceil(width * (1.0 - self.ratio) - 1e-9))

    def room(self, pruner, modules) -> int | None:
        """How many channels a group whose members are `modules` [(module, is_out)] may
        still lose (None: no member is capped)."""
        room = None
        for module, is_out in modules:
            if is_out and module in self.floor:
                left = (_tp.out_channels(pruner, module) or 0) - self.floor[module]
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
        for group in _tp.all_groups(pruner):
            if not _tp.ranked(pruner, group):
                continue
            room = self.room(pruner, [(m, o) for m, o, _, _ in _tp.members(pruner, group)])
            if room is None:
                return False
            ch_groups = _tp.channel_groups(pruner, group)
            width = _tp.out_channels(pruner, _tp.root(group)[0]) or 0
            unit = ch_groups if ch_groups > 1 else (
                (width % pruner.round_to or pruner.round_to) if pruner.round_to else 1)
            if room >= unit and width > 1:
                return False
        return True


def planned_step(pruner, counter, target_macs: float, tolerance: float,
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
        _apply(pruner, plan, _by_group(chosen))
    pruned = sum(len(it.roots) for it in chosen)
    return kind, ([pruned, selected] if cross else None), pruned
