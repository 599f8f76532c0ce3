"""The groups a causal LM's pruning knows in advance, declared instead of traced.

A `UnitGroup` is a set of interchangeable units, each a contiguous block of indices in
every member tensor: rows ("out") or columns ("in") of a weight, or entries ("vec") of a
norm's weight and bias. The kinds:

- "heads": one layer's KV groups, each with its query heads across q/k/v/o;
- "mlp": one layer's MLP channels across gate/up/down (GPT-2: c_fc/c_proj);
- "hidden": the hidden size across the whole model: the embedding's columns, every
  q/k/v/gate/up input column, every o/down output row, every norm entry, the final norm and
  lm_head's columns (a tied lm_head is the embedding: cut once, re-tied);
- "layers": whole decoder layers (no members: a unit is a layer, removed from the list).

Pruning a unit removes its block from every member at once, so shapes stay consistent by
construction, with Torch-Pruning's `prune_linear_out_channels` / `prune_linear_in_channels` /
`prune_embedding_out_channels` and the same cut written out for transformers' `Conv1D`
(GPT-2, weight stored transposed) and for RMSNorm-style 1-D weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from .models import family

PER_LAYER_KEYS = ("layer_types",)  # config lists with one entry per decoder layer


@dataclass
class Member:
    module: nn.Module
    axis: str  # "out": weight rows (and the bias); "in": weight columns; "vec": 1-D weight+bias
    width: int  # indices per unit
    layer: int | None = None  # the decoder layer it belongs to (None: embeddings, final norm)


@dataclass
class UnitGroup:
    kind: str  # "heads", "mlp", "hidden" or "layers"
    layer: int  # the decoder layer (-1: the whole model)
    members: list[Member]
    units: int  # current number of units
    extra: dict = field(default_factory=dict)

    def blocks(self, module_member: Member, units) -> list[int]:
        w = module_member.width
        return [i for u in units for i in range(u * w, (u + 1) * w)]

    @torch.no_grad()
    def scores(self, how) -> torch.Tensor:
        """Per-unit importance summed over the unit's weights and biases in every member:
        `how` = p for sum |w|^p, or "taylor" for sum |w * dL/dw| (the gradient the last
        backward left in `.grad`; none counts as zero)."""
        if self.kind == "layers":
            return torch.stack([sum(_elementwise(p, how).sum().cpu() for p in layer.parameters())
                                for layer in self.extra["modules"]])
        total = torch.zeros(self.units, device=self.members[0].module.weight.device)
        for m in self.members:
            if m.axis == "vec":
                rows = _elementwise(m.module.weight, how)
            else:
                weight = _elementwise(m.module.weight, how)
                weight = weight.t() if _is_conv1d(m.module) else weight  # (out, in)
                rows = (weight.t() if m.axis == "in" else weight).sum(1)
            bias = getattr(m.module, "bias", None)
            if m.axis in ("out", "vec") and isinstance(bias, torch.Tensor):
                rows = rows + _elementwise(bias, how)
            total += rows.reshape(self.units, m.width).sum(1)
        return total.cpu()  # ranked beside seeded CPU draws, on any device

    def remove(self, units: list[int], skip_layers=()) -> None:
        for m in self.members:
            if m.layer is None or m.layer not in skip_layers:
                _prune(m.module, m.axis, self.blocks(m, sorted(units)))
        self.units -= len(units)


def _elementwise(p: torch.Tensor, how) -> torch.Tensor:
    w = p.detach().float()
    if how == "taylor":
        g = p.grad
        return torch.zeros_like(w) if g is None else (w * g.detach().float()).abs()
    return w.square() if how == 2 else w.abs() if how == 1 else w.abs().pow(how)


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _cut(p: nn.Parameter, dim: int, idxs: list[int]) -> nn.Parameter:
    cut = set(idxs)
    keep = torch.tensor([i for i in range(p.shape[dim]) if i not in cut], device=p.device)
    return nn.Parameter(p.detach().index_select(dim, keep).contiguous(), requires_grad=p.requires_grad)


def _prune(module, axis: str, idxs: list[int]) -> None:
    if not idxs:
        return
    if isinstance(module, nn.Linear):
        fn = tp.prune_linear_out_channels if axis == "out" else tp.prune_linear_in_channels
        fn(module, idxs)
    elif isinstance(module, nn.Embedding):  # only its columns (the hidden size) are cut
        tp.prune_embedding_out_channels(module, idxs)
    elif axis == "vec":  # a norm: LayerNorm or RMSNorm (weight, optional bias)
        module.weight = _cut(module.weight, 0, idxs)
        if isinstance(getattr(module, "bias", None), torch.Tensor):
            module.bias = _cut(module.bias, 0, idxs)
        if hasattr(module, "normalized_shape"):
            module.normalized_shape = (module.weight.shape[0],)
    elif _is_conv1d(module):  # weight (in, out)
        module.weight = _cut(module.weight, 1 if axis == "out" else 0, idxs)
        if axis == "out":
            if module.bias is not None:
                module.bias = _cut(module.bias, 0, idxs)
            module.nf = module.weight.shape[1]
    else:
        raise TypeError(f"cannot prune {type(module).__name__}")


def decoder_layers(model) -> nn.ModuleList:
    return model.transformer.h if family(model) == "gpt2" else model.model.layers


def is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _heads_group(i, attn) -> UnitGroup:
    hd = attn.head_dim
    n_kv = attn.k_proj.out_features // hd
    rep = attn.q_proj.out_features // hd // n_kv
    return UnitGroup("heads", i, [
        Member(attn.q_proj, "out", rep * hd, i), Member(attn.k_proj, "out", hd, i),
        Member(attn.v_proj, "out", hd, i), Member(attn.o_proj, "in", rep * hd, i)],
        units=n_kv, extra={"head_dim": hd, "rep": rep})


def _mlp_group(i, mlp, gpt2: bool) -> UnitGroup:
    if gpt2:
        return UnitGroup("mlp", i, [Member(mlp.c_fc, "out", 1, i), Member(mlp.c_proj, "in", 1, i)],
                         units=mlp.c_fc.nf)
    return UnitGroup("mlp", i, [Member(mlp.gate_proj, "out", 1, i), Member(mlp.up_proj, "out", 1, i),
                                Member(mlp.down_proj, "in", 1, i)], units=mlp.gate_proj.out_features)


def _hidden_group(model, layers) -> UnitGroup:
    """Llama-family: every tensor indexed by the residual stream's channels."""
    embed = model.get_input_embeddings()
    members = [Member(embed, "in", 1)]
    for i, layer in enumerate(layers):
        a, m = layer.self_attn, layer.mlp
        members += [Member(layer.input_layernorm, "vec", 1, i),
                    Member(layer.post_attention_layernorm, "vec", 1, i),
                    *(Member(p, "in", 1, i) for p in (a.q_proj, a.k_proj, a.v_proj)),
                    Member(a.o_proj, "out", 1, i),
                    *(Member(p, "in", 1, i) for p in (m.gate_proj, m.up_proj)),
                    Member(m.down_proj, "out", 1, i)]
    members.append(Member(model.model.norm, "vec", 1))
    if not is_tied(model):
        members.append(Member(model.get_output_embeddings(), "in", 1))
    hd = layers[0].self_attn.head_dim
    return UnitGroup("hidden", -1, members, units=embed.weight.shape[1], extra={"head_dim": hd})


def declare(model, dims) -> list[UnitGroup]:
    """The groups of the kinds in `dims` (checked by the caller against the family)."""
    gpt2 = family(model) == "gpt2"
    layers = decoder_layers(model)
    groups: list[UnitGroup] = []
    for i, layer in enumerate(layers):
        if "heads" in dims:
            groups.append(_heads_group(i, layer.self_attn))
        if "mlp" in dims:
            groups.append(_mlp_group(i, layer.mlp, gpt2))
    if "hidden" in dims:
        groups.append(_hidden_group(model, layers))
    if "layers" in dims:
        groups.append(UnitGroup("layers", -1, [], units=len(layers), extra={"modules": list(layers)}))
    return groups


def remove_layers(model, idxs) -> None:
    """Drop decoder layers `idxs`, renumber the rest's `layer_idx` (the KV cache's slot) and
    trim the config (num_hidden_layers, per-layer lists) so that it reloads."""
    idxs = set(idxs)
    if not idxs:
        return
    layers = decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in idxs]
    kept = [layers[i] for i in keep]
    for new, layer in enumerate(kept):
        attn = layer.attn if hasattr(layer, "attn") else layer.self_attn
        old = attn.layer_idx
        attn.layer_idx = new
        if getattr(attn, "scale_attn_by_inverse_layer_idx", False):  # GPT-2 option
            attn.scaling *= (old + 1) / (new + 1)
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new
    holder = model.transformer if hasattr(model, "transformer") else model.model
    if hasattr(holder, "h"):
        holder.h = nn.ModuleList(kept)
    else:
        holder.layers = nn.ModuleList(kept)
    cfg = model.config
    for key in PER_LAYER_KEYS:
        values = getattr(cfg, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(cfg, key, [values[i] for i in keep])
    cfg.num_hidden_layers = len(kept)


def sync_config(model, widths: dict, head_info: dict | None) -> None:
    """Write the (uniform) widths back into the config so save_pretrained reloads.
    `widths`: kind -> units kept ("heads": KV groups); `head_info`: {"rep", "head_dim"}."""
    cfg = model.config
    if "heads" in widths:
        cfg.num_key_value_heads = widths["heads"]
        cfg.num_attention_heads = widths["heads"] * head_info["rep"]
    if "mlp" in widths:
        if family(model) == "gpt2":
            cfg.n_inner = widths["mlp"]
        else:
            cfg.intermediate_size = widths["mlp"]
    if "hidden" in widths:
        cfg.hidden_size = widths["hidden"]
    if head_info and ("heads" in widths or "hidden" in widths):
        cfg.head_dim = head_info["head_dim"]  # kept: not hidden_size // heads any more
