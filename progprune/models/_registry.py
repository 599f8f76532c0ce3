"""The model registry: a dict filled by `@register_model`, keyed by the name users type."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from progprune.errors import ProgpruneError

MODELS: dict[str, Callable[[int], nn.Module]] = {}

_TV_PREFIX = "tv:"


def register_model(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    """Register `fn(num_classes) -> nn.Module` under its function name."""
    name = fn.__name__
    assert name not in MODELS, f"model {name!r} registered twice"
    MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Registered names, sorted (`tv:NAME` torchvision models are not listed)."""
    return sorted(MODELS, key=_natural_key)


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model; `tv:NAME` builds torchvision's NAME (weights=None)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ProgpruneError(f"num_classes: must be a positive integer, got {num_classes!r}")
    if isinstance(name, str) and name.startswith(_TV_PREFIX):
        return _build_torchvision(name[len(_TV_PREFIX):], num_classes)
    if name not in MODELS:
        raise ProgpruneError(
            f"unknown model {name!r}; valid: {', '.join(list_models())} or tv:NAME"
        )
    return MODELS[name](num_classes)


def example_inputs(input_shape: tuple[int, ...] = (3, 32, 32)) -> torch.Tensor:
    """A 1xCxHxW tensor for tracing (DepGraph) and MAC counting."""
    return torch.randn(1, *input_shape)


def classifier_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Layers to keep whole when pruning: every Linear/Conv whose output width is num_classes.

    Torch-Pruning's reproduce/main.py ignores the same set. MobileNetV2's classifier is a
    1x1 Conv, the others end in a Linear.
    """
    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == num_classes:
            out.append(m)
        elif isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == num_classes:
            out.append(m)
    return out


def _build_torchvision(name: str, num_classes: int) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise ProgpruneError(
            f"model 'tv:{name}' needs torchvision, which is not installed; "
            "run pip install 'progprune[torchvision]'"
        ) from None
    valid = torchvision.models.list_models(module=torchvision.models)
    if name not in valid:
        raise ProgpruneError(
            f"unknown torchvision model 'tv:{name}'; valid classification models: "
            + ", ".join(sorted(valid))
        )
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _natural_key(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
