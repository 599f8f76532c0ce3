"""Artifacts: weights-only files that rebuild pruned models, and every bad file refused clearly."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

import progprune
from progprune.artifacts import (FORMAT, HISTORY_ATTR, load_artifact, load_base_weights, load_pruned,
                                 save_artifact)
from progprune.config import PruneConfig
from progprune.errors import ProgpruneError
from progprune.models import build_model, example_inputs
from progprune.pruning import make_pruner, progressive_prune


@pytest.fixture(scope="module")
def pruned_resnet20(tmp_path_factory):
    """A resnet20 pruned to 2x with trained-looking (perturbed) BN stats, saved once."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    ex = example_inputs()
    cfg = PruneConfig(iterative_steps=100)
    out = progressive_prune(model, make_pruner(model, ex, cfg, 10), ex, 2.0, cfg)
    assert out.status == "ok"
    with torch.no_grad():  # non-default BN buffers, so a lost buffer shows in the outputs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("art") / "pruned.pt"
    save_artifact(path, model, model_name="resnet20", num_classes=10, history=out.history,
                  meta={"note": "test"})
    return model, path, out


def _inputs():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def test_round_trip_in_a_fresh_process(pruned_resnet20, tmp_path):
    model, path, _ = pruned_resnet20
    with torch.no_grad():
        expected = model(_inputs())
    out_file = tmp_path / "out.pt"
    code = (
        "import sys, torch\n"
        "from progprune.artifacts import load_artifact\n"
        "m, info = load_artifact(sys.argv[1], model_name='resnet20', num_classes=10)\n"
        "x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))\n"
        "with torch.no_grad():\n"
        "    torch.save({'y': m(x), 'training': m.training, 'meta': info['meta']}, sys.argv[2])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(out_file)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(out_file, weights_only=True)
    assert torch.equal(got["y"], expected)
    assert got["training"] is False and got["meta"] == {"note": "test"}


def test_round_trip_in_process_restores_widths(pruned_resnet20):
    model, path, out = pruned_resnet20
    loaded, info = load_artifact(path)
    assert info["model"] == "resnet20" and info["num_classes"] == 10 and info["format"] == FORMAT
    assert "state_dict" not in info
    assert info["pruning_history"] == out.history
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(loaded(_inputs()), model(_inputs()))


def test_file_is_plain_weights(pruned_resnet20):
    _, path, _ = pruned_resnet20
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == FORMAT and obj["model"] == "resnet20"
    assert all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values())


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = build_model("resnet20", 10)
    p = save_artifact(tmp_path / "sub" / "m.pt", model, model_name="resnet20", num_classes=10)
    assert os.listdir(tmp_path / "sub") == ["m.pt"] and p.endswith("m.pt")


class _Exploit:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, writer):
    bad, marker = tmp_path / "bad.pt", tmp_path / "pwned"
    payload = {"format": FORMAT, "model": "resnet20", "num_classes": 10, "state_dict": _Exploit(marker)}
    if writer == "torch_zip":
        torch.save(payload, bad)
    else:
        bad.write_bytes(pickle.dumps(payload))
    with pytest.raises(ProgpruneError, match=f"checkpoint {bad}"):
        load_artifact(bad)
    assert not marker.exists()
    # the plant is live: a naive loader would have run it
    if writer == "torch_zip":
        torch.load(bad, weights_only=False)
    else:
        pickle.loads(bad.read_bytes())
    assert marker.exists()


def test_malicious_pickle_message_says_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": _Exploit(tmp_path / "pwned")}, bad)
    with pytest.raises(ProgpruneError, match="refused: it would import"):
        load_artifact(bad)


def test_malicious_pickle_message_names_the_blocked_global(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": _Exploit(tmp_path / "pwned")}, bad)
    with pytest.raises(ProgpruneError) as e:
        load_artifact(bad)
    assert "system" in str(e.value) and "In PyTorch 2.6" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ProgpruneError, match="checkpoint not found: .*nope.pt"):
        load_artifact(tmp_path / "nope.pt")


@pytest.mark.parametrize("kind, words", [("directory", "is a directory, not a regular file"),
                                         ("fifo", "is a FIFO (named pipe), not a regular file"),
                                         ("dev_zero", "is a character device, not a regular file")])
def test_what_is_not_a_file_is_named(tmp_path, kind, words):
    """A folder, a FIFO or /dev/zero given as a checkpoint: say what it is (it was "not
    found"; a FIFO must not block the reader, /dev/zero must not be read forever)."""
    path = {"directory": tmp_path, "dev_zero": "/dev/zero"}.get(kind, tmp_path / "pipe")
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(ProgpruneError) as e:
        load_artifact(path)
    assert str(e.value) == f"checkpoint {path} {words}; give the checkpoint file"


class _Plain:  # an object, not code: the weights-only loader refuses it all the same
    pass


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_raw_pickle_with_code_is_called_code_not_damage(tmp_path, protocol):
    """Raw pickles of every protocol: torch's weights-only unpickler stops at an opcode
    (protocol 0's DICT, 4's FRAME) before it meets the global, so the file read as "a
    damaged or truncated pickle". It names what the pickle would import, and runs none of it."""
    marker = tmp_path / "pwned"
    bad, obj = tmp_path / "bad.pt", tmp_path / "obj.pt"
    bad.write_bytes(pickle.dumps({"format": FORMAT, "state_dict": _Exploit(marker)}, protocol=protocol))
    obj.write_bytes(pickle.dumps({"state_dict": _Plain()}, protocol=protocol))
    with pytest.raises(ProgpruneError) as e:
        load_artifact(bad)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {bad} refused: it would import posix.system (a pickle that holds code)")
    assert "weights-only loader refuses" in msg and "damaged" not in msg and "corrupt" not in msg
    with pytest.raises(ProgpruneError, match=r"refused: it would import .*test_artifacts\._Plain"):
        load_artifact(obj)
    assert not marker.exists()


def test_a_plain_data_pickle_is_not_called_damaged(tmp_path):
    p = tmp_path / "old.pt"
    p.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=0))
    with pytest.raises(ProgpruneError, match="is a pickle in a form the weights-only loader does not read"):
        load_artifact(p)


def test_random_bytes(tmp_path):
    p = tmp_path / "random.pt"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(ProgpruneError, match=f"checkpoint {p}"):
        load_artifact(p)


def test_truncated_zip(tmp_path):
    p = tmp_path / "corrupt.pt"
    p.write_bytes(b"PK\x03\x04truncated zip")
    with pytest.raises(ProgpruneError, match="corrupt or not a torch file"):
        load_artifact(p)


@pytest.mark.parametrize("content", [b"", b"hello world\n"], ids=["empty", "text"])
def test_corrupt_file_is_reported_as_corrupt(tmp_path, content):
    p = tmp_path / "corrupt.pt"
    p.write_bytes(content)
    with pytest.raises(ProgpruneError, match="corrupt or not a torch file"):
        load_artifact(p)


def test_random_bytes_are_reported_as_corrupt(tmp_path):
    p = tmp_path / "random.pt"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(ProgpruneError, match="corrupt or not a torch file"):
        load_artifact(p)


def test_truncated_artifact(pruned_resnet20, tmp_path):
    _, path, _ = pruned_resnet20
    p = tmp_path / "half.pt"
    p.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ProgpruneError, match="corrupt or not a torch file"):
        load_artifact(p)


def test_not_a_dict(tmp_path):
    p = tmp_path / "t.pt"
    torch.save(torch.zeros(3), p)
    with pytest.raises(ProgpruneError, match="expected a dict of weights, got Tensor"):
        load_artifact(p)


def test_another_architecture(pruned_resnet20):
    _, path, _ = pruned_resnet20
    with pytest.raises(ProgpruneError, match="holds a resnet20, not a resnet32; point to a checkpoint"):
        load_artifact(path, model_name="resnet32", num_classes=10)


def test_another_class_count(pruned_resnet20):
    _, path, _ = pruned_resnet20
    with pytest.raises(ProgpruneError, match="has 10 classes, the dataset has 100"):
        load_artifact(path, model_name="resnet20", num_classes=100)


def test_plain_state_dict_of_the_wrong_architecture(tmp_path):
    p = tmp_path / "vgg.pt"
    torch.save(build_model("vgg11", 10).state_dict(), p)
    with pytest.raises(ProgpruneError, match="does not fit resnet20 with 10 classes.*check the model name"):
        load_artifact(p, model_name="resnet20", num_classes=10)


def test_plain_state_dict_of_another_class_count(tmp_path):
    p = tmp_path / "r100.pt"
    torch.save(build_model("resnet20", 100).state_dict(), p)
    with pytest.raises(ProgpruneError, match=r"has a 100-class head \(fc.weight \[100, 64\]\), the dataset has 10"):
        load_artifact(p, model_name="resnet20", num_classes=10)


def test_plain_state_dict_loads_with_name_and_classes(tmp_path):
    torch.manual_seed(1)
    src = build_model("resnet20", 10).eval()
    for key, sd in (("plain", src.state_dict()), ("wrapped", {"state_dict": src.state_dict()})):
        p = tmp_path / f"{key}.pt"
        torch.save(sd, p)
        loaded, info = load_artifact(p, model_name="resnet20", num_classes=10)
        assert info["model"] == "resnet20" and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(_inputs()), src(_inputs()))
        with pytest.raises(ProgpruneError, match="plain state_dict: give the model name and class count"):
            load_artifact(p)


def test_dict_without_tensors(tmp_path):
    p = tmp_path / "d.pt"
    torch.save({"a": 1, "b": "x"}, p)
    with pytest.raises(ProgpruneError, match="neither a progprune artifact nor a state_dict"):
        load_artifact(p, model_name="resnet20", num_classes=10)


# ---- histories compose: prune a pruned model, the artifact reloads --------------------
def _prune(model, speedup):
    ex = example_inputs()
    cfg = PruneConfig(iterative_steps=10)
    out = progressive_prune(model, make_pruner(model, ex, cfg, 10), ex, speedup, cfg)
    assert out.status == "ok"
    return out


@pytest.fixture(scope="module", params=["resnet20", "vgg11", "mobilenetv2"])
def two_rounds(request, tmp_path_factory):
    """`prune --speedup 1.2 --out A`, then `prune --speedup 1.5 --checkpoint A/pruned.pt --out B`,
    with the stage functions' calls: load_artifact -> progressive_prune -> save_artifact."""
    name, d = request.param, tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    first = _prune(model, 1.2)
    a = save_artifact(d / "A.pt", model, model_name=name, num_classes=10, history=first.history)
    again, info = load_artifact(a, model_name=name, num_classes=10)
    assert info["pruning_history"] == first.history and getattr(again, HISTORY_ATTR) == first.history
    second = _prune(again, 1.5)
    b = save_artifact(d / "B.pt", again, model_name=name, num_classes=10, history=second.history)
    return name, again, first, second, b, d


def test_two_rounds_reload_with_identical_outputs(two_rounds):
    name, model, first, second, b, _ = two_rounds
    loaded, info = load_artifact(b, model_name=name, num_classes=10)
    assert info["rebuilt_from"] == "history"
    assert info["pruning_history"] == first.history + second.history
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(loaded(_inputs()), model(_inputs()))


def test_artifact_written_before_the_fix_reloads_by_its_shapes(two_rounds):
    """The old pipeline saved only the last round's history: the weights still decide."""
    name, model, first, second, _, d = two_rounds
    old = d / "old-B.pt"
    obj = torch.load(d / "B.pt", weights_only=True)
    obj["pruning_history"] = second.history
    torch.save(obj, old)
    loaded, info = load_artifact(old, model_name=name, num_classes=10)
    assert info["rebuilt_from"] == "shapes"
    with torch.no_grad():
        assert torch.equal(loaded(_inputs()), model(_inputs()))
    # re-saved, it carries a history that replays exactly
    fixed = save_artifact(d / "fixed.pt", loaded, model_name=name, num_classes=10)
    loaded2, info2 = load_artifact(fixed)
    assert info2["rebuilt_from"] == "history"
    with torch.no_grad():
        assert torch.equal(loaded2(_inputs()), model(_inputs()))


def test_save_without_new_history_keeps_the_loaded_one(pruned_resnet20, tmp_path):
    """The sweep stores a loaded base model again (history=None): it must stay loadable."""
    model, path, out = pruned_resnet20
    loaded, _ = load_artifact(path)
    p = save_artifact(tmp_path / "base.pt", loaded, model_name="resnet20", num_classes=10)
    assert torch.load(p, weights_only=True)["pruning_history"] == out.history
    with torch.no_grad():
        assert torch.equal(load_pruned(p)(_inputs()), model(_inputs()))


# ---- the public loader ----------------------------------------------------------------
def test_load_pruned_is_public_and_ready_to_use(pruned_resnet20):
    model, path, _ = pruned_resnet20
    with torch.no_grad():  # where users load models for inference
        loaded = progprune.load_pruned(path)
    assert isinstance(loaded, torch.nn.Module) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(_inputs()), model(_inputs()))
    assert "load_pruned" in progprune.__all__


def test_load_pruned_refuses_a_plain_state_dict(tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(build_model("resnet20", 10).state_dict(), p)
    with pytest.raises(ProgpruneError, match="not a progprune artifact.*load_state_dict"):
        progprune.load_pruned(p)


def test_import_progprune_stays_cheap():
    code = "import sys, progprune; print(sorted(m for m in ('torch', 'ray', 'torch_pruning') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---- py: models: loading a file imports no code it names, unless the caller opts in ------
_FACTORY = """
import os
import torch

open(os.path.join(os.path.dirname(__file__), "imported"), "w").close()  # the side effect


def build(num_classes):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, num_classes))
"""


def test_a_py_model_artifact_imports_its_factory_only_when_asked(tmp_path, monkeypatch):
    """An artifact of `py:module:factory` names code it does not hold: `load_pruned(path)`
    used to import that module from the working directory and call it. Now it refuses
    (naming the module), runs it with trust_factory=True, and never imports it when the
    caller passes the factory itself. A caller who names the model (prune --checkpoint
    --model py:...) has named the code."""
    (tmp_path / "art_factory_mod.py").write_text(_FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    path = save_artifact(tmp_path / "m.pt", model, model_name="py:art_factory_mod:build", num_classes=10)
    imported = tmp_path / "imported"
    for load in (lambda: load_pruned(path), lambda: progprune.load_pruned(path), lambda: load_artifact(path)):
        with pytest.raises(ProgpruneError) as e:
            load()
        assert "would import art_factory_mod and run build()" in str(e.value)
        assert "trust_factory=True" in str(e.value)
    assert not imported.exists()

    def build(num_classes):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(8, num_classes))

    with torch.no_grad():
        assert torch.equal(progprune.load_pruned(path, factory=build)(_inputs()), model(_inputs()))
        assert not imported.exists()
        assert torch.equal(load_pruned(path, trust_factory=True)(_inputs()), model(_inputs()))
    assert imported.exists()
    loaded, _ = load_artifact(path, model_name="py:art_factory_mod:build", num_classes=10)  # named by the caller
    assert isinstance(loaded, torch.nn.Module)


# ---- every size a file claims is bounded before anything is allocated --------------------
@pytest.mark.parametrize("field, value, words", [
    ("input_shape", [3, 100000, 100000], "input_shape must be [C, H, W] with H and W in [1, 4096]"),
    ("input_shape", [3, 4097, 32], "input_shape must be [C, H, W]"),
    ("input_shape", [4096, 4096, 4096], "C*H*W at most 3x4096x4096"),
    ("input_shape", [3, 32], "input_shape must be [C, H, W]"),
    ("input_shape", [3, 32.0, 32], "input_shape must be [C, H, W]"),
    ("num_classes", 2**40, "num_classes must be an integer in [1, 100000], got 1099511627776"),
    ("num_classes", 100_001, "num_classes must be an integer in [1, 100000], got 100001"),
    ("num_classes", "10", "num_classes must be an integer in [1, 100000], got '10'"),
    ("model", 7, "model must be a model name, got 7"),
    ("pruning_history", [["conv1", True, [-1]]], "pruning_history[0] must be [layer name, is_out, [channel index"),
    ("state_dict", None, "state_dict must be a dict of tensors"),
], ids=["huge_image", "image_4097", "huge_channels", "two_dims", "float_dim", "tera_classes",
        "100001_classes", "text_classes", "model_not_text", "negative_index", "no_state_dict"])
def test_every_size_field_is_checked_before_anything_is_built(pruned_resnet20, tmp_path, field, value, words):
    """An artifact claiming [3, 100000, 100000] inputs (120 GB) or 2^40 classes was built
    and traced at that size by `load_pruned` and `prune --checkpoint`: each field is checked
    against the schema's bounds (dataset.image_size, dataset.num_classes) first, one line
    naming it."""
    _, path, _ = pruned_resnet20
    obj = torch.load(path, weights_only=True)
    obj[field] = value
    bad = tmp_path / "claims.pt"
    torch.save(obj, bad)
    for load in (lambda: load_pruned(bad), lambda: load_base_weights(bad, "resnet20", 10, (3, 32, 32))):
        with pytest.raises(ProgpruneError) as e:
            load()
        assert str(e.value).startswith(f"checkpoint {bad}: {field}") and words in str(e.value), str(e.value)
        assert "damaged or was not written by progprune" in str(e.value)
