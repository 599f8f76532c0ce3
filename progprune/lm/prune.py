"""Progressive pruning of a causal LM's declared groups to a params or MACs target.

Every layer keeps the same widths (transformers' configs hold one head count, one MLP width,
one hidden size for all layers), so a step decides one number per dim: KV groups kept,
MLP channels kept, hidden channels kept, decoder layers kept. They follow one ratio r of
their starting widths, each rounded up (`max(1, ceil(r * start))`: a KV group or a layer goes
only once the finer dims have given up that share), and the step takes the largest r whose
count (lm/count.py, exact, planned before cutting) is at or below the step's goal. Each layer
then removes its own lowest-importance units to reach the widths; the hidden size and the
layers are ranked model-wide. The target is approached in `steps` equal steps of the
metric, importance re-measured on the current model at each.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch_pruning as tp

from ..errors import BadInput
from .count import Counter
from .groups import UnitGroup, declare, decoder_layers, is_tied, remove_layers, sync_config
from ..sections import DEFAULT_LM_DIMS, LM_DIMS
from .models import FAMILIES, family

IMPORTANCES = {"l1": 1, "l2": 2, "random": None, "taylor": "taylor"}
DIMS = LM_DIMS
DEFAULT_DIMS = DEFAULT_LM_DIMS  # the schema's pruning.dims (dims=None)
METRICS = ("params", "macs")


def count_params(model) -> int:
    """All parameters, embeddings included, as Torch-Pruning counts them."""
    return int(tp.utils.count_params(model))


def count_macs(model, seq_len: int = 128) -> int:
    """MACs per token at `seq_len` (what lm/count.py counts)."""
    return Counter(model, [], seq_len).count("macs", {})


@dataclass
class LmPruneResult:
    base_params: int
    params: int
    target_params: float | None  # the target in parameters (metric "params")
    heads: tuple[int, int] | None  # (attention heads, KV heads) kept per layer
    intermediate: int | None  # MLP channels kept per layer
    history: list[dict] = field(default_factory=list)  # {step, params, macs, kv, inner, hidden, layers}
    metric: str = "params"
    target: float = 0.0  # base / speedup, in `metric`
    base_macs: int = 0  # MACs per token at seq_len
    macs: int = 0
    hidden: int | None = None  # hidden size
    layers: int | None = None  # decoder layers
    steps: int = 0
    seconds: float = 0.0
    achieved: float = 1.0  # base / current, in `metric`

    @property
    def speedup(self) -> float:
        return self.base_params / self.params


def _check(model, speedup, metric, importance, steps, dims, calib):
    if importance not in IMPORTANCES:
        raise BadInput(f"importance {importance!r} does not apply to causal LMs; use one of "
                       f"{', '.join(IMPORTANCES)}", field="pruning.method")
    if metric not in METRICS:
        raise BadInput(f"target metric {metric!r} is not one for causal LMs; use one of "
                       f"{', '.join(METRICS)}", field="pruning.target_metric")
    if speedup < 1 or steps < 1:
        raise BadInput(f"speedup must be >= 1 and steps >= 1 (got {speedup}, {steps})",
                       field="speedup")
    kind = family(model)
    dims = DEFAULT_DIMS if dims is None else tuple(dims)
    for d in dims:
        if d not in DIMS:
            raise BadInput(f"pruning dim {d!r} is unknown; use some of {', '.join(DIMS)}",
                           field="pruning.dims")
    if tuple(sorted(dims)) == tuple(sorted(DEFAULT_DIMS)):  # the default: what the family has
        dims = tuple(d for d in dims if d in FAMILIES[kind])
    for d in dims:
        if d not in FAMILIES[kind]:
            raise BadInput(f"pruning dim {d!r} does not reload in transformers for {kind}; "
                           f"{kind} prunes {', '.join(FAMILIES[kind])}", field="pruning.dims")
    if not dims:
        raise BadInput("pruning.dims is empty; use some of " + ", ".join(DIMS), field="pruning.dims")
    if importance == "taylor":
        if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long:
            raise BadInput("importance 'taylor' needs a calibration batch of token ids "
                           "(a LongTensor [batch, seq_len])", field="pruning.method")
        vocab = model.get_input_embeddings().weight.shape[0]
        if calib.numel() == 0 or calib.min() < 0 or calib.max() >= vocab:
            raise BadInput(f"calibration token ids must lie in 0..{vocab - 1}", field="pruning.method")
    return dims


def _widths(groups: list[UnitGroup], model) -> dict:
    """kind -> units per group now (uniform across layers)."""
    out = {}
    for g in groups:
        out.setdefault(g.kind, g.units)
        assert out[g.kind] == g.units, f"layers differ in {g.kind}: {out[g.kind]} vs {g.units}"
    return out


def _fit(model, w: dict) -> dict:
    """Widths transformers reloads: its LlamaConfig refuses a hidden size that is not a
    multiple of the attention heads (even with an explicit head_dim), so a Llama keeps a
    head count that divides its hidden size, or a hidden size rounded down to a multiple of
    its heads."""
    if family(model) != "llama" or not ({"heads", "hidden"} & set(w)):
        return w
    cfg = model.config
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    kv, hidden = w.get("heads", cfg.num_key_value_heads), w.get("hidden", cfg.hidden_size)
    if "hidden" in w:
        hidden = max(kv * rep, hidden // (kv * rep) * kv * rep)
    else:
        kv = max(k for k in range(1, kv + 1) if hidden % (k * rep) == 0)
    return {**w, **({"heads": kv} if "heads" in w else {}), **({"hidden": hidden} if "hidden" in w else {})}


def _ladder(model, start: dict, now: dict) -> list[dict]:
    """Candidate widths from the widest to the narrowest, all dims on one ratio r of their
    starting widths (rounded up, at least 1, never wider than now)."""
    ratios = sorted({k / n for n in start.values() for k in range(1, n + 1)}, reverse=True)
    return [_fit(model, {d: min(now[d], max(1, math.ceil(start[d] * r - 1e-9))) for d in start})
            for r in ratios]


def _plan(counter: Counter, metric: str, ladder: list[dict], goal: float) -> dict:
    """The widest widths of the ladder whose count is <= goal (the narrowest if none is)."""
    lo, hi = 0, len(ladder)  # the count falls along the ladder: bisect for the first <= goal
    while lo < hi:
        mid = (lo + hi) // 2
        if counter.count(metric, ladder[mid]) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return ladder[min(lo, len(ladder) - 1)]


def _taylor_grads(model, calib: torch.Tensor) -> None:
    """One causal-LM loss backward on `calib`: gradients in every parameter's `.grad`."""
    model.zero_grad(set_to_none=True)
    ids = calib.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()  # no dropout: the ranking is the model's, not a random mask's
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
            loss.backward()
    finally:
        model.train(was_training)


def _step(model, groups, widths, how, gen) -> None:
    """Score every group on the current model, then cut to `widths` (layers last)."""
    order = {}
    for n, g in enumerate(groups):
        if g.units > widths[g.kind]:
            s = torch.rand(g.units, generator=gen) if how is None else g.scores(how)
            order[n] = torch.argsort(s, stable=True)[: g.units - widths[g.kind]].tolist()
    gone = set()
    for n, g in enumerate(groups):
        if g.kind == "layers" and n in order:
            gone = set(order[n])
    tied = is_tied(model)
    for n, g in enumerate(groups):
        if n in order and g.kind != "layers" and g.layer not in gone:
            g.remove(order[n], skip_layers=gone)
    if tied and "hidden" in widths:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    remove_layers(model, gone)


def prune_lm(model, speedup: float, *, metric: str = "params", importance: str = "l2",
             steps: int = 8, dims=None, seed: int = 0, calib=None, seq_len: int = 128,
             on_step=None) -> LmPruneResult:
    """Prune `model` in place until its `metric` ("params": all parameters; "macs": MACs per
    token at `seq_len`, see lm/count.py) is at most base / `speedup`, in `steps` equal steps.

    `dims`: some of heads, mlp, hidden, layers (the default heads+mlp takes what the family
    has: GPT-2 prunes its MLP only). `importance`: l1, l2 (sum |w|^p over a unit), random
    (seeded), taylor (sum |w * dL/dw| over a unit, the gradient of the causal-LM loss on
    `calib`, token ids [batch, seq], recomputed each step). `on_step(step, steps, achieved)`
    reports progress. The config is kept in step (widths, explicit head_dim, layer lists)."""
    t0 = time.perf_counter()
    dims = _check(model, speedup, metric, importance, steps, dims, calib)
    how = IMPORTANCES[importance]
    groups = declare(model, dims)
    counter = Counter(model, groups, seq_len)
    start = _widths(groups, model)
    head_info = next(({"rep": g.extra["rep"], "head_dim": g.extra["head_dim"]}
                      for g in groups if g.kind == "heads"), None)
    if head_info is None and "hidden" in start:
        attn = decoder_layers(model)[0].self_attn
        head_info = {"rep": attn.num_key_value_groups, "head_dim": attn.head_dim}
    base = counter.count(metric, start)
    target = base / speedup
    floor = counter.count(metric, _ladder(model, start, start)[-1])
    if floor > target:
        what = "parameters" if metric == "params" else f"MACs per token at seq_len {seq_len}"
        raise BadInput(f"{speedup}x {metric} is out of reach for this model: pruning "
                       f"{'/'.join(dims)} as far as it reloads leaves {floor} of {base} {what} "
                       f"({base / floor:.2f}x); lower --speedup", field="speedup")
    gen = torch.Generator().manual_seed(seed)
    base_params, base_macs = count_params(model), count_macs(model, seq_len)
    result = LmPruneResult(base_params, base_params, target if metric == "params" else None,
                           None, None, metric=metric, target=target, base_macs=base_macs,
                           macs=base_macs, steps=steps)
    for s in range(1, steps + 1):
        goal = base - (base - target) * s / steps
        groups = declare(model, dims)
        now = _widths(groups, model)
        widths = _plan(Counter(model, groups, seq_len), metric, _ladder(model, start, now), goal)
        if how == "taylor":
            _taylor_grads(model, calib)
        _step(model, groups, widths, how, gen)
        model.zero_grad(set_to_none=True)
        sync_config(model, widths, head_info)
        params, macs = count_params(model), count_macs(model, seq_len)
        result.history.append({"step": s, "params": params, "macs": macs,
                               "kv": widths.get("heads"), "inner": widths.get("mlp"),
                               "hidden": widths.get("hidden"), "layers": len(decoder_layers(model))})
        if on_step is not None:
            on_step(s, steps, base / (params if metric == "params" else macs))
    result.params, result.macs = count_params(model), count_macs(model, seq_len)
    result.achieved = base / (result.params if metric == "params" else result.macs)
    last = result.history[-1]
    if "heads" in start:
        result.heads = (last["kv"] * head_info["rep"], last["kv"])
    result.intermediate = last["inner"]
    result.hidden = model.get_input_embeddings().weight.shape[1]
    result.layers = last["layers"]
    result.seconds = time.perf_counter() - t0
    return result


def prune_to_params(model, speedup: float, *, importance: str, steps: int,
                    dims=None, seed: int = 0) -> LmPruneResult:
    """Prune `model` in place until its parameters are at most base / `speedup`."""
    return prune_lm(model, speedup, metric="params", importance=importance, steps=steps,
                    dims=dims, seed=seed)
