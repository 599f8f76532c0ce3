"""`progprune export`: the exported model computes what `load_pruned`'s does (ONNX run in
onnxruntime, TorchScript loaded back), the metadata reads back, and every bad input is one
line, exit 2, nothing written."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import progprune
from helpers import progprune as cli
from helpers import progprune_in_process as _in
from progprune.artifacts import load_pruned, save_artifact
from progprune.data import load_dataset
from progprune.config import DatasetConfig
from progprune.export import NOT_RECORDED, export_artifact, read_metadata
from progprune.models import build_model

SIZE = 32


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A real pruned artifact: resnet20 pruned 1.5x on synthetic data by `progprune prune`."""
    out = tmp_path_factory.mktemp("export") / "run"
    r = _in("prune", "--model", "resnet20", "--dataset", "synthetic", "--base-epochs", "0",
            "--finetune-epochs", "0", "--speedup", "1.5", "--iterative-steps", "20",
            "--latency-repeats", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    return out / "pruned.pt"


def _inputs(batch):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))


def test_onnx_round_trip_through_the_cli(pruned, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    r = cli("export", pruned, "--format", "onnx", "--output", out)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith(f"wrote {out} (onnx: resnet20, 10 classes, input [N, 3, 32, 32])")
    model = load_pruned(pruned)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("input", "logits") and not isinstance(inp.shape[0], int)  # dynamic batch
    for batch in (1, 5):
        x = _inputs(batch)
        with torch.no_grad():
            want = model(x).numpy()
        (got,) = session.run(None, {"input": x.numpy()})
        assert got.shape == (batch, 10) and np.abs(got - want).max() <= 1e-4


def test_torchscript_round_trip_through_the_cli(pruned, tmp_path):
    out = tmp_path / "model.ts.pt"
    r = _in("export", pruned, "--format", "torchscript", "--output", out)
    assert r.returncode == 0, r.stderr
    model, scripted = load_pruned(pruned), torch.jit.load(str(out))
    for batch in (1, 5):
        x = _inputs(batch)
        with torch.no_grad():
            assert (scripted(x) - model(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fmt, name", [("onnx", "m.onnx"), ("torchscript", "m.torchscript.pt")])
def test_metadata_reads_back(pruned, tmp_path, fmt, name):
    meta = read_metadata(export_artifact(pruned, fmt, tmp_path / name))
    assert meta["progprune.model"] == "resnet20" and meta["progprune.num_classes"] == "10"
    assert json.loads(meta["progprune.input_shape"]) == [3, SIZE, SIZE]
    assert meta["progprune.version"] == progprune.__version__
    assert (meta["progprune.input_name"], meta["progprune.output_name"]) == ("input", "logits")
    norm = json.loads(meta["progprune.normalization"])
    data = load_dataset(DatasetConfig(name="synthetic"), seed=0)  # what the prune normalised with
    assert norm["dataset"] == meta["progprune.dataset"] == "synthetic"
    assert norm["mean"] == pytest.approx(list(data.mean)) and norm["std"] == pytest.approx(list(data.std))
    assert len(meta["progprune.combo_id"]) == 16


def test_an_artifact_that_records_no_normalisation_says_so(tmp_path):
    art = save_artifact(tmp_path / "plain.pt", build_model("resnet20", 10), model_name="resnet20", num_classes=10)
    meta = read_metadata(export_artifact(art, "onnx", tmp_path / "plain.onnx"))
    assert meta["progprune.normalization"] == NOT_RECORDED and meta["progprune.dataset"] == "not recorded"


# ---- bad input: exit 2, one line, nothing written -----------------------------------------
def _refused(*args, run=_in, watch):
    before = sorted(os.listdir(watch))
    r = run("export", *args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr + r.stdout
    assert sorted(os.listdir(watch)) == before
    return lines[0]


def test_not_an_artifact_in_a_real_process(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not weights")
    line = _refused(text, "--format", "onnx", "--output", tmp_path / "m.onnx", run=cli, watch=tmp_path)
    assert f"{text} is corrupt or not a torch file" in line


def test_a_plain_state_dict_is_not_an_artifact(tmp_path):
    sd = tmp_path / "weights.pt"
    torch.save(build_model("resnet20", 10).state_dict(), sd)
    line = _refused(sd, "--format", "onnx", "--output", tmp_path / "m.onnx", watch=tmp_path)
    assert "is not a progprune artifact" in line


def test_a_missing_artifact(tmp_path):
    line = _refused(tmp_path / "nope.pt", "--format", "onnx", "--output", tmp_path / "m.onnx", watch=tmp_path)
    assert "not found" in line


def test_unknown_format(pruned, tmp_path):
    line = _refused(pruned, "--format", "tflite", "--output", tmp_path / "m.tflite", watch=tmp_path)
    assert line == "error: --format: unknown export format 'tflite'; valid: onnx, torchscript, hf"


@pytest.mark.parametrize("where, words", [
    ("missing/m.onnx", "does not exist; create it or choose another --output"),
    (".", "is a directory; name the file to write"),
    ("exists.onnx", "exists; choose another --output, or pass --force to replace it"),
])
def test_output_that_cannot_be_written(pruned, tmp_path, where, words):
    (tmp_path / "exists.onnx").write_bytes(b"keep me")
    line = _refused(pruned, "--format", "onnx", "--output", tmp_path / where, watch=tmp_path)
    assert line.startswith("error: --output: ") and words in line
    assert (tmp_path / "exists.onnx").read_bytes() == b"keep me"


def test_output_over_the_artifact_itself(pruned):
    line = _refused(pruned, "--format", "onnx", "--output", pruned, "--force", watch=pruned.parent)
    assert "is the artifact itself" in line
    assert load_pruned(pruned) is not None


def test_onnx_not_installed(pruned, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` meets when it is absent
    line = _refused(pruned, "--format", "onnx", "--output", tmp_path / "m.onnx", watch=tmp_path)
    assert line == ("error: export to ONNX needs the onnx package, which is not installed: "
                    "pip install onnx (or pip install 'progprune[export]')")


def test_force_replaces_atomically(pruned, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    r = _in("export", pruned, "--format", "onnx", "--output", out, "--force")
    assert r.returncode == 0, r.stderr
    assert read_metadata(out)["progprune.model"] == "resnet20"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporary file left beside it
