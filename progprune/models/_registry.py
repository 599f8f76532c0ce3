"""The model registry, filled by `@register_model` and keyed by the name users type, and
what pruning asks of any model (its example input, its classifier head)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from progprune.registry import Registry

MODELS: Registry[Callable[[int], nn.Module]] = Registry("model")


def register_model(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    """Register `fn(num_classes) -> nn.Module` under its function name."""
    return MODELS.register(fn)


def list_models() -> list[str]:
    """Registered names, in natural order (tv:/timm:/py: models are named, not listed)."""
    return MODELS.names()


def example_inputs(input_shape: tuple[int, ...] = (3, 32, 32)) -> torch.Tensor:
    """A 1xCxHxW tensor for tracing (DepGraph) and MAC counting."""
    return torch.randn(1, *input_shape)


_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)
_HEAD_ATTRS = ("fc", "classifier", "heads", "head")  # torchvision's (and the registry's) names


def head_name(model: nn.Module, example_inputs: torch.Tensor | None = None) -> str | None:
    """The name of the classifier: the layer that produces the logits.

    timm's `get_classifier()`; else torchvision's `fc` / `classifier` / `heads` / `head`
    (the last Linear/Conv inside it: `classifier.3` in MobileNetV3, `heads.head` in ViT);
    else the last Linear/Conv the forward pass calls (with `example_inputs`) or registers.
    """
    names = {m: n for n, m in model.named_modules()}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            found = _last_layer(get(), names)
        except Exception:  # noqa: BLE001 - the model's own method, of any meaning: the generic rules decide
            found = None
        if found:
            return found
    for attr in _HEAD_ATTRS:
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module):
            found = _last_layer(sub, names)
            if found:
                return found
    if example_inputs is not None:
        called: list[nn.Module] = []
        hooks = [m.register_forward_hook(lambda m, i, o: called.append(m))
                 for m in model.modules() if isinstance(m, _LAYERS)]
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(example_inputs)
        except KeyboardInterrupt:
            raise
        # a forward that fails (even by sys.exit) is named by check_input_size, which runs
        # before any work; here the registered order decides
        except BaseException:  # noqa: BLE001
            called.clear()
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        if called:
            return names[called[-1]]
    return _last_layer(model, names)


def _last_layer(module: nn.Module, names: dict) -> str | None:
    last = None
    for m in module.modules():
        if isinstance(m, _LAYERS) and m in names:
            last = names[m]
    return last


def classifier_layers(model: nn.Module, *, example_inputs: torch.Tensor | None = None) -> list[nn.Module]:
    """Layers to keep whole when pruning: the model's classifier head (`head_name`).

    Not, as Torch-Pruning's reproduce/main.py does, every Linear/Conv whose width is the
    class count: on its CIFAR models that is the same single layer, but a real model with a
    64-class data set has whole stages 64 wide. (`example_inputs` is keyword-only so that a
    call in the old form, with a class count second, fails instead of passing it as input.)
    """
    name = head_name(model, example_inputs)
    return [model.get_submodule(name)] if name else []
