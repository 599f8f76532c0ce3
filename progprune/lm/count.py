"""Parameters and MACs per token of a causal LM, for widths not cut yet (the planner's
question: "what would the model count if each layer kept these many units?").

Every tensor's dims are either fixed or "units of group kind K x width w" (from the declared
groups: a q_proj row block is `rep * head_dim` per KV group, a hidden column is 1 per
channel). Decoder layers all have the same widths (transformers' configs hold one of each),
so layer 0's tensors stand for every layer, times the number of layers kept.

- params: every parameter once (a tied lm_head is the embedding), as
  `tp.utils.count_params` counts them; exact.
- MACs per token at `seq_len`: the multiply-accumulates of a forward of one [1, seq_len]
  sequence, divided by seq_len: every nn.Linear / Conv1D (in x out each token: q/k/v/o,
  the MLP, lm_head; GPT-2's c_attn/c_proj/c_fc), plus per layer the attention's score and
  value matmuls, QK^T and AV, 2 x seq_len x (heads x head_dim) a token (the full
  seq_len x seq_len product, as eager and SDPA attention compute it, causal mask or not).
  Not counted: embedding lookups, norms, activations, RoPE, softmax, residual adds
  (elementwise, O(hidden) a token). Equal to torch.utils.flop_counter's count / 2
  (tests/test_lm.py).
"""
from __future__ import annotations

import math

import torch.nn as nn

from .groups import UnitGroup, _is_conv1d, decoder_layers, is_tied


def _axes(model, groups: list[UnitGroup]) -> dict:
    """(id(module), axis) -> (kind, width) for every declared member."""
    axes = {}
    for g in groups:
        for m in g.members:
            axes[(id(m.module), m.axis)] = (g.kind, m.width)
    if any(g.kind == "hidden" for g in groups) and is_tied(model):
        axes[(id(model.get_output_embeddings()), "in")] = ("hidden", 1)  # its MACs
    return axes


def _weight_dims(module, p, axes) -> tuple:
    """The (out, in) dims of a 2-D weight, symbolic where a group cuts them."""
    out, inn = (p.shape[1], p.shape[0]) if _is_conv1d(module) else (p.shape[0], p.shape[1])
    return (axes.get((id(module), "out"), out), axes.get((id(module), "in"), inn))


class Counter:
    """The counts of `model` at any widths of its declared groups' kinds."""

    def __init__(self, model, groups: list[UnitGroup], seq_len: int):
        self.seq_len = int(seq_len)
        axes = _axes(model, groups)
        layers = decoder_layers(model)
        self.layers = len(layers)
        later = {id(p) for layer in list(layers)[1:] for p in layer.parameters()}
        first = {id(p) for p in layers[0].parameters()}
        later_mods = {id(m) for layer in list(layers)[1:] for m in layer.modules()}
        first_mods = {id(m) for m in layers[0].modules()}
        self.params: list[tuple[tuple, bool]] = []  # (dims, per layer)
        self.macs: list[tuple[tuple, bool]] = []
        seen = set()
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen or id(p) in later:
                    continue
                seen.add(id(p))
                if p.dim() == 2:
                    dims = _weight_dims(module, p, axes)
                elif p.dim() == 1:  # a bias (its rows) or a norm's vector
                    dims = (axes.get((id(module), "out"), axes.get((id(module), "vec"), p.shape[0])),)
                else:
                    dims = tuple(p.shape)
                self.params.append((dims, id(p) in first))
            if (isinstance(module, nn.Linear) or _is_conv1d(module)) and id(module) not in later_mods:
                self.macs.append((_weight_dims(module, module.weight, axes), id(module) in first_mods))
        attn = layers[0].self_attn if hasattr(layers[0], "self_attn") else layers[0].attn
        if hasattr(attn, "q_proj"):
            self.query = _weight_dims(attn.q_proj, attn.q_proj.weight, axes)[0]
        else:  # GPT-2: c_attn holds q, k, v, each n_embd wide
            self.query = attn.c_attn.nf // 3

    @staticmethod
    def _size(dim, units: dict) -> int:
        return dim if isinstance(dim, int) else units[dim[0]] * dim[1]

    def _sum(self, terms, units: dict, n_layers: int) -> int:
        total = 0
        for dims, per_layer in terms:
            n = math.prod(self._size(d, units) for d in dims)
            total += n * n_layers if per_layer else n
        return total

    def count(self, metric: str, units: dict) -> int:
        """`metric` ("params" or "macs") with `units[kind]` units per group of each declared
        kind ("layers": decoder layers kept; absent: as now)."""
        n_layers = units.get("layers", self.layers)
        if metric == "params":
            return self._sum(self.params, units, n_layers)
        attention = 2 * self.seq_len * self._size(self.query, units)
        return self._sum(self.macs, units, n_layers) + n_layers * attention
