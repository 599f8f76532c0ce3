"""MACs counting that costs no forward pass per pruning step.

Channel pruning changes layer widths, never spatial sizes. So one traced forward pass
records, for every counted module call, the sizes that pruning cannot change (output
positions, kernel size, leading dims); afterwards MACs are recomputed from the layers'
current widths alone, in microseconds. The formulas are those of
`torch_pruning.utils.count_ops_and_params` (conv/linear incl. bias, 2x elements for
affine BN, elements for activations and pooling, zero for functional ops), and the
result is cross-checked against it at the start and end of every prune.

Activations and pools carry no width of their own: each call is tied to the most
recent module call whose output had the same shape as its input (the BN/conv that fed
it, or the residual branch it follows), whose width it then inherits.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch_pruning as tp

from progprune._tp import COUNTED_BY_TP

_ACTS = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.GELU)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LNS = (nn.LayerNorm,)
# Torch-Pruning counts a module by its exact type (a subclass, such as timm's BatchNormAct2d
# or LayerNorm2d, counts nothing there), so the fast counter hooks exact types too.
_MODELED = frozenset((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + _ACTS + _POOLS + _BNS + _LNS) & frozenset(COUNTED_BY_TP)
# Any other module type that tp counts makes the fast counter decline (exact fallback).
_UNSUPPORTED = frozenset(t for t in COUNTED_BY_TP if t not in _MODELED)


def count_exact(model: nn.Module, example_inputs) -> tuple[int, int]:
    """MACs and params as torch-pruning reports them (deep copy + forward)."""
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def _width(module: nn.Module, out: bool = True) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.weight.shape[0] if out else module.weight.shape[1] * module.groups
    if isinstance(module, nn.Linear):
        return module.weight.shape[0] if out else module.weight.shape[1]
    if isinstance(module, _BNS):
        return module.num_features
    if isinstance(module, _LNS):
        return module.normalized_shape[-1]
    raise TypeError(type(module))


class MacsCounter:
    """Recomputes MACs of a model from its current layer widths.

    `ok` is False when the model holds a module type this counter does not model, or when
    its first count disagrees with torch-pruning's; callers then count exactly instead.
    `reason` then says why, naming the layer kinds, for the log.
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, expected: int | None = None):
        self.model = model
        self.calls: list[tuple] = []  # (kind, module, positions, source_module)
        self.reason = ""
        unknown = sorted({type(m).__name__ for m in model.modules() if type(m) in _UNSUPPORTED})
        self.ok = not unknown
        if unknown:
            self.reason = f"it does not model {', '.join(unknown)}"
        else:
            self._trace(example_inputs)
        if self.ok and expected is not None and self.macs() != expected:
            self.ok = False
            self.reason = (f"its count ({self.macs():,}) differs from Torch-Pruning's ({expected:,}): the model "
                           "computes outside the layers it models (functional ops, elementwise gates)")

    def _untraceable(self, module: nn.Module) -> None:
        self.ok = False
        self.reason = self.reason or (f"it cannot tell the width of the input of {type(module).__name__} "
                                      "(not the output of a layer it models)")

    def _trace(self, example_inputs):
        last_by_shape: dict[tuple, nn.Module] = {}  # output shape -> module that made it
        handles = []

        def hook(module, inputs, output):
            x = inputs[0]
            shape_in = tuple(x.shape)
            if isinstance(module, nn.modules.conv._ConvNd):
                self.calls.append(("conv", module, math.prod(output.shape[2:]) * output.shape[0], None))
                last_by_shape[tuple(output.shape)] = module
            elif isinstance(module, nn.Linear):
                self.calls.append(("linear", module, math.prod(x.shape[:-1]), None))
                last_by_shape[tuple(output.shape)] = module
            elif isinstance(module, _BNS):
                self.calls.append(("bn", module, math.prod(x.shape) // x.shape[1], None))
                last_by_shape[tuple(output.shape)] = module
            elif isinstance(module, _LNS):  # over the last dim only: that is the width pruning cuts
                if len(module.normalized_shape) != 1:
                    self._untraceable(module)
                    return
                self.calls.append(("ln", module, x.numel() // _width(module), None))
                last_by_shape[tuple(output.shape)] = module
            else:  # activation or pool: width comes from whoever produced the input
                src = last_by_shape.get(shape_in)
                if src is None:
                    self._untraceable(module)
                    return
                kind = "act" if isinstance(module, _ACTS) else "pool"
                numel = output.numel() if kind == "act" else x.numel()
                per_channel = numel // _width(src)
                if per_channel * _width(src) != numel:
                    self._untraceable(module)
                    return
                self.calls.append((kind, module, per_channel, src))
                last_by_shape[tuple(output.shape)] = src

        for m in self.model.modules():
            if type(m) in _MODELED:
                handles.append(m.register_forward_hook(hook))
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(example_inputs)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)

    def macs(self, cut: dict | None = None) -> int:
        """Current MACs. `cut` maps module -> (out channels removed, in channels removed)
        to ask what the MACs would be after a prune, without pruning."""
        cut = cut or {}
        total = 0
        for kind, m, positions, src in self.calls:
            if kind == "conv":
                co_cut, ci_cut = cut.get(m, (0, 0))
                cout = m.weight.shape[0] - co_cut
                cin_per_group = m.weight.shape[1]
                if m.groups > 1 and m.groups == m.weight.shape[0]:  # depthwise: in == out == groups
                    cout = m.weight.shape[0] - max(co_cut, ci_cut)
                else:
                    cin_per_group -= ci_cut // m.groups
                k = math.prod(m.weight.shape[2:])
                total += k * cin_per_group * cout * positions
                if m.bias is not None:
                    total += cout * positions
            elif kind == "linear":
                co_cut, ci_cut = cut.get(m, (0, 0))
                fout = m.weight.shape[0] - co_cut
                total += positions * (m.weight.shape[1] - ci_cut) * fout
                if m.bias is not None:
                    total += fout
            elif kind == "bn":
                c = m.num_features - max(cut.get(m, (0, 0)))
                total += c * positions * (2 if m.affine else 1)
            elif kind == "ln":
                c = _width(m) - max(cut.get(m, (0, 0)))
                total += c * positions * (2 if m.elementwise_affine else 1)
            else:
                c = _width(src) - cut.get(src, (0, 0))[0]
                total += c * positions
        return int(total)
