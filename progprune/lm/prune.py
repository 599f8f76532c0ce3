"""Progressive pruning of a causal LM's declared groups to a parameter target.

Every layer keeps the same widths (transformers' configs hold one head count and one MLP
width for all layers), so a step decides two numbers, the KV groups kept and the MLP
channels kept, and each layer removes its own lowest-importance units to reach them. Heads
follow the MLP's ratio (ceil: a KV group goes only once the MLP has given up its share).
The target is approached in `steps` equal parameter steps, importance re-measured each step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch_pruning as tp

from ..errors import BadInput
from .groups import UnitGroup, declare, sync_config

IMPORTANCES = {"l1": 1, "l2": 2, "random": None}


def count_params(model) -> int:
    """All parameters, embeddings included, as Torch-Pruning counts them."""
    return int(tp.utils.count_params(model))


@dataclass
class LmPruneResult:
    base_params: int
    params: int
    target_params: float
    heads: tuple[int, int] | None  # (attention heads, KV heads) kept per layer
    intermediate: int | None  # MLP channels kept per layer
    history: list[dict] = field(default_factory=list)  # per step: params, kv, inner

    @property
    def speedup(self) -> float:
        return self.base_params / self.params


def _by_kind(groups, kind) -> list[UnitGroup]:
    return [g for g in groups if g.kind == kind]


def _candidates(heads, mlp, kv0: int | None, inner0: int | None):
    """(kv kept, inner kept) from the widest down, heads following the MLP's ratio."""
    kv_cur = heads[0].units if heads else None
    if mlp:
        for inner in range(mlp[0].units, 0, -1):
            kv = min(kv_cur, max(1, math.ceil(kv0 * inner / inner0 - 1e-9))) if heads else None
            yield kv, inner
    else:
        for kv in range(kv_cur, 0, -1):
            yield kv, None


def _params_after(current: int, heads, mlp, kv, inner) -> int:
    cut = 0
    if heads:
        cut += len(heads) * (heads[0].units - kv) * heads[0].unit_numel()
    if mlp:
        cut += len(mlp) * (mlp[0].units - inner) * mlp[0].unit_numel()
    return current - cut


def _plan(groups, current: int, goal: float, kv0, inner0):
    heads, mlp = _by_kind(groups, "heads"), _by_kind(groups, "mlp")
    last = None
    for kv, inner in _candidates(heads, mlp, kv0, inner0):
        last = (kv, inner)
        if _params_after(current, heads, mlp, kv, inner) <= goal:
            return kv, inner, True
    return (*last, False)


def _scores(group: UnitGroup, importance: str, gen: torch.Generator) -> torch.Tensor:
    p = IMPORTANCES[importance]
    return torch.rand(group.units, generator=gen) if p is None else group.scores(p)


def prune_to_params(model, speedup: float, *, importance: str, steps: int,
                    dims=("heads", "mlp"), seed: int = 0) -> LmPruneResult:
    """Prune `model` in place until its parameters are at most base / `speedup`."""
    if importance not in IMPORTANCES:
        raise BadInput(f"importance {importance!r} does not apply to causal LMs; use one of "
                       f"{', '.join(IMPORTANCES)}", field="pruning.method")
    if speedup < 1 or steps < 1:
        raise BadInput(f"speedup must be >= 1 and steps >= 1 (got {speedup}, {steps})",
                       field="speedup")
    groups = declare(model, dims)
    heads, mlp = _by_kind(groups, "heads"), _by_kind(groups, "mlp")
    kv0 = heads[0].units if heads else None
    inner0 = mlp[0].units if mlp else None
    base = count_params(model)
    target = base / speedup
    floor = _params_after(base, heads, mlp, 1 if heads else None, 1 if mlp else None)
    if floor > target:
        raise BadInput(f"{speedup}x params is out of reach for this model: pruning "
                       f"{'/'.join(dims)} to one unit per layer leaves {floor} of {base} "
                       f"parameters ({base / floor:.2f}x); lower --speedup", field="speedup")
    gen = torch.Generator().manual_seed(seed)
    result = LmPruneResult(base, base, target, None, None)
    for s in range(1, steps + 1):
        goal = base - (base - target) * s / steps
        kv, inner, _ = _plan(groups, count_params(model), goal, kv0, inner0)
        for g in groups:
            keep = kv if g.kind == "heads" else inner
            if g.units > keep:
                order = torch.argsort(_scores(g, importance, gen), stable=True)
                g.remove(order[: g.units - keep].tolist())
        result.history.append({"step": s, "params": count_params(model), "kv": kv, "inner": inner})
    sync_config(model, groups)
    result.params = count_params(model)
    if heads:
        result.heads = (heads[0].units * heads[0].extra["rep"], heads[0].units)
    result.intermediate = inner if mlp else None
    return result
