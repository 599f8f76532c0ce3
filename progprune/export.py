"""The deployable model of a pruned artifact: ONNX (dynamic batch axis) or TorchScript,
with what a server needs to feed it recorded in the file itself.

`onnx_bytes` is the one ONNX export: `progprune export`, a run's `export: [onnx]` and the
`onnxruntime` runtime (progprune.runtimes), which times the very graph a user deploys, all
call it. It uses torch's TorchScript-based exporter (`dynamo=False`): it needs no package
beyond `onnx` and exports the registry, torchvision and timm classifiers here offline; the
torch.export-based one (torch's default since 2.9) needs onnxscript as well.

Metadata (ONNX: the model's metadata_props; TorchScript: the `_extra_files` entry
"progprune.json"), every value a string: progprune.model, .num_classes, .input_shape (one
image, C,H,W; the batch axis is dynamic), .input_name / .output_name, .normalization (JSON
{"mean", "std", "formula"} or a sentence saying nothing recorded it), .dataset,
.combo_id, .version (progprune's). `read_metadata` reads either back.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import warnings
from typing import Callable

import torch
import torch.nn as nn

from progprune import __version__
from progprune._atomic import atomic_path
from progprune.errors import BadInput, CombinationFailed, one_line
from progprune.models import logits_of
from progprune.storage.layout import EXPORT_SUFFIX, export_name

FORMATS = tuple(EXPORT_SUFFIX)  # onnx, torchscript
INPUT, OUTPUT = "input", "logits"
OPSET = 17
EXTRA_FILE = "progprune.json"  # TorchScript: the metadata, one JSON object
NORMALIZATION = "normalization"  # the artifact meta key pipeline runs record
NOT_RECORDED = ("not recorded: the artifact does not say how its inputs were normalised (written before "
                "progprune recorded it, or outside a progprune run); feed what the model was trained on")
_PIP = {"onnx": "onnx", "onnxruntime": "onnxruntime"}


class ExportFailed(CombinationFailed):
    """The model would not export (an operation the exporter cannot express): not bad input,
    a failure of this model in this format (exit 1; in a run, a failed row saying why)."""


def need(module: str, what: str):
    """Import `module`, or BadInput naming what needs it and what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BadInput(f"{what} needs the {module} package, which is not installed: pip install "
                       f"{_PIP.get(module, module)} (or pip install 'progprune[export]')") from None


def check_format(fmt, field: str = "--format") -> None:
    if fmt not in FORMATS:
        raise BadInput(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}", field=field)
    if fmt == "onnx":
        need("onnx", "export to ONNX")


class _Logits(nn.Module):
    """The model's forward reduced to its logits (a py: model may return a ModelOutput)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.train(model.training)  # the exporter restores the wrapper's mode, recursively

    def forward(self, x):
        return logits_of(self.model(x))


def onnx_bytes(model: nn.Module, example: torch.Tensor, metadata: dict | None = None) -> bytes:
    """`model` (eval mode; not changed) as an ONNX graph of opset OPSET, input INPUT with a
    dynamic batch axis, output OUTPUT (the logits); `metadata` into its metadata_props."""
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
            torch.onnx.export(_Logits(model), (example,), buf, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    except Exception as e:  # broad on purpose: the exporter raises many types for one meaning
        raise ExportFailed(f"could not export the model to ONNX: {one_line(e, with_type=True)}") from None
    data = buf.getvalue()
    if metadata:
        onnx = need("onnx", "export to ONNX")
        proto = onnx.load_from_string(data)
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        data = proto.SerializeToString()
    return data


def torchscript_bytes(model: nn.Module, example: torch.Tensor, metadata: dict | None = None) -> bytes:
    """`model` traced to TorchScript (eval mode; not changed), `metadata` as EXTRA_FILE."""
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation warnings
            traced = torch.jit.trace(_Logits(model), example, check_trace=False)
            torch.jit.save(traced, buf, _extra_files={EXTRA_FILE: json.dumps(metadata or {})})
    except Exception as e:  # broad on purpose: tracing raises many types for one meaning
        raise ExportFailed(f"could not trace the model to TorchScript: {one_line(e, with_type=True)}") from None
    return buf.getvalue()


_WRITERS = {"onnx": onnx_bytes, "torchscript": torchscript_bytes}


def metadata(info: dict) -> dict[str, str]:
    """What the export records, from an artifact's info (`load_pruned_info`)."""
    meta = info.get("meta") or {}
    norm = meta.get(NORMALIZATION)
    return {
        "progprune.model": str(info["model"]),
        "progprune.num_classes": str(int(info["num_classes"])),
        "progprune.input_shape": json.dumps([int(v) for v in info["input_shape"]]),
        "progprune.input_name": INPUT, "progprune.output_name": OUTPUT,
        "progprune.normalization": json.dumps(norm) if norm else NOT_RECORDED,
        "progprune.dataset": str((norm or {}).get("dataset") or meta.get("dataset") or "not recorded"),
        "progprune.combo_id": str(meta.get("combo_id") or ""),
        "progprune.version": __version__,
    }


def run_meta(combo_id: str, splits) -> dict:
    """What a run's pruned or fine-tuned artifact records beside its weights: its combination
    and how its inputs are normalised (the data set's; what an export of it then records)."""
    return {"combo_id": combo_id, NORMALIZATION: {
        "dataset": splits.name, "mean": [float(v) for v in splits.mean], "std": [float(v) for v in splits.std],
        "formula": "x = (pixel / 255 - mean) / std, per channel (RGB), NCHW float32"}}


def record_exports(row, formats, write: Callable[[], list[str]]) -> None:
    """The export stage of a run: name in `row` (export_uris, a JSON list) the files `write`
    puts beside its artifact in `formats`; an export that fails (`ExportFailed`) fails the
    row, saying why (the artifact stays)."""
    try:
        row.export_uris = json.dumps(write()) if formats else None
    except CombinationFailed as e:
        row.status, row.error = "failed", f"export: {e}"


def check_output(output: str, artifact: str | None = None, force: bool = False) -> None:
    """Before any work: `output` is a file that can be written, not the artifact itself."""
    if not str(output).strip():
        raise BadInput("empty output path; name the file to write", field="--output")
    parent = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise BadInput(f"{output} is a directory; name the file to write", field="--output")
    if artifact is not None and os.path.abspath(output) == os.path.abspath(artifact):
        raise BadInput(f"{output} is the artifact itself; name another file", field="--output")
    if not os.path.isdir(parent):
        raise BadInput(f"directory {parent} does not exist; create it or choose another --output",
                       field="--output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"cannot write to {parent}; choose a writable directory", field="--output")
    if os.path.lexists(output) and not force:
        raise BadInput(f"{output} exists; choose another --output, or pass --force to replace it",
                       field="--output")


def export_artifact(artifact, fmt: str, output, *, force: bool = False, trust_factory: bool = False) -> str:
    """Write the model of the progprune artifact `artifact` (as `load_pruned` rebuilds it) to
    `output` in `fmt`, atomically (a failure leaves no file). Bad input (BadInput, before any
    work): an unknown format, a missing exporter package, an output that cannot be written,
    a file that is not a progprune artifact."""
    from progprune.artifacts import load_pruned_info

    artifact, output = os.fspath(artifact), os.fspath(output)
    check_format(fmt)
    check_output(output, artifact, force)
    model, info = load_pruned_info(artifact, trust_factory=trust_factory)
    data = _WRITERS[fmt](model, torch.zeros(1, *info["input_shape"]), metadata(info))
    with atomic_path(output, EXPORT_SUFFIX[fmt]) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return output


def export_beside(artifact: str, formats, trust_factory: bool = True) -> list[str]:
    """Each of `formats` written beside the local artifact file (pruned.pt -> pruned.onnx);
    returns the paths. For a run's own artifact: the model it names is the run's own."""
    out = []
    for fmt in formats:
        path = os.path.join(os.path.dirname(artifact), export_name(os.path.basename(artifact), fmt))
        out.append(export_artifact(artifact, fmt, path, force=True, trust_factory=trust_factory))
    return out


def read_metadata(path) -> dict[str, str]:
    """The metadata an exported file carries (ONNX or TorchScript, by its suffix)."""
    path = os.fspath(path)
    if path.endswith(EXPORT_SUFFIX["onnx"]):
        onnx = need("onnx", "reading ONNX metadata")
        return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    extra = {EXTRA_FILE: ""}
    torch.jit.load(path, map_location="cpu", _extra_files=extra)
    return json.loads(extra[EXTRA_FILE])
