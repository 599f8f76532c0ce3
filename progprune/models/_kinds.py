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

from progprune.errors import BadInput, Problem, ProgpruneError, did_you_mean, one_line

KINDS = (
    ("tv:", "tv:NAME", "any torchvision classification model, weights=None; "
                       "pip install 'progprune[models]'"),
    ("timm:", "timm:NAME", "any timm model, pretrained=False; pip install 'progprune[models]'"),
    ("py:", "py:package.module:factory", "your own callable, called with num_classes=N, "
                                         "imported from the working directory or PYTHONPATH"),
)


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
        raise BadInput(f"model {name!r} cannot take {c}x{h}x{w} inputs ({one_line(e, with_type=True)}); "
                       "set the image size it is built for",
                       field="dataset.image_size") from None
    finally:
        model.train(was_training)


def _resolve(name: str):
    """name -> build(num_classes, input_shape); raises ProgpruneError naming what to change."""
    from progprune.models._registry import MODELS

    if not isinstance(name, str) or not name.strip():
        raise BadInput(f"model name must be a non-empty string, got {name!r}")
    kind = kind_of(name)
    if kind == "registry":
        if name not in MODELS:
            raise BadInput(f"{MODELS.unknown(name)}, or {' or '.join(f for _, f, _ in KINDS)}")
        factory = MODELS.get(name)
        return lambda nc, shape: factory(nc)
    return {"tv": _torchvision, "timm": _timm, "py": _factory}[kind](name, name.split(":", 1)[1])


def _unknown(what: str, name: str, prefix: str, valid, where: str) -> BadInput:
    """"unknown <what> 'tv:x'; did you mean 'tv:y'? see <where>" (the hint when one is close)."""
    hint = did_you_mean(name, [prefix + v for v in valid]) or ";"
    return BadInput(f"unknown {what} {name!r}{hint} see {where}")


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
        raise _unknown("torchvision model", name, "tv:", valid,
                       "torchvision.models.list_models() (classification models)")
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
        raise _unknown("timm model", name, "timm:", timm.list_models(), "timm.list_models()")

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
    except Exception as e:  # noqa: BLE001 - the user's code: any error at import names the factory and cause
        raise BadInput(f"model {name!r}: cannot import {module_name} "
                       f"({one_line(e, with_type=True)}); it must be importable from "
                       "the working directory or PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BadInput(f"model {name!r}: {module_name} has no callable {attr!r}")

    def build(nc, shape):
        try:
            return fn(num_classes=nc)
        except Exception as e:  # noqa: BLE001 - the user's factory may raise anything: name it and the cause
            raise BadInput(f"model {name!r}: {attr}(num_classes={nc}) failed "
                           f"({one_line(e, with_type=True)})") from None

    return build
