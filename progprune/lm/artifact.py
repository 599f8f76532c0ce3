"""One file per pruned causal LM, moved by the store like an image model's `pruned.pt`.

A `torch.save` of plain data, loadable with `torch.load(weights_only=True)`:
{"format": "progprune-lm", "version": 1, "config": model.config.to_dict(), "state_dict"
(CPU tensors; a tied weight once, its aliases in "tied"), "tokenizer_files": {name: bytes}
(what tokenizer.save_pretrained writes), "history", "meta"}. The config holds every width
(heads, head_dim, MLP, hidden size, layers), so transformers' Auto classes rebuild the
architecture offline and the state dict loads strictly.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import torch

from .._atomic import StagedDir, atomic_path
from ..errors import BadInput

FORMAT = "progprune-lm"
VERSION = 1


def save_lm(path, model, tokenizer, *, history=None, meta=None) -> str:
    """Write `model` (and `tokenizer`, if any) to `path` atomically; returns the path."""
    sd = model.state_dict()
    by_ptr: dict = {}
    tied, state = {}, {}
    for key, value in sd.items():
        ptr = (value.data_ptr(), tuple(value.shape), value.dtype)
        if ptr in by_ptr:
            tied[key] = by_ptr[ptr]
        else:
            by_ptr[ptr] = key
            state[key] = value.detach().cpu().clone()
    files = {}
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for f in sorted(Path(tmp).rglob("*")):
                if f.is_file():
                    files[str(f.relative_to(tmp))] = f.read_bytes()
    payload = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
               "state_dict": state, "tied": tied, "tokenizer_files": files,
               "history": list(history or []), "meta": dict(meta or {})}
    path = os.fspath(path)
    with atomic_path(path, ".pt") as tmp:
        torch.save(payload, tmp)
    return path


def is_lm_artifact(path) -> bool:
    """Whether `path` is a progprune LM file: reads the start of its pickle only (the
    format string is the dict's first entry), not the weights."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/data.pkl")), None)
            if name is None:
                return False
            with zf.open(name) as f:
                return FORMAT.encode() in f.read(256)
    except (OSError, zipfile.BadZipFile):
        return False


def _read(path) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadInput(f"{path} does not exist", field="path")
    if not is_lm_artifact(path):
        raise BadInput(f"{path} is not a progprune LM artifact (format {FORMAT!r}); "
                       "give a file written by save_lm", field="path")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("version") != VERSION:
        raise BadInput(f"{path} is a progprune LM artifact of version {payload.get('version')}; "
                       f"this progprune reads version {VERSION}", field="path")
    return payload


def _tokenizer(files: dict):
    if not files:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _write_files(tmp, files)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def _write_files(folder, files: dict) -> None:
    for name, data in files.items():
        target = Path(folder) / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BadInput(f"tokenizer file name {name!r} leaves the folder", field="path")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _build(payload):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(payload["config"])
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    state = dict(payload["state_dict"])
    for alias, key in payload.get("tied", {}).items():
        state[alias] = state[key]
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_lm(path):
    """(model in eval mode, tokenizer or None, info {"history", "meta", "config"}) from a
    file written by `save_lm`, offline."""
    payload = _read(path)
    info = {"history": payload["history"], "meta": payload["meta"], "config": payload["config"]}
    return _build(payload), _tokenizer(payload["tokenizer_files"]), info


def export_hf(path, out_dir) -> str:
    """A directory that `AutoModelForCausalLM.from_pretrained(out_dir)` and
    `AutoTokenizer.from_pretrained(out_dir)` load offline, with load_lm's logits. Written in a
    staging directory beside `out_dir` and renamed into place (an existing empty `out_dir`
    gets the files moved in); refuses a non-empty `out_dir`, before reading anything."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise BadInput(f"{out_dir} already exists and is not an empty directory; "
                       "choose a new --output", field="output")
    payload = _read(path)
    model = _build(payload)
    staged = StagedDir(out_dir)
    with staged as stage:
        model.save_pretrained(stage)
        _write_files(stage, payload["tokenizer_files"])
        staged.publish(sorted(os.listdir(stage)))
    return out_dir
