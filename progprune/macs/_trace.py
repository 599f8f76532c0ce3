"""Which layers' widths a tensor's channels are, followed through the one traced forward pass.

An activation or a pool has no width of its own: Torch-Pruning counts its elements, so the
fast counter needs to know which layers' output widths make up its input's channels. Every
tensor a counted layer returns is tagged with that layer; a `TorchFunctionMode` carries the
tag through the functional ops between layers (an op whose output has the shape of a tagged
input keeps its tag: F.relu, adds, gates, views) and sums the tags where `torch.cat` joins
tensors along their tagged dim (inception branches, fire modules). Tensors are recognised by
identity, not shape, so two branches of equal width are never confused.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

_CATS = frozenset({torch.cat, torch.concat, torch.concatenate})


class Widths(TorchFunctionMode):
    """Within the block: tensor -> the modules whose output widths add up to one of its dims.
    `width(srcs)` is that sum, from the modules' current widths."""

    def __init__(self, width: Callable[[tuple], int]):
        super().__init__()
        self._width = width
        self._src: dict = {}  # id(tensor) -> (weakref to it, tuple of source modules)

    def get(self, t) -> tuple | None:
        entry = self._src.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0]() is t else None

    def set(self, t: torch.Tensor, srcs: tuple) -> None:
        self._src[id(t)] = (weakref.ref(t), srcs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and self.get(out) is None:
            srcs = self._joined(args, kwargs, out) if func in _CATS else self._kept(args, out)
            if srcs:
                self.set(out, srcs)
        return out

    def _kept(self, args, out) -> tuple | None:
        """The tag of the first tagged input of the output's shape (elementwise ops, views)."""
        for a in args:
            if isinstance(a, torch.Tensor) and a.shape == out.shape:
                srcs = self.get(a)
                if srcs:
                    return srcs
        return None

    def _joined(self, args, kwargs, out) -> tuple | None:
        """torch.cat: the inputs' tags in order, when each is tagged along the joined dim."""
        tensors = args[0] if args else kwargs.get("tensors", ())
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(dim, int) or not tensors:
            return None
        dim %= out.dim()
        srcs: tuple = ()
        for t in tensors:
            s = self.get(t)
            if not s or t.dim() != out.dim() or t.shape[dim] != self._width(s):
                return None
            srcs += s
        return srcs
