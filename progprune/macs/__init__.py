"""MACs counting that costs no forward pass per pruning step.

Channel pruning changes layer widths, never spatial sizes. So one traced forward pass
records, for every counted module call, the sizes that pruning cannot change (output
positions, kernel size, leading dims); afterwards MACs are recomputed from the layers'
current widths alone, in microseconds. The formulas are those of
`torch_pruning.utils.count_ops_and_params` (conv/linear incl. bias, 2x elements for
affine BN, elements for activations and pooling, zero for functional ops), and the
result is cross-checked against it at the start and end of every prune.

Activations and pools carry no width of their own: each call is tied to the layers whose
output widths its input's channels are (`_trace.Widths`: followed by tensor identity
through functional ops, summed over `torch.cat`), else to the most recent module call
whose output had the same shape as its input. Attention is counted whole, as
Torch-Pruning counts it (its formula for `nn.MultiheadAttention` and for timm's
`Attention`; the layers inside such a module count nothing, as there).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch_pruning as tp

from progprune._tp import COUNTED_BY_TP, TIMM_ATTENTION
from progprune.macs._trace import Widths

_ACTS = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.GELU)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LNS = (nn.LayerNorm,)
_MHA = (nn.MultiheadAttention,)
# Torch-Pruning counts a module by its exact type (a subclass, such as timm's BatchNormAct2d
# or LayerNorm2d, counts nothing there), so the fast counter hooks exact types too.
_MODELED = frozenset((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + _ACTS + _POOLS + _BNS + _LNS + _MHA
                     + TIMM_ATTENTION) & frozenset(COUNTED_BY_TP)
# Any other module type that tp counts makes the fast counter decline (exact fallback).
_UNSUPPORTED = frozenset(t for t in COUNTED_BY_TP if t not in _MODELED)
# The layers whose planned cuts change the count (what the crossing step records per group).
CUT_TYPES = (nn.modules.conv._ConvNd, nn.Linear) + _BNS + _LNS + _MHA


def count_exact(model: nn.Module, example_inputs) -> tuple[int, int]:
    """MACs and params as torch-pruning reports them (deep copy + forward)."""
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def counted_modules(model: nn.Module) -> list[nn.Module]:
    """The modules Torch-Pruning's count adds up: those of a counted type, but not inside
    another one (its total stops at the first counted module: an attention's qkv and proj
    Linears count nothing, the attention's own formula covers them)."""
    out, todo = [], [model]
    while todo:
        m = todo.pop()
        if type(m) in COUNTED_BY_TP:
            out.append(m)
        else:
            todo.extend(reversed(list(m.children())))
    return out


def _width(module: nn.Module, out: bool = True) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.weight.shape[0] if out else module.weight.shape[1] * module.groups
    if isinstance(module, nn.Linear):
        return module.weight.shape[0] if out else module.weight.shape[1]
    if isinstance(module, _BNS):
        return module.num_features
    if isinstance(module, _LNS):
        return module.normalized_shape[-1]
    if isinstance(module, _MHA):
        return module.embed_dim
    raise TypeError(type(module))


def _out_cut(module: nn.Module, cut: dict) -> int:
    """Channels a planned cut removes from `module`'s output. Norms and MHA have one width,
    whichever way the group reaches them."""
    c = cut.get(module, (0, 0))
    return c[0] if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) else max(c)


def _widths(srcs: tuple, cut: dict | None = None) -> int:
    return sum(_width(s) - (_out_cut(s, cut) if cut else 0) for s in srcs)


class MacsCounter:
    """Recomputes MACs of a model from its current layer widths.

    `ok` is False when the model holds a module type this counter does not model, or when
    its first count disagrees with torch-pruning's; callers then count exactly instead.
    `reason` then says why, naming the layer kinds, for the log.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, expected: int | None = None):
        self.model = model
        self.calls: list[tuple] = []  # (kind, module, geometry, source modules)
        self.reason = ""
        self.batch = 1
        counted = counted_modules(model)
        unknown = sorted({type(m).__name__ for m in counted if type(m) in _UNSUPPORTED})
        self.ok = not unknown
        if unknown:
            self.reason = f"it does not model {', '.join(unknown)}"
        else:
            self._trace(example_inputs, counted)
        if self.ok and expected is not None and self.macs() != expected:
            self.ok = False
            self.reason = (f"its count ({self.macs():,}) differs from Torch-Pruning's ({expected:,}): the model "
                           "computes outside the layers it models (functional ops, elementwise gates)")

    def _untraceable(self, module: nn.Module, what: str = "the input") -> None:
        self.ok = False
        self.reason = self.reason or (f"it cannot tell the width of {what} of {type(module).__name__} "
                                      "(not the output of a layer it models)")

    def _trace(self, example_inputs, counted):
        last_by_shape: dict[tuple, tuple] = {}  # output shape -> the modules whose width it is
        tags = Widths(_widths)

        def made(output, srcs):
            tags.set(output, srcs)
            last_by_shape[tuple(output.shape)] = srcs

        def hook(module, inputs, output):
            x = inputs[0] if inputs else None
            if isinstance(module, nn.modules.conv._ConvNd):
                self.calls.append(("conv", module, math.prod(output.shape[2:]) * output.shape[0], None))
            elif isinstance(module, nn.Linear):
                self.calls.append(("linear", module, math.prod(x.shape[:-1]), None))
            elif isinstance(module, _BNS):
                self.calls.append(("bn", module, math.prod(x.shape) // x.shape[1], None))
            elif isinstance(module, _LNS):  # over the last dim only: that is the width pruning cuts
                if len(module.normalized_shape) != 1:
                    return self._untraceable(module, "the normalized shape")
                self.calls.append(("ln", module, x.numel() // _width(module), None))
            elif isinstance(module, _MHA):
                return self._mha(module, inputs, output, made)
            elif type(module) in TIMM_ATTENTION:
                return self._timm_attention(module, x, output, made)
            else:  # activation or pool: width comes from whoever produced the input
                srcs = tags.get(x) or last_by_shape.get(tuple(x.shape))
                if srcs is None:
                    return self._untraceable(module)
                kind = "act" if isinstance(module, _ACTS) else "pool"
                numel = output.numel() if kind == "act" else x.numel()
                per_channel = numel // _widths(srcs)
                if per_channel * _widths(srcs) != numel:
                    return self._untraceable(module)
                self.calls.append((kind, module, per_channel, srcs))
                return made(output, srcs)
            made(output, (module,))

        handles = [m.register_forward_hook(hook) for m in counted if type(m) in _MODELED]
        was_training = self.model.training
        x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
        self.batch = len(x) if isinstance(x, torch.Tensor) and x.dim() else 1  # TP: per sample
        try:
            self.model.eval()
            with torch.no_grad(), tags:
                if isinstance(example_inputs, (tuple, list)):
                    self.model(*example_inputs)
                else:
                    self.model(example_inputs)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)

    def _mha(self, m, inputs, output, made):
        """nn.MultiheadAttention (Torch-Pruning's formula), self-attention over one width."""
        if len(inputs) != 3 or any(t.shape[-1] != m.embed_dim for t in inputs):
            return self._untraceable(m, "the query, key and value")
        q, k, v = inputs
        seq = 1 if m.batch_first else 0
        self.calls.append(("mha", m, (q.shape[1 - seq], q.shape[seq], k.shape[seq], v.shape[seq]), None))
        out = output[0] if isinstance(output, tuple) else output
        made(out, (m,))

    def _timm_attention(self, m, x, output, made):
        """timm's Attention (Torch-Pruning's formula, from `qkv` and `num_heads`)."""
        if x is None or x.dim() != 3 or not isinstance(getattr(m, "qkv", None), nn.Linear):
            return self._untraceable(m)
        self.calls.append(("tattn", m, (x.shape[0], x.shape[1]), None))
        proj = getattr(m, "proj", None)
        if isinstance(proj, nn.Linear) and output.shape[-1] == proj.out_features:
            made(output, (proj,))

    def macs(self, cut: dict | None = None) -> int:
        """Current MACs. `cut` maps module -> (out channels removed, in channels removed)
        to ask what the MACs would be after a prune, without pruning."""
        cut = cut or {}
        total = 0
        for kind, m, geo, srcs in self.calls:
            if kind == "conv":
                co_cut, ci_cut = cut.get(m, (0, 0))
                cout = m.weight.shape[0] - co_cut
                cin_per_group = m.weight.shape[1]
                if m.groups > 1 and m.groups == m.weight.shape[0]:  # depthwise: in == out == groups
                    cout = m.weight.shape[0] - max(co_cut, ci_cut)
                else:
                    cin_per_group -= ci_cut // m.groups
                k = math.prod(m.weight.shape[2:])
                total += k * cin_per_group * cout * geo
                if m.bias is not None:
                    total += cout * geo
            elif kind == "linear":
                co_cut, ci_cut = cut.get(m, (0, 0))
                fout = m.weight.shape[0] - co_cut
                total += geo * (m.weight.shape[1] - ci_cut) * fout
                if m.bias is not None:
                    total += fout
            elif kind == "bn":
                c = m.num_features - max(cut.get(m, (0, 0)))
                total += c * geo * (2 if m.affine else 1)
            elif kind == "ln":
                c = _width(m) - max(cut.get(m, (0, 0)))
                total += c * geo * (2 if m.elementwise_affine else 1)
            elif kind == "mha":
                total += _mha_macs(m, geo, _width(m) - _out_cut(m, cut))
            elif kind == "tattn":
                total += _timm_attention_macs(m, geo, cut)
            else:
                total += _widths(srcs, cut) * geo
        return int(total) // self.batch


def _heads_macs(heads: int, qlen: int, klen: int, qk_dim: int, v_dim: int) -> int:
    """Scores, softmax and the weighted sum over every head (Torch-Pruning's head_flops)."""
    return heads * (qlen * klen * (qk_dim // heads) + qlen * klen + qlen * klen * (v_dim // heads))


def _mha_macs(m: nn.MultiheadAttention, geo: tuple, e: int) -> int:
    """Torch-Pruning's multihead_attention_counter_hook, with embedding width `e`."""
    batch, qlen, klen, vlen = geo
    flops = qlen * e + (qlen + klen + vlen) * e * e
    if m.in_proj_bias is not None:
        flops += (qlen + klen + vlen) * e
    flops += _heads_macs(m.num_heads, qlen, klen, e, e) + qlen * e * (e + 1)
    return flops * batch


def _timm_attention_macs(m: nn.Module, geo: tuple, cut: dict) -> int:
    """Torch-Pruning's timm_multihead_attention_counter_hook: the width is qkv's (out / 3),
    the input width qkv's input; heads go whole (`head_dim` kept), so a planned cut of qkv
    leaves (qkv out - cut) / (3 head_dim) of them."""
    batch, n = geo
    co_cut, ci_cut = cut.get(m.qkv, (0, 0))
    qkv_out = m.qkv.out_features - co_cut
    heads = m.num_heads if not co_cut else qkv_out // (3 * m.head_dim)
    d, c = qkv_out // 3, m.qkv.in_features - ci_cut
    flops = n * d + 3 * n * c * d
    if m.qkv.bias is not None:
        flops += 3 * n * d
    flops += _heads_macs(heads, n, n, d, d) + n * d * (d + 1)
    return flops * batch
