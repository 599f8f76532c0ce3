"""What a model's forward returns, reduced to its logits.

Registry, torchvision and timm classifiers return a tensor. Your own model (`py:`) may
return what Hugging Face models do (an object with `.logits`, such as transformers'
ModelOutput), a dict with "logits", or a 1-tuple: the logits are unambiguous there, and
every place that reads outputs (training, evaluation, the gradient methods, Torch-Pruning's
tracing) takes them with `logits_of`. Anything else (a 2-tuple of logits and an auxiliary
output, a dict without "logits") is refused with one line, by `check_input_size` before any
work.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from progprune.errors import BadInput


def describe_output(out) -> str:
    """What a forward pass returned, in a few words: "a tuple of 2 (Tensor [1, 10], Tensor [1, 4])"."""
    def one(v):
        return f"Tensor {list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__

    if isinstance(out, Mapping):
        keys = ", ".join(repr(k) for k in list(out)[:4]) + (", ..." if len(out) > 4 else "")
        return f"a {type(out).__name__} with keys {keys or 'none'}"
    if isinstance(out, (tuple, list)):
        items = ", ".join(one(v) for v in out[:3]) + (", ..." if len(out) > 3 else "")
        return f"a {type(out).__name__} of {len(out)} ({items})"
    return f"a {type(out).__name__}" if not isinstance(out, torch.Tensor) else one(out)


def logits_of(out, name: str | None = None) -> torch.Tensor:
    """The logits in a forward pass's output: the tensor itself, `out.logits`, `out["logits"]`
    or the one item of a 1-tuple/list. Else BadInput naming the model (`name`) and what its
    forward returned."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        found = out.get("logits")
    elif isinstance(out, (tuple, list)):
        found = out[0] if len(out) == 1 else None
    else:
        found = getattr(out, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    who = f"model {name!r}" if name else "the model"
    raise BadInput(f"{who}: its forward returned {describe_output(out)}, which holds no unambiguous "
                   "logits; return the logits tensor (or an object with .logits, a dict with "
                   "'logits', or a 1-tuple)")
