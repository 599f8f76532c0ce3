"""Model names of every kind, resolved in one place.

* `resnet56`: the registry (`progprune models` lists it);
* `tv:NAME`: a torchvision classification model, `weights=None`, `num_classes`;
* `timm:NAME`: a timm model, `pretrained=False`, `num_classes`;
* `py:package.module:factory`: your own callable, called as `factory(num_classes=N)`, imported
  from the working directory or PYTHONPATH (on a cluster it ships with the job's working dir).

`name_problems` says what is wrong with a name without building anything heavy (the spec
loader calls it); `build_model` builds. torchvision and timm are optional: they are imported
only for their own kinds.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys

from torch import nn

from progprune.errors import BadInput, Problem, ProgpruneError, closest_names

KINDS = (
    ("tv:", "tv:NAME", "any torchvision classification model, weights=None; "
                       "pip install 'progprune[models]'"),
    ("timm:", "timm:NAME", "any timm model, pretrained=False; pip install 'progprune[models]'"),
    ("py:", "py:package.module:factory", "your own callable, called with num_classes=N, "
                                         "imported from the working directory or PYTHONPATH"),
)
_SHOW = 3  # closest names in a message


def kind_of(name: str) -> str:
    """"registry", "tv", "timm" or "py"."""
    for prefix, _, _ in KINDS:
        if name.startswith(prefix):
            return prefix[:-1]
    return "registry"


def name_problems(path: str, name: str) -> list[Problem]:
    """Everything wrong with a model name, as `Problem`s at `path` (empty: it builds)."""
    try:
        _resolve(name)
    except ProgpruneError as e:
        return [Problem(path, e.message)]
    return []


def build_model(name: str, num_classes: int, input_shape=None) -> nn.Module:
    """A freshly initialised model of any kind. `input_shape` (C, H, W) reaches the
    architectures whose layers depend on the image size (torchvision/timm ViTs)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise BadInput(f"num_classes: must be a positive integer, got {num_classes!r}")
    build = _resolve(name)
    model = build(num_classes, tuple(input_shape) if input_shape else None)
    if not isinstance(model, nn.Module):
        raise BadInput(f"model {name!r}: the factory returned a {type(model).__name__}, "
                             "not a torch.nn.Module; return the model")
    return model


def check_input_size(model: nn.Module, name: str, input_shape) -> None:
    """One forward pass of a zero image of `input_shape`: a model built for another size
    (a fixed pooling window, a position embedding) fails here, as one line naming the
    setting, instead of mid-training with a traceback."""
    import torch

    was_training = model.training
    try:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), "cpu")
            model.eval()(torch.zeros(1, *input_shape, device=device))
    except Exception as e:  # noqa: BLE001 - any failure: this model does not take this size
        c, h, w = input_shape
        raise BadInput(f"model {name!r} cannot take {c}x{h}x{w} inputs ({type(e).__name__}: "
                             f"{_first_line(e)}); set the image size it is built for",
                             field="dataset.image_size") from None
    finally:
        model.train(was_training)


def _resolve(name: str):
    """name -> build(num_classes, input_shape); raises ProgpruneError naming what to change."""
    from progprune.models._registry import MODELS, list_models

    if not isinstance(name, str) or not name.strip():
        raise BadInput(f"model name must be a non-empty string, got {name!r}")
    kind = kind_of(name)
    if kind == "registry":
        if name not in MODELS:
            forms = " or ".join(f for _, f, _ in KINDS)
            raise BadInput(f"unknown model {name!r}; {_hint(name, list_models())}"
                                 f"valid: {', '.join(list_models())}, or {forms}")
        return lambda nc, shape: MODELS[name](nc)
    return {"tv": _torchvision, "timm": _timm, "py": _factory}[kind](name, name.split(":", 1)[1])


def _hint(word: str, options, prefix: str = "") -> str:
    """"did you mean 'X'? " (+ the next closest names), or "" when nothing is close."""
    close = closest_names(word, options, n=_SHOW + 2, cutoff=0.5)[:_SHOW]
    if not close:
        return ""
    more = f" (or {', '.join(repr(prefix + c) for c in close[1:])})" if close[1:] else ""
    return f"did you mean {prefix + close[0]!r}?{more} "


def _need(package: str, name: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise BadInput(f"model {name!r} needs {package}, which is not installed; run "
                             "pip install 'progprune[models]'") from None


def _torchvision(name: str, arch: str):
    tv = _need("torchvision", name)
    valid = sorted(tv.models.list_models(module=tv.models))
    if arch not in valid:
        raise BadInput(f"unknown torchvision model {name!r}; {_hint(arch, valid, 'tv:')}"
                             "see torchvision.models.list_models() (classification models)")
    builder = tv.models.get_model_builder(arch)

    def build(nc, shape):
        kwargs = {"weights": None, "num_classes": nc}
        if "aux_logits" in _kwargs_of(tv, arch):  # googlenet, inception_v3: one output
            kwargs.update(aux_logits=False, init_weights=True)
        if arch.startswith("vit_") and shape:  # positional embeddings sized for the input
            kwargs["image_size"] = shape[-1]
        return builder(**kwargs)

    return build


def _kwargs_of(tv, arch: str) -> set:
    builder = tv.models.get_model_builder(arch)
    cls = {"googlenet": "GoogLeNet", "inception_v3": "Inception3"}.get(arch)
    target = getattr(tv.models, cls) if cls else builder
    return set(inspect.signature(target).parameters)


def _timm(name: str, arch: str):
    timm = _need("timm", name)
    if not timm.is_model(arch):
        raise BadInput(f"unknown timm model {name!r}; {_hint(arch, timm.list_models(), 'timm:')}"
                             "see timm.list_models()")

    def build(nc, shape):
        if shape:  # ViT-style models size their positional embeddings from img_size
            try:
                return timm.create_model(arch, pretrained=False, num_classes=nc, img_size=shape[-1])
            except TypeError:  # a model without img_size: it adapts to any input
                pass
        return timm.create_model(arch, pretrained=False, num_classes=nc)

    return build


def _factory(name: str, target: str):
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise BadInput(f"model {name!r}: write py:package.module:factory (a module path, a "
                             "colon, the callable's name)")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # the working directory, as `python -m` does
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's code: any error at import names the factory and cause
        raise BadInput(f"model {name!r}: cannot import {module_name} "
                             f"({type(e).__name__}: {_first_line(e)}); it must be importable from "
                             "the working directory or PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BadInput(f"model {name!r}: {module_name} has no callable {attr!r}")

    def build(nc, shape):
        try:
            return fn(num_classes=nc)
        except Exception as e:
            raise BadInput(f"model {name!r}: {attr}(num_classes={nc}) failed "
                                 f"({type(e).__name__}: {_first_line(e)})") from None

    return build


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]
