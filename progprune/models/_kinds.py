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


def build_model(name: str, num_classes: int, input_shape=None, factory=None) -> nn.Module:
    """A freshly initialised model of any kind. `input_shape` (C, H, W) reaches the
    architectures whose layers depend on the image size (torchvision/timm ViTs).
    `factory`: a callable that builds it instead (`factory(num_classes=N)`), so that `name`
    is only a label and nothing is imported by name (`load_pruned(path, factory=...)`)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise BadInput(f"num_classes: must be a positive integer, got {num_classes!r}")
    if factory is not None:
        if not callable(factory):
            raise BadInput(f"factory: must be a callable that builds {name!r}, got a {type(factory).__name__}")
        model = _call_factory(name, factory, getattr(factory, "__name__", "factory"), num_classes)
    else:
        build = _resolve(name)
        model = build(num_classes, tuple(input_shape) if input_shape else None)
    if not isinstance(model, nn.Module):
        raise BadInput(f"model {name!r}: the factory returned a {type(model).__name__}, "
                       "not a torch.nn.Module; return the model")
    return model


def check_input_size(model: nn.Module, name: str, input_shape, num_classes: int | None = None) -> None:
    """One forward pass of a zero image of `input_shape`, before any work, so that what
    would fail later fails here as one line naming the model:
    * a model built for another size (a fixed pooling window, a position embedding);
    * a forward that ends the process (`sys.exit`) or raises another BaseException;
    * an output without unambiguous logits (`logits_of`: a tensor, `.logits`, a dict with
      "logits", a 1-tuple);
    * with `num_classes`, logits that are not [batch, num_classes] (a factory that ignores
      its num_classes argument)."""
    import torch

    from progprune.models._outputs import logits_of

    was_training = model.training
    try:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), "cpu")
            out = model.eval()(torch.zeros(1, *input_shape, device=device))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - any failure: this model does not take this size
        c, h, w = input_shape
        raise BadInput(f"model {name!r} cannot take {c}x{h}x{w} inputs ({one_line(e, with_type=True)}); "
                       "set the image size it is built for",
                       field="dataset.image_size") from None
    except BaseException as e:  # SystemExit, GeneratorExit, ...: user code must not end the run
        raise BadInput(f"model {name!r}: its forward pass raised {_base_exception(e)}; "
                       "a model's forward must return its logits") from None
    finally:
        model.train(was_training)
    y = logits_of(out, name)
    if num_classes is not None and (y.dim() != 2 or y.shape[1] != num_classes):
        what = (f"{y.shape[1]} values per image" if y.dim() == 2
                else f"a tensor of shape {list(y.shape)} for a batch of 1")
        raise BadInput(f"model {name!r} outputs {what}, the data has {num_classes} classes; build it "
                       f"with num_classes={num_classes} (a py: factory is called as "
                       f"factory(num_classes={num_classes}) and must use it)")


def _base_exception(e: BaseException) -> str:
    """"SystemExit(0)", "GeneratorExit": a BaseException that is not an Exception, named."""
    if isinstance(e, SystemExit):
        return f"SystemExit({e.code!r}) (it called sys.exit or exit)"
    return one_line(e, with_type=True) if str(e) else type(e).__name__


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
    except KeyboardInterrupt:
        raise
    # the user's code: any error at import (SystemExit included) names the factory and cause
    except BaseException as e:  # noqa: BLE001
        cause = one_line(e, with_type=True) if isinstance(e, Exception) else _base_exception(e)
        raise BadInput(f"model {name!r}: cannot import {module_name} "
                       f"({cause}); it must be importable from "
                       "the working directory or PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise BadInput(f"model {name!r}: {module_name} has no callable {attr!r}")
    return lambda nc, shape: _call_factory(name, fn, attr, nc)


def _call_factory(name: str, fn, attr: str, nc: int):
    """`fn(num_classes=nc)`: whatever it raises (SystemExit included, KeyboardInterrupt
    excepted) is one BadInput naming the model and the cause."""
    try:
        return fn(num_classes=nc)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - the user's factory may raise anything: name it and the cause
        cause = one_line(e, with_type=True) if isinstance(e, Exception) else _base_exception(e)
        raise BadInput(f"model {name!r}: {attr}(num_classes={nc}) failed ({cause})") from None
