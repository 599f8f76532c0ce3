"""Artifacts: weights-only files that rebuild pruned models, and every bad file refused clearly."""
import os
import pickle
import subprocess
import sys

import pytest
import torch

import progprune
from progprune.artifacts import FORMAT, HISTORY_ATTR, load_artifact, load_pruned, save_artifact
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


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ProgpruneError, match="checkpoint not found"):
        load_artifact(tmp_path)


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
