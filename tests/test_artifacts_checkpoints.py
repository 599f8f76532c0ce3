"""Base checkpoints people actually have: plain state_dicts, the usual wrappers, DDP and
torch.compile prefixes, .safetensors, other class counts (--reset-head), and errors that
say what does not fit."""
import hashlib

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from progprune.artifacts import HISTORY_ATTR, head_name, load_base_weights, save_artifact
from progprune.config import PruneConfig
from progprune.errors import ProgpruneError
from progprune.models import build_model, example_inputs
from progprune.models.resnet import CifarResNet
from progprune.pruning import make_pruner, progressive_prune


def _inputs():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _trained_looking(name, classes, seed=1):
    """A model whose weights and BN buffers all differ from any fresh init."""
    torch.manual_seed(seed)
    m = build_model(name, classes).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
    return m


def _same_outputs(a, b):
    with torch.no_grad():
        return torch.equal(a(_inputs()), b(_inputs()))


@pytest.fixture(scope="module")
def src():
    return _trained_looking("resnet20", 10)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "model_ema", "nested"])
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_plain_and_wrapped_state_dicts(src, tmp_path, wrap, suffix):
    sd = src.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 90, "arch": "resnet20"},
           "model": {"model": sd, "optimizer": {"state": {}, "param_groups": []}},
           "model_ema": {"model_ema": sd, "epoch": 3},
           "nested": {"model": {"state_dict": sd}}}[wrap]
    p = tmp_path / f"ck{suffix}"
    torch.save(obj, p)
    model, info = load_base_weights(p, "resnet20", 10, (3, 32, 32))
    assert _same_outputs(model, src) and not model.training
    assert info["source"] == "state_dict" and info["reset_head"] is False
    assert info["weights_key"] == {"plain": None, "nested": "model.state_dict"}.get(wrap, wrap)
    assert info["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert info["pruning_history"] == [] and info["checkpoint_classes"] == 10


def test_wrapper_prefers_state_dict_over_ema(src, tmp_path):
    ema = _trained_looking("resnet20", 10, seed=2)
    p = tmp_path / "both.pt"
    torch.save({"model_ema": ema.state_dict(), "state_dict": src.state_dict()}, p)
    model, info = load_base_weights(p, "resnet20", 10)
    assert info["weights_key"] == "state_dict" and _same_outputs(model, src)


def test_ddp_and_compile_prefixes(src, tmp_path):
    """Real wrappers: DataParallel (the same `module.` keys as DDP) inside torch.compile."""
    wrapped = torch.compile(nn.DataParallel(src))
    sd = wrapped.state_dict()
    assert next(iter(sd)).startswith("_orig_mod.module.")  # the construction is what users save
    p = tmp_path / "compiled.pt"
    torch.save({"model": sd}, p)
    model, info = load_base_weights(p, "resnet20", 10)
    assert info["stripped_prefix"] == "_orig_mod.module." and _same_outputs(model, src)


def test_safetensors(src, tmp_path):
    p = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(p))
    model, info = load_base_weights(p, "resnet20", 10)
    assert info["source"] == "safetensors" and _same_outputs(model, src)
    renamed = tmp_path / "weights.bin"  # recognised by its header, not only by the suffix
    renamed.write_bytes(p.read_bytes())
    model, info = load_base_weights(renamed, "resnet20", 10)
    assert info["source"] == "safetensors" and _same_outputs(model, src)


def test_corrupt_safetensors_is_one_line(src, tmp_path):
    p = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(p))
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(ProgpruneError, match="corrupt safetensors file") as e:
        load_base_weights(p, "resnet20", 10)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,head", [("resnet20", "fc"), ("vgg11", "classifier"), ("mobilenetv2", "conv2")])
def test_head_of_another_class_count(tmp_path, name, head):
    src = _trained_looking(name, 100)
    assert head_name(src) == head
    p = tmp_path / "imagenet-like.pt"
    torch.save({"state_dict": src.state_dict()}, p)
    with pytest.raises(ProgpruneError) as e:
        load_base_weights(p, name, 10)
    msg = str(e.value)
    assert f"has a 100-class head ({head}.weight [100, " in msg
    assert "the dataset has 10 classes" in msg and "--reset-head" in msg and "\n" not in msg

    before = torch.get_rng_state()
    model, info = load_base_weights(p, name, 10, reset_head=True, seed=4)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    assert info["reset_head"] is True and info["checkpoint_classes"] == 100 and info["head"] == head
    torch.manual_seed(4)
    fresh = build_model(name, 10)
    got, want, fresh_sd = model.state_dict(), src.state_dict(), fresh.state_dict()
    for k, v in got.items():
        if k.startswith(head + "."):
            assert torch.equal(v, fresh_sd[k]), k  # the seeded fresh head
        else:
            assert torch.equal(v, want[k]), k  # everything else from the checkpoint
    with torch.no_grad():
        assert model(_inputs()).shape == (3, 10)


def test_reset_head_on_a_pruned_artifact(tmp_path):
    torch.manual_seed(0)
    m = _trained_looking("resnet20", 100)
    ex = example_inputs()
    cfg = PruneConfig(iterative_steps=10)
    out = progressive_prune(m, make_pruner(m, ex, cfg, 100), ex, 1.3, cfg)
    p = save_artifact(tmp_path / "p100.pt", m, model_name="resnet20", num_classes=100, history=out.history)
    with pytest.raises(ProgpruneError, match="has 100 classes, the dataset has 10.*--reset-head"):
        load_base_weights(p, "resnet20", 10)
    model, info = load_base_weights(p, "resnet20", 10, reset_head=True)
    assert info["rebuilt_from"] == "history" and info["num_classes"] == 10
    assert model.fc.out_features == 10 and model.fc.in_features == m.fc.in_features < 64
    sd, want = model.state_dict(), m.state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in sd if not k.startswith("fc."))
    assert getattr(model, HISTORY_ATTR) == out.history  # so the next round composes


def test_keys_that_do_not_match_are_named(tmp_path):
    p = tmp_path / "r32.pt"
    torch.save(build_model("resnet32", 10).state_dict(), p)
    with pytest.raises(ProgpruneError) as e:
        load_base_weights(p, "resnet20", 10)
    msg = str(e.value)
    assert "does not fit resnet20 with 10 classes" in msg
    assert "unexpected: layer1.3.conv1.weight, layer1.3.bn1.weight, layer1.3.bn1.bias, +" in msg
    assert "missing" not in msg and "\n" not in msg

    p = tmp_path / "vgg.pt"
    torch.save(build_model("vgg11", 10).state_dict(), p)
    msg = str(pytest.raises(ProgpruneError, load_base_weights, p, "resnet20", 10).value)
    assert "missing: conv1.weight, bn1.weight, bn1.bias, +" in msg and "unexpected: block0." in msg


def test_wider_weights_name_the_shapes(tmp_path):
    p = tmp_path / "wide.pt"
    torch.save(CifarResNet(20, 10, widths=(32, 32, 64, 128)).state_dict(), p)
    msg = str(pytest.raises(ProgpruneError, load_base_weights, p, "resnet20", 10).value)
    assert "shape mismatch: conv1.weight: checkpoint [32, 3, 3, 3] vs model [16, 3, 3, 3]" in msg


def test_text_file_says_what_it_is(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("hello world\n")
    msg = str(pytest.raises(ProgpruneError, load_base_weights, p, "resnet20", 10).value)
    assert "corrupt or not a torch file" in msg and "starts with b'hello world" in msg
    assert ": 101" not in msg  # the pickle opcode torch reports for 'e'


def test_dict_of_other_things_lists_its_keys(tmp_path):
    p = tmp_path / "opt.pt"
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, p)
    msg = str(pytest.raises(ProgpruneError, load_base_weights, p, "resnet20", 10).value)
    assert "neither a progprune artifact nor a state_dict" in msg and "top-level keys: epoch, optimizer" in msg


def test_plain_state_dict_of_a_pruned_model_loads_by_shapes(tmp_path):
    torch.manual_seed(0)
    m = _trained_looking("vgg11", 10)
    ex = example_inputs()
    cfg = PruneConfig(iterative_steps=10)
    progressive_prune(m, make_pruner(m, ex, cfg, 10), ex, 1.5, cfg)
    p = tmp_path / "pruned-sd.pt"
    torch.save(m.state_dict(), p)
    model, info = load_base_weights(p, "vgg11", 10)
    assert info["rebuilt_from"] == "shapes" and _same_outputs(model, m)
    assert getattr(model, HISTORY_ATTR)  # a replayable history for its next artifact
    again = save_artifact(tmp_path / "again.pt", model, model_name="vgg11", num_classes=10)
    model2, info2 = load_base_weights(again, "vgg11", 10)
    assert info2["rebuilt_from"] == "history" and _same_outputs(model2, m)


def test_torch_pruning_base_checkpoint_layout_loads(tmp_path):
    """Issue 12 #4: Torch-Pruning's CIFAR ResNet-56 (reproduce/engine/models/cifar/
    resnet_tiny.py) names its layers conv1, bn1, layer{1,2,3}.{0..8}.{conv1,bn1,conv2,bn2},
    layer{2,3}.0.downsample.{0,1} and fc; its released bases are plain state_dicts. A
    state_dict of that layout is a valid --checkpoint."""
    import torch

    from progprune.artifacts import load_base_weights
    from progprune.models import build_model

    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["conv1.weight", *(f"bn1.{k}" for k in bn)]
    for stage in (1, 2, 3):
        for i in range(9):
            p = f"layer{stage}.{i}"
            keys += [f"{p}.conv1.weight", *(f"{p}.bn1.{k}" for k in bn),
                     f"{p}.conv2.weight", *(f"{p}.bn2.{k}" for k in bn)]
            if i == 0 and stage > 1:
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{k}" for k in bn)]
    keys += ["fc.weight", "fc.bias"]
    torch.manual_seed(3)
    theirs = build_model("resnet56", 10).state_dict()
    assert sorted(theirs) == sorted(keys)
    torch.save({"state_dict": theirs}, tmp_path / "cifar10_resnet56.pth")
    model, info = load_base_weights(tmp_path / "cifar10_resnet56.pth", "resnet56", 10, (3, 32, 32))
    assert torch.equal(model.state_dict()["layer3.8.conv2.weight"], theirs["layer3.8.conv2.weight"])


def test_a_checkpoint_of_nan_weights_is_refused_naming_them(tmp_path):
    """NaN weights rank nothing: the run used to end 'unreachable ... use more
    iterative_steps' after every step. Now the checkpoint is refused when it loads."""
    sd = build_model("resnet20", 10).state_dict()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    sd["fc.bias"][:] = float("inf")
    p = tmp_path / "nan.pt"
    torch.save(sd, p)
    with pytest.raises(ProgpruneError) as e:
        load_base_weights(p, "resnet20", 10)
    assert str(e.value).startswith(f"checkpoint {p} holds non-finite weights (layer1.0.conv1.weight: "
                                   "1 of 2304 are nan/inf and 1 more tensor(s)); nothing can be ranked or pruned")
