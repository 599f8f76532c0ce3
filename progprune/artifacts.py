"""Model files that load without unpickling code.

An artifact is a plain dict of tensors, strings and numbers: the registry name of the
architecture, its class count and input shape, torch-pruning's pruning history (layer
names + channel indices) and a state_dict. Loading rebuilds the architecture from the
registry, replays the history with DepGraph, then loads the weights with
`torch.load(weights_only=True)`, which refuses any pickled object that is not data.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings

import torch
import torch.nn as nn
import torch_pruning as tp

from progprune._atomic import atomic_path
from progprune.errors import ProgpruneError
from progprune.models import build_model

FORMAT = "progprune.artifact/1"


def save_artifact(path, model: nn.Module, *, model_name: str, num_classes: int,
                  input_shape=(3, 32, 32), history=None, meta: dict | None = None) -> str:
    """Write atomically (temp file + rename): a crash never leaves half a file."""
    path = os.fspath(path)
    payload = {
        "format": FORMAT,
        "model": model_name,
        "num_classes": int(num_classes),
        "input_shape": [int(v) for v in input_shape],
        "pruning_history": history or [],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    with atomic_path(path, ".pt") as tmp:
        torch.save(payload, tmp)
    return path


def _read(path) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ProgpruneError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # odd protocol bytes in garbage files warn loudly
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"GLOBAL (\S+)", str(e))
        if blocked:  # a pickle that would import code: name what it wanted
            raise ProgpruneError(
                f"checkpoint {path} refused: it would import {blocked.group(1)}; "
                "progprune loads only plain weights (weights_only=True)") from None
        first = (str(e).strip().splitlines() or ["unreadable"])[0][:120]
        raise ProgpruneError(f"checkpoint {path} is corrupt or not a torch file: {first}") from None
    except Exception as e:  # garbage bytes surface as many error types from the loader
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise ProgpruneError(f"checkpoint {path} is corrupt or not a torch file: {first}") from None
    if not isinstance(obj, dict):
        raise ProgpruneError(f"checkpoint {path}: expected a dict of weights, got {type(obj).__name__}")
    return obj


def load_artifact(path, *, model_name: str | None = None, num_classes: int | None = None,
                  input_shape=None) -> tuple[nn.Module, dict]:
    """Rebuild a model from an artifact or a plain state_dict.

    A plain state_dict (or {"state_dict": ...}) needs `model_name` and `num_classes`.
    When given, they must match the file: another architecture or class count is an error.
    Returns (model in eval mode, the artifact dict without the state_dict).
    """
    obj = _read(path)
    if obj.get("format") == FORMAT:
        art = obj
    else:
        sd = obj.get("state_dict", obj)
        if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ProgpruneError(f"checkpoint {path}: neither a progprune artifact nor a state_dict of tensors")
        if model_name is None or num_classes is None:
            raise ProgpruneError(f"checkpoint {path} is a plain state_dict: give the model name and class count")
        art = {"format": FORMAT, "model": model_name, "num_classes": num_classes,
               "input_shape": list(input_shape or (3, 32, 32)), "pruning_history": [],
               "state_dict": sd, "meta": {}}
    if model_name is not None and art["model"] != model_name:
        raise ProgpruneError(f"checkpoint {path} holds a {art['model']}, not a {model_name}; "
                             "point to a checkpoint of this model")
    if num_classes is not None and int(art["num_classes"]) != int(num_classes):
        raise ProgpruneError(f"checkpoint {path} has {art['num_classes']} classes, the dataset has "
                             f"{num_classes}; use a checkpoint trained on this dataset")
    model = build_model(art["model"], int(art["num_classes"]))
    history = art.get("pruning_history") or []
    if history:
        shape = tuple(art.get("input_shape") or (3, 32, 32))
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *shape))
        dg.load_pruning_history([(n, bool(o), list(i)) for n, o, i in history])
    try:
        model.load_state_dict(art["state_dict"], strict=True)
    except RuntimeError as e:
        raise ProgpruneError(
            f"checkpoint {path} does not fit {art['model']} with {art['num_classes']} classes "
            f"({str(e).splitlines()[0][:160]}); check the model name and class count"
        ) from None
    model.eval()
    info = {k: v for k, v in art.items() if k != "state_dict"}
    return model, info
