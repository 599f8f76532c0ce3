"""The groups a causal LM's pruning knows in advance, declared instead of traced.

A `UnitGroup` is one layer's set of interchangeable units (a KV group of attention heads, or
one MLP channel), each unit a contiguous block of indices in every member layer: rows
("out") or columns ("in") of a weight. Pruning a unit removes its block from every member
at once, so shapes stay consistent by construction, with Torch-Pruning's
`prune_linear_out_channels` / `prune_linear_in_channels` for `nn.Linear` and the same cut
for transformers' `Conv1D` (GPT-2, weight stored transposed).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from .models import FAMILIES, family


@dataclass
class Member:
    module: nn.Module
    axis: str  # "out": output features (weight rows of a Linear, and its bias); "in": inputs
    width: int  # indices per unit


@dataclass
class UnitGroup:
    kind: str  # "heads" or "mlp"
    layer: int
    members: list[Member]
    units: int  # current number of units
    extra: dict = field(default_factory=dict)

    def blocks(self, module_member: Member, units) -> list[int]:
        w = module_member.width
        return [i for u in units for i in range(u * w, (u + 1) * w)]

    def unit_numel(self) -> int:
        """Parameters one unit holds, across members (weights and the biases it cuts)."""
        n = 0
        for m in self.members:
            weight = _weight_rows_out(m.module)  # (out, in) view
            n += m.width * (weight.shape[1] if m.axis == "out" else weight.shape[0])
            if m.axis == "out" and getattr(m.module, "bias", None) is not None:
                n += m.width
        return n

    @torch.no_grad()
    def scores(self, p: int) -> torch.Tensor:
        """Per-unit magnitude: sum of |w|^p over the unit's weights and biases in every member."""
        total = torch.zeros(self.units)
        for m in self.members:
            weight = _weight_rows_out(m.module).detach().float()
            if m.axis == "in":
                weight = weight.t()
            rows = weight.abs().pow(p).sum(1)
            bias = getattr(m.module, "bias", None)
            if m.axis == "out" and bias is not None:
                rows = rows + bias.detach().float().abs().pow(p)
            total += rows.reshape(self.units, m.width).sum(1)
        return total

    def remove(self, units: list[int]) -> None:
        for m in self.members:
            _prune(m.module, m.axis, self.blocks(m, sorted(units)))
        self.units -= len(units)


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _weight_rows_out(module) -> torch.Tensor:
    """The weight as (out, in), whatever the layer stores."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def _prune(module, axis: str, idxs: list[int]) -> None:
    if not idxs:
        return
    if isinstance(module, nn.Linear):
        fn = tp.prune_linear_out_channels if axis == "out" else tp.prune_linear_in_channels
        fn(module, idxs)
        return
    if not _is_conv1d(module):
        raise TypeError(f"cannot prune {type(module).__name__}")
    w = module.weight  # Conv1D: (in, out)
    dim = 1 if axis == "out" else 0
    cut = set(idxs)
    keep = [i for i in range(w.shape[dim]) if i not in cut]
    keep_t = torch.tensor(keep, device=w.device)
    module.weight = nn.Parameter(w.detach().index_select(dim, keep_t).contiguous(),
                                 requires_grad=w.requires_grad)
    if axis == "out":
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.detach()[keep_t].contiguous(),
                                       requires_grad=module.bias.requires_grad)
        module.nf = len(keep)


def _layers(model, kind: str):
    return model.transformer.h if kind == "gpt2" else model.model.layers


def declare(model, dims=("heads", "mlp")) -> list[UnitGroup]:
    """Every decoder layer's groups of the kinds in `dims` that the family can prune."""
    kind = family(model)
    wanted = [d for d in dims if d in FAMILIES[kind]]
    groups: list[UnitGroup] = []
    for i, layer in enumerate(_layers(model, kind)):
        if "heads" in wanted:
            attn = layer.self_attn
            hd = attn.head_dim
            n_kv = attn.k_proj.out_features // hd
            rep = attn.q_proj.out_features // hd // n_kv
            groups.append(UnitGroup("heads", i, [
                Member(attn.q_proj, "out", rep * hd), Member(attn.k_proj, "out", hd),
                Member(attn.v_proj, "out", hd), Member(attn.o_proj, "in", rep * hd)],
                units=n_kv, extra={"head_dim": hd, "rep": rep}))
        if "mlp" in wanted:
            mlp = layer.mlp
            if kind == "gpt2":
                members = [Member(mlp.c_fc, "out", 1), Member(mlp.c_proj, "in", 1)]
                inner = mlp.c_fc.nf
            else:
                members = [Member(mlp.gate_proj, "out", 1), Member(mlp.up_proj, "out", 1),
                           Member(mlp.down_proj, "in", 1)]
                inner = mlp.gate_proj.out_features
            groups.append(UnitGroup("mlp", i, members, units=inner))
    if not groups:
        raise ValueError(f"nothing to prune in {kind} with dims {list(dims)}")
    return groups


def sync_config(model, groups: list[UnitGroup]) -> None:
    """Write the (uniform) widths back into the config so save_pretrained reloads."""
    kind = family(model)
    cfg = model.config
    heads = [g for g in groups if g.kind == "heads"]
    mlp = [g for g in groups if g.kind == "mlp"]
    if heads:
        counts = {g.units for g in heads}
        assert len(counts) == 1, f"layers differ in KV groups: {counts}"
        g = heads[0]
        cfg.num_key_value_heads = g.units
        cfg.num_attention_heads = g.units * g.extra["rep"]
        cfg.head_dim = g.extra["head_dim"]  # kept: not hidden_size // heads any more
    if mlp:
        counts = {g.units for g in mlp}
        assert len(counts) == 1, f"layers differ in MLP width: {counts}"
        if kind == "gpt2":
            cfg.n_inner = mlp[0].units
        else:
            cfg.intermediate_size = mlp[0].units
