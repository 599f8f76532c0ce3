"""Model files that load without unpickling code.

An artifact is a plain dict of tensors, strings and numbers: the registry name of the
architecture, its class count and input shape, torch-pruning's pruning history (layer
names + channel indices) and a state_dict. Loading rebuilds the architecture from the
registry, replays the history with DepGraph, then loads the weights with
`torch.load(weights_only=True)`, which refuses any pickled object that is not data.

Base checkpoints (`load_base_weights`) may also be what people actually have: a plain
`torch.save(model.state_dict())`, a `.safetensors` file, the usual training-script
wrappers ({"state_dict"|"model"|"model_ema": ...}) and keys prefixed by DDP (`module.`) or
torch.compile (`_orig_mod.`).

Histories compose: a model loaded from a pruned artifact carries the history it was
rebuilt with, and `save_artifact` puts it in front of the new rounds' history, so pruning a
pruned model writes a file that reloads. Where a stored history does not reproduce the
saved widths (files written before that fix), the widths are taken from the saved weights'
shapes instead: the weights are the model.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch_pruning as tp

from progprune._atomic import atomic_path
from progprune._checkpoint_io import check_artifact, check_finite, is_safetensors, read_checkpoint, sha256, unwrap
from progprune.errors import BadInput
from progprune.models import build_model, head_name, kind_of, logits_of, sync_attention  # noqa: F401 (head_name: re-exported)
from progprune.pruning import replay_history

FORMAT = "progprune.artifact/1"
HISTORY_ATTR = "_progprune_history"  # set on models rebuilt from an artifact: their prior rounds
_SHOW = 3  # keys named in an error message


def prior_history(model: nn.Module) -> list:
    """The pruning history `model` was rebuilt with ([] for a fresh or plain-weights model)."""
    return list(getattr(model, HISTORY_ATTR, None) or [])


def save_artifact(path, model: nn.Module, *, model_name: str, num_classes: int,
                  input_shape=(3, 32, 32), history=None, meta: dict | None = None) -> str:
    """Write atomically (temp file + rename): a crash never leaves half a file.

    `history` is the pruning done on `model` since it was built or loaded (a
    PruneOutcome's `.history`). The history `model` was loaded with (see `prior_history`)
    goes in front of it, so an artifact of a pruned-then-pruned-again model reloads.
    """
    path = os.fspath(path)
    payload = {
        "format": FORMAT,
        "model": model_name,
        "num_classes": int(num_classes),
        "input_shape": [int(v) for v in input_shape],
        "pruning_history": prior_history(model) + list(history or []),
        "state_dict": _plain_state_dict(model),
        "meta": meta or {},
    }
    with atomic_path(path, ".pt") as tmp:
        torch.save(payload, tmp)
    return path


def _plain_state_dict(model: nn.Module) -> dict:
    """The weights on the CPU, with the per-module versions state_dict() carries (`_metadata`:
    torchvision's MNASNet refuses a state_dict without them)."""
    sd = model.state_dict()
    out = type(sd)((k, v.detach().cpu()) for k, v in sd.items())
    if hasattr(sd, "_metadata"):
        out._metadata = sd._metadata
    return out


# ---- rebuilding the model -------------------------------------------------------------
def _fresh(name: str, num_classes: int, seed: int, input_shape=None, factory=None) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        return build_model(name, num_classes, input_shape, factory=factory)


def _shape_mismatches(model: nn.Module, sd: dict, skip=()) -> list[str]:
    own = model.state_dict()
    return [f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
            for k, v in sd.items() if k in own and k not in skip and own[k].shape != v.shape]


def _trace(model: nn.Module, input_shape) -> tp.DependencyGraph:
    return tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, *input_shape),
                                                 output_transform=logits_of)


def _fit_to_shapes(model: nn.Module, sd: dict, input_shape, head: str | None) -> list:
    """Prune `model`'s channels down to the widths of `sd`'s weights, whatever history made
    them; returns the pruning history that does so (replayable like any other).

    Which channels go does not matter: every weight is overwritten by `sd` afterwards.
    Pruning one layer's outputs prunes everything DepGraph couples to it (residual
    partners, BatchNorms, depthwise convs, the next layer's inputs), so layers are visited
    in order and each is cut only as far as it still exceeds the saved width. The head's
    outputs (the class count) are never cut.
    """
    dg = _trace(model, input_shape)
    for name, m in list(model.named_modules()):
        if name == head or f"{name}.weight" not in sd:
            continue
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            fn, have = tp.prune_conv_out_channels, m.out_channels
        elif isinstance(m, nn.Linear):
            fn, have = tp.prune_linear_out_channels, m.out_features
        else:
            continue
        want = sd[f"{name}.weight"].shape[0]
        if want < have:
            group = dg.get_pruning_group(m, fn, idxs=list(range(want, have)))
            if dg.check_pruning_group(group):
                group.prune()
    return [[n, bool(o), [int(i) for i in idx]] for n, o, idx in dg.pruning_history()]


@torch.enable_grad()  # DepGraph traces and prunes with autograd; callers may sit in no_grad()
def _materialize(path: str, name: str, num_classes: int, sd: dict, history: list, input_shape,
                 reset_head: bool, seed: int, hint: str, factory=None) -> tuple[nn.Module, dict]:
    """Build `name` for `num_classes` (with `factory` when given), give it `sd`'s widths,
    load `sd`. One clean error naming what does not fit (first keys and shapes, class
    counts) otherwise."""
    def fresh():
        return _fresh(name, num_classes, seed, input_shape, factory)

    model = fresh()
    head = head_name(model, torch.zeros(1, *input_shape))  # zeros: the caller's RNG stays untouched
    head_keys = {k for k in model.state_dict() if head and k.startswith(head + ".")}
    ck_classes = int(sd[f"{head}.weight"].shape[0]) if head and f"{head}.weight" in sd else None
    if ck_classes is not None and ck_classes != num_classes and not reset_head:
        raise BadInput(
            f"checkpoint {path} has a {ck_classes}-class head ({head}.weight "
            f"{list(sd[f'{head}.weight'].shape)}), the dataset has {num_classes} classes; "
            "pass --reset-head (models[].reset_head: true) to re-initialise the head, "
            "or use a checkpoint trained on this dataset")
    if reset_head:
        sd = {k: v for k, v in sd.items() if k not in head_keys}
    rebuilt, carried = "fresh", []
    if history:
        try:
            replay_history(model, history, torch.randn(1, *input_shape))
            rebuilt, carried = "history", list(history)
        # broad on purpose: Torch-Pruning replaying a history on a model of unknown origin
        except Exception:  # names or indices that do not replay: the shapes decide below
            model = fresh()
        if rebuilt == "history" and _shape_mismatches(model, sd):
            model, rebuilt, carried = fresh(), "fresh", []
    if _shape_mismatches(model, sd):
        try:
            carried, rebuilt = _fit_to_shapes(model, sd, input_shape, head), "shapes"
            sync_attention(model)
        # broad on purpose: Torch-Pruning cutting a model of unknown origin to given widths
        except Exception:  # a width no pruning reaches: the message below names it
            model, rebuilt, carried = fresh(), "fresh", []
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not (reset_head and k in head_keys)]
    unexpected = [k for k in sd if k not in own]
    shapes = _shape_mismatches(model, sd)
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f", +{len(items) - _SHOW} more" if len(items) > _SHOW else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
        raise BadInput(f"checkpoint {path} does not fit {name} with {num_classes} classes "
                             f"({'; '.join(parts)}); {hint}")
    model.load_state_dict(sd, strict=not reset_head)
    model.eval()
    setattr(model, HISTORY_ATTR, carried)
    return model, {"rebuilt_from": rebuilt, "head": head, "checkpoint_classes": ck_classes,
                   "reset_head": bool(reset_head)}


def load_artifact(path, *, model_name: str | None = None, num_classes: int | None = None,
                  input_shape=None, trust_factory: bool = False, factory=None) -> tuple[nn.Module, dict]:
    """Rebuild a model from an artifact or a plain state_dict, strictly (no head reset).

    A plain state_dict (or a wrapper, or .safetensors) needs `model_name` and
    `num_classes`. When given, they must match the file: another architecture or class
    count is an error. An artifact of a `py:module:factory` model imports and runs that
    code only when the caller names it (`model_name`), passes `trust_factory=True`, or
    passes the `factory` callable itself (see `load_pruned`). Returns (model in eval mode,
    the artifact dict without the state_dict; its "pruning_history" is the full history
    the model was rebuilt with, which the model also carries for `save_artifact`).
    """
    return _load(path, model_name, num_classes, input_shape, reset_head=False, seed=0, digest=False,
                 trust_factory=trust_factory, factory=factory)


def load_base_weights(path, model_name: str, num_classes: int, input_shape=None,
                      reset_head: bool = False, seed: int = 0) -> tuple[nn.Module, dict]:
    """The base model of a run from `path`: a progprune artifact (pruned ones included), a
    plain state_dict, a wrapped one ({"state_dict"|"model"|"model_ema": ...}, `module.` /
    `_orig_mod.` prefixes) or a .safetensors file.

    A head with another class count than `num_classes` is an error unless `reset_head`:
    then the checkpoint's head weights are dropped and the model keeps its fresh init
    (seeded with `seed`; the caller's RNG is untouched). Returns (model in eval mode, info):
    info has "model", "num_classes", "input_shape", "pruning_history", "meta", "source"
    ("artifact" | "state_dict" | "safetensors"), "weights_key", "stripped_prefix",
    "checkpoint_classes", "reset_head", "rebuilt_from" ("fresh" | "history" | "shapes"),
    "head" and "sha256" (of the file).
    """
    return _load(path, model_name, num_classes, input_shape, reset_head=reset_head, seed=seed, digest=True)


def _load(path, model_name, num_classes, input_shape, *, reset_head: bool, seed: int, digest: bool,
          artifact_only: bool = False, trust_factory: bool = False, factory=None) -> tuple[nn.Module, dict]:
    path = os.fspath(path)
    obj = read_checkpoint(path)
    if obj.get("format") == FORMAT:
        check_artifact(obj, path)
        name, ck_classes = obj["model"], obj["num_classes"]
        if model_name is not None and name != model_name:
            raise BadInput(f"checkpoint {path} holds a {name}, not a {model_name}; "
                                 "point to a checkpoint of this model")
        if kind_of(name) == "py" and model_name is None and factory is None and not trust_factory:
            module, _, attr = name[3:].partition(":")
            raise BadInput(
                f"{path} holds a {name} model: rebuilding it would import {module} and run {attr}(), "
                "code the file names but does not contain; load it with trust_factory=True if you "
                f"trust that code, or pass the callable itself (factory={attr})")
        if num_classes is not None and ck_classes != int(num_classes) and not reset_head:
            raise BadInput(
                f"checkpoint {path} has {ck_classes} classes, the dataset has {num_classes}; "
                "pass --reset-head (models[].reset_head: true) to re-initialise the head, "
                "or use a checkpoint trained on this dataset")
        sd, key, prefix, source = obj["state_dict"], None, "", "artifact"
        history, meta = obj.get("pruning_history") or [], obj.get("meta") or {}
        shape = tuple(obj.get("input_shape") or input_shape or (3, 32, 32))
        target = int(num_classes) if num_classes is not None else ck_classes
        hint = "the file is damaged or was written for another architecture"
    else:
        if artifact_only:
            raise BadInput(f"{path} is not a progprune artifact (a plain state_dict): build the "
                                 "model yourself and call load_state_dict")
        sd, key, prefix = unwrap(obj, path)
        if model_name is None or num_classes is None:
            raise BadInput(f"checkpoint {path} is a plain state_dict: give the model name and class count")
        name, history, meta, target = model_name, [], {}, int(num_classes)
        shape = tuple(input_shape or (3, 32, 32))
        source = "safetensors" if is_safetensors(path) else "state_dict"
        hint = "check the model name (the file holds another architecture's weights)"
    if digest:  # a base checkpoint: weights that are not finite rank nothing and prune nothing
        check_finite(sd, path)
    model, details = _materialize(path, name, target, sd, history, shape, reset_head, seed, hint, factory)
    info = {"format": FORMAT, "model": name, "num_classes": target, "input_shape": list(shape),
            "pruning_history": prior_history(model), "meta": meta, "source": source,
            "weights_key": key, "stripped_prefix": prefix, **details}
    if digest:
        info["sha256"] = sha256(path)
    return model, info


def load_pruned(path, *, trust_factory: bool = False, factory=None) -> nn.Module:
    """A model that progprune wrote (`pruned.pt`, `final.pt`, base artifacts), ready to use:
    the architecture at its pruned widths with the saved weights, in eval mode.

    Loads with `weights_only=True`: no code from the file runs. The file names its
    architecture; registry, `tv:` and `timm:` names are built from installed code. A
    `py:module:factory` name is code the file names but does not hold: it is imported and
    run only with `trust_factory=True`, or not at all when you pass the callable
    (`factory=build`, called as `build(num_classes=N)`)."""
    return load_pruned_info(path, trust_factory=trust_factory, factory=factory)[0]


def load_pruned_info(path, *, trust_factory: bool = False, factory=None) -> tuple[nn.Module, dict]:
    """`load_pruned`, with what the file records beside the weights (as `load_artifact`'s
    info: "model", "num_classes", "input_shape", "meta", ...)."""
    return _load(path, None, None, None, reset_head=False, seed=0, digest=False, artifact_only=True,
                 trust_factory=trust_factory, factory=factory)
