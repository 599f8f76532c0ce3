"""The models people actually have: torchvision, timm and their own factory (issue 10).

Runs in the second environment (`make test` -> .venv-tv, `-m realmodels`): torchvision and
timm are real, nothing is mocked. torchvision/timm are imported inside the tests, so the main
suite (`-m "not realmodels"`, no torchvision) deselects this file instead of failing on it.

Every model is pruned once (cached), at a small input size with few iterative steps, to 2x:
it reaches >= 2x, runs forward, and `load_pruned` rebuilds it with identical outputs and the
MACs the outcome reports.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

import pytest
import torch

from progprune import load_pruned
from progprune.artifacts import load_base_weights, save_artifact
from progprune.config import PruneConfig
from progprune.errors import ProgpruneError
from progprune.macs import count_exact
from progprune.models import build_model, classifier_layers
from progprune.pruning import make_pruner, progressive_prune

pytestmark = pytest.mark.realmodels

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 10
SIZE = 32  # px: every architecture below runs at it (ViT-B/16 sees 2x2 patches)
STEPS = 5

TORCHVISION = [
    "tv:resnet18",            # residual
    "tv:mobilenet_v2",        # depthwise, inverted residual
    "tv:mobilenet_v3_small",  # depthwise + squeeze-excitation, Linear hidden head layer
    "tv:mnasnet0_5",          # depthwise
    "tv:efficientnet_b0",     # depthwise + SE, SiLU
    "tv:regnet_x_400mf",      # grouped convs
    "tv:googlenet",           # concat (inception blocks), aux_logits off
    "tv:squeezenet1_1",       # concat (fire modules), Conv classifier
    "tv:convnext_tiny",       # LayerNorm, layer scale parameters
    "tv:vit_b_16",            # attention (nn.MultiheadAttention); torchvision's smallest ViT
]
TIMM = ["timm:test_vit", "timm:test_convnext", "timm:test_efficientnet"]
FACTORY = ["py:real_model_factory:build"]


@functools.lru_cache(maxsize=None)
def _pruned(name: str, tmp: str):
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, (3, SIZE, SIZE)).eval()
    ex = torch.randn(1, 3, SIZE, SIZE)
    cfg = PruneConfig(iterative_steps=STEPS)
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    out = progressive_prune(model, pruner, ex, 2.0, cfg)
    path = os.path.join(tmp, name.replace(":", "_") + ".pt")
    save_artifact(path, model, model_name=name, num_classes=NUM_CLASSES, input_shape=(3, SIZE, SIZE),
                  history=out.history)
    return model, out, path


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("real"))


@pytest.mark.slow  # ~5-110 s a model on the shared 2-core machine (TP's tracing and counting)
@pytest.mark.parametrize("name", TORCHVISION + TIMM + FACTORY)
def test_prunes_to_2x_and_reloads(name, tmp):
    model, out, path = _pruned(name, tmp)
    assert out.status == "ok" and out.achieved_speedup >= 2.0, (out.status, out.achieved_speedup)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, NUM_CLASSES)
    again = load_pruned(path, trust_factory=True)  # py: names our own tests/real_model_factory.py
    assert not again.training
    with torch.no_grad():
        assert torch.equal(again(x), y)
    assert count_exact(again, torch.randn(1, 3, SIZE, SIZE)) == (out.macs, out.params)


def test_attention_heads_are_pruned_whole_and_recorded():
    """timm's Attention loses whole heads and its head count follows (forward and reload)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model, out, path = _pruned("timm:test_vit", d)
        before = build_model("timm:test_vit", NUM_CLASSES, (3, SIZE, SIZE))
        heads = [(m.num_heads, m.head_dim, m.qkv.out_features) for m in model.modules() if hasattr(m, "qkv")]
        heads0 = [(m.num_heads, m.head_dim) for m in before.modules() if hasattr(m, "qkv")]
        assert all(q == 3 * h * d for h, d, q in heads)  # whole heads, head_dim kept
        assert [d for _, d, _ in heads] == [d for _, d in heads0]
        again = [(m.num_heads, m.qkv.out_features) for m in load_pruned(path).modules() if hasattr(m, "qkv")]
        assert again == [(h, q) for h, _, q in heads]


@pytest.mark.parametrize("name, head", [("tv:resnet18", "fc"), ("tv:mobilenet_v3_small", "classifier.3"),
                                        ("tv:vit_b_16", "heads.head"), ("tv:squeezenet1_1", "classifier.1"),
                                        ("timm:test_convnext", "head.fc")])
def test_the_real_classifier_is_kept_whole(name, head):
    """Only the head, not every layer as wide as the class count (64 classes: whole stages)."""
    model = build_model(name, 64, (3, SIZE, SIZE))
    named = {m: n for n, m in model.named_modules()}
    assert [named[m] for m in classifier_layers(model, example_inputs=torch.randn(1, 3, SIZE, SIZE))] == [head]


def test_ignore_patterns_keep_layers_whole():
    torch.manual_seed(0)
    model = build_model("tv:resnet18", NUM_CLASSES).eval()
    ex = torch.randn(1, 3, SIZE, SIZE)
    cfg = PruneConfig(iterative_steps=STEPS, ignore=("layer1.*",))
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    progressive_prune(model, pruner, ex, 2.0, cfg)
    assert model.layer1[0].conv1.out_channels == 64 and model.layer4[0].conv1.out_channels < 512
    with pytest.raises(ProgpruneError, match="pruning.ignore: 'layr1.*' matches no module name"):
        make_pruner(model, ex, PruneConfig(ignore=("layr1.*",)), NUM_CLASSES)


# ---- pretrained weights as the base --------------------------------------------------------
def test_pretrained_state_dict_round_trip(tmp_path):
    """A torchvision state_dict saved the usual ways is the base; the pruned model's filters
    are rows of the checkpoint's filters; a 1000-class head is refused unless reset."""
    torch.manual_seed(1)
    src = build_model("tv:resnet18", NUM_CLASSES).eval()
    sd = src.state_dict()
    forms = {"plain.pth": sd, "wrapped.pth": {"state_dict": sd, "epoch": 3},
             "ddp.pth": {f"module.{k}": v for k, v in sd.items()}}
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = src(x)
    models = []
    for file, obj in forms.items():
        torch.save(obj, tmp_path / file)
        model, info = load_base_weights(tmp_path / file, "tv:resnet18", NUM_CLASSES, (3, SIZE, SIZE))
        with torch.no_grad():
            assert torch.equal(model(x), want), file
        models.append(model)
    model, ex = models[0], torch.randn(1, 3, SIZE, SIZE)
    cfg = PruneConfig(iterative_steps=STEPS)
    out = progressive_prune(model, make_pruner(model, ex, cfg, NUM_CLASSES), ex, 2.0, cfg)
    assert out.achieved_speedup >= 2.0
    assert model.conv1.out_channels < 64 or model.layer4[0].conv1.out_channels < 512
    # the surviving stem filters are rows of the checkpoint's (its input, RGB, is never pruned)
    full = sd["conv1.weight"]
    assert all((row[None] == full).flatten(1).all(1).any() for row in model.conv1.weight)
    # the head, kept whole: the checkpoint's rows at the surviving input features, in order
    kept = _kept_columns(model.fc.weight[0], sd["fc.weight"][0])
    assert len(kept) == model.fc.in_features < 512
    assert torch.equal(model.fc.weight, sd["fc.weight"][:, kept])

    big = build_model("tv:resnet18", 1000)
    torch.save(big.state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(ProgpruneError, match="1000-class head"):
        load_base_weights(tmp_path / "imagenet.pth", "tv:resnet18", NUM_CLASSES, (3, SIZE, SIZE))
    model, info = load_base_weights(tmp_path / "imagenet.pth", "tv:resnet18", NUM_CLASSES, (3, SIZE, SIZE),
                                    reset_head=True)
    assert model.fc.out_features == NUM_CLASSES and info["reset_head"] and info["checkpoint_classes"] == 1000
    assert torch.equal(model.layer1[0].conv1.weight, big.layer1[0].conv1.weight)


def _kept_columns(row: torch.Tensor, full_row: torch.Tensor) -> list[int]:
    """Positions of `full_row` that `row` keeps, matched in order."""
    kept, j = [], 0
    for i, v in enumerate(full_row.tolist()):
        if j < len(row) and v == row[j].item():
            kept.append(i)
            j += 1
    return kept


# ---- bad input through the CLI: exit 2, one line, nothing written ------------------------
def _cli(*args, cwd=HERE):
    env = {**os.environ, "PYTHONPATH": HERE}
    return subprocess.run([sys.executable, "-m", "progprune", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_bad_model_names_in_a_spec(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: bad\nspeedups: [2]\ndataset: {name: synthetic, num_classes: 10}\nmodels:\n"
                    "  - tv:resnet19\n  - timm:test_vitt\n  - py:no_such_module:build\n"
                    "  - py:real_model_factory:absent\n"
                    f"output: {tmp_path / 'out'}\n")
    proc = _cli("sweep", str(spec), "--dry-run")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    line = lines[0]
    assert "models[0]: unknown torchvision model 'tv:resnet19'; did you mean 'tv:resnet18'?" in line
    assert "models[1]: unknown timm model 'timm:test_vitt'; did you mean 'timm:test_vit'?" in line
    assert "models[2]: model 'py:no_such_module:build': cannot import no_such_module" in line
    assert "models[3]: model 'py:real_model_factory:absent': real_model_factory has no callable 'absent'" in line
    assert not (tmp_path / "out").exists()


def test_factory_returning_no_module(tmp_path):
    out = tmp_path / "out"
    proc = _cli("prune", "--model", "py:real_model_factory:not_a_module", "--speedup", "2",
                "--dataset", "synthetic", "--num-classes", "10", "--base-epochs", "0", "--finetune-epochs", "0", "--output", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith(
        "model 'py:real_model_factory:not_a_module': the factory returned a dict, not a torch.nn.Module; "
        "return the model")
    assert not out.exists()


# ---- end to end, as a user types it --------------------------------------------------------
@pytest.mark.parametrize("model", ["tv:resnet18", "py:real_model_factory:build"])
def test_prune_from_the_cli(model, tmp_path):
    """`progprune prune --model tv:... / py:...` writes a row and a model `load_pruned` rebuilds."""
    import json

    out = tmp_path / "out"
    proc = _cli("prune", "--model", model, "--speedup", "2", "--dataset", "synthetic", "--num-classes", "10",
                "--image-size", "40", "--base-epochs", "0", "--finetune-epochs", "1", "--iterative-steps", "8",
                "--latency-repeats", "2", "--output", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["status"] == "ok" and row["model"] == model and row["achieved_speedup"] >= 2.0
    assert row["macs_counter"] in ("fast", "torch_pruning")
    pruned = load_pruned(out / "pruned.pt", trust_factory=True)  # py: is our tests/real_model_factory.py
    macs, params = count_exact(pruned, torch.randn(1, 3, 40, 40))
    assert (macs, params) == (row["pruned_macs"], row["pruned_params"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tv:googlenet", "tv:regnet_x_400mf", "tv:convnext_tiny", "tv:vit_b_16",
                                  "timm:test_vit"])
def test_families_prune_to_one_and_a_half_x(name, tmp_path):
    """Concat, grouped, LayerNorm and attention models at 1.5x too (the matrix above is at 2x)."""
    torch.manual_seed(0)
    model = build_model(name, NUM_CLASSES, (3, SIZE, SIZE)).eval()
    ex = torch.randn(1, 3, SIZE, SIZE)
    cfg = PruneConfig(iterative_steps=STEPS)
    out = progressive_prune(model, make_pruner(model, ex, cfg, NUM_CLASSES), ex, 1.5, cfg)
    assert out.status == "ok" and 1.5 <= out.achieved_speedup, out.achieved_speedup
    path = str(tmp_path / "m.pt")
    save_artifact(path, model, model_name=name, num_classes=NUM_CLASSES, input_shape=(3, SIZE, SIZE),
                  history=out.history)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(load_pruned(path)(x), model(x))


@pytest.mark.slow
def test_vit_tiny_at_its_native_size_prunes_globally_with_400_steps(tmp_path):
    """timm's vit_tiny_patch16_224 at 224 px, global pruning, the default 400 steps, 2x.
    Torch-Pruning 1.6.1 raised `UnboundLocalError: cannot access local variable
    'head_thres'` on the first step whose global head ranking removed no head (step 2);
    `progprune._tp.one_step` runs such steps with head pruning off (issue 23 item 17).
    The main suite reproduces it on its own timm-style ViT
    (test_pruning.py::test_global_head_pruning_survives_steps_that_remove_no_head)."""
    torch.manual_seed(0)
    name, shape = "timm:vit_tiny_patch16_224", (3, 224, 224)
    model = build_model(name, NUM_CLASSES, shape).eval()
    heads0 = sum(m.num_heads for m in model.modules() if hasattr(m, "qkv"))
    ex = torch.randn(1, *shape)
    cfg = PruneConfig(global_pruning=True)
    assert cfg.iterative_steps == 400  # the default schedule, as a user runs it
    out = progressive_prune(model, make_pruner(model, ex, cfg, NUM_CLASSES), ex, 2.0, cfg)
    assert out.status == "ok" and out.achieved_speedup >= 2.0, (out.status, out.achieved_speedup)
    heads = [(m.num_heads, m.head_dim, m.qkv.out_features) for m in model.modules() if hasattr(m, "qkv")]
    assert sum(h for h, _, _ in heads) < heads0 and all(q == 3 * h * d for h, d, q in heads)
    path = save_artifact(tmp_path / "vit.pt", model, model_name=name, num_classes=NUM_CLASSES, input_shape=shape,
                         history=out.history)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(load_pruned(path)(x), model(x))


# ---- ImageNet-sized data (issue 11) ---------------------------------------------------------
def test_streaming_crops_are_torchvisions(tmp_path):
    """The streaming imagefolder's recipes against torchvision's own transforms: the
    training crop is RandomResizedCrop's (same box, then resized_crop + flip: identical
    pixels); evaluation is Resize(int(size / 0.875)) + CenterCrop(size) within 2/255."""
    import random

    import numpy as np
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from PIL import Image

    from progprune.data.folder import decode, random_resized_crop

    rng = np.random.default_rng(0)
    for w, h in [(300, 260), (256, 256), (500, 331), (120, 400)]:
        arr = (np.cumsum(rng.integers(0, 256, (h, w, 3)), axis=1) % 256).astype(np.uint8)
        path = tmp_path / f"{w}x{h}.png"
        Image.fromarray(arr).save(path)
        im = Image.open(path).convert("RGB")
        for size in (224, 32):
            ref = np.asarray(T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size)])(im)).astype(int)
            assert np.abs(decode(str(path), size, False, 0).astype(int) - ref).max() <= 2
            for seed in range(3):
                r = random.Random(seed)
                left, top, cw, ch = random_resized_crop(w, h, r)
                want = TF.resized_crop(im, top, left, ch, cw, [size, size])
                want = np.asarray(TF.hflip(want) if r.random() < 0.5 else want)
                assert np.array_equal(decode(str(path), size, True, seed), want), (w, h, size, seed)


def test_imagenet_recipe_validates_against_a_stand_in(tmp_path):
    """ray_jobs/imagenet_resnet50.yaml cannot run here (no ImageNet, no GPU); its dry run
    against a stand-in of the same layout (1,000 class folders of JPEGs, a torchvision
    ResNet-50 state_dict as the pretrained checkpoint) plans one combination, and the
    spec's own problems (a class count that differs, a missing checkpoint) are one line."""
    import numpy as np
    import yaml
    from PIL import Image
    from torchvision.models import resnet50

    root = tmp_path / "imagenet"
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    for split in ("train", "val"):
        for c in range(1000):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            img.save(d / f"{split}_{c}.JPEG")
    ckpt = tmp_path / "resnet50-0676ba61.pth"
    torch.save(resnet50().state_dict(), ckpt)
    spec = yaml.safe_load(open(os.path.join(HERE, "..", "ray_jobs", "imagenet_resnet50.yaml")))
    spec["dataset"]["data_dir"] = str(root)
    spec["models"][0]["checkpoint"] = str(ckpt)
    spec["output"] = str(tmp_path / "out")
    path = tmp_path / "imagenet.yaml"
    path.write_text(yaml.safe_dump(spec))
    # the GPU cluster it is meant for (a dry run does not connect): without --address the
    # dry run is of this machine's embedded Ray, which has no GPU and is refused
    gpu_cluster = ("--address", "ray://gpu-head:10001")
    proc = _cli("sweep", str(path), "--dry-run", *gpu_cluster)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sweep imagenet-resnet50: 1 combinations" in proc.stdout, proc.stdout
    assert not (tmp_path / "out").exists()

    shutil.rmtree(root / "val" / "n00000999")
    ckpt.unlink()
    proc = _cli("sweep", str(path), "--dry-run", *gpu_cluster)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"val lacks classes of train/: n00000999" in lines[0] and "checkpoint" in lines[0], lines[0]


# ---- the fast MACs counter on the zoo (issue 25) ---------------------------------------------
ZOO_SIZE, ZOO_STEPS = 64, 30


def _zoo(name, seed=0):
    torch.manual_seed(seed)
    return build_model(name, NUM_CLASSES, (3, ZOO_SIZE, ZOO_SIZE)).eval(), torch.randn(1, 3, ZOO_SIZE, ZOO_SIZE)


@pytest.mark.slow  # ~5-30 s a model here: Torch-Pruning counts after every step to compare
@pytest.mark.parametrize("name, global_pruning", [
    ("tv:googlenet", False), ("tv:squeezenet1_1", True),  # torch.cat, then MaxPool over the joined channels
    ("tv:vit_b_32", False),  # nn.MultiheadAttention: the same dims of every head
    ("timm:vit_tiny_patch16_224", True),  # timm's Attention: whole heads
])
def test_fast_count_is_torch_prunings_at_every_step_of_a_zoo_run(name, global_pruning):
    """The fast count equals count_ops_and_params after every step of a 2x run; the loop keeps
    it, and lands within the tolerance with the fine crossing, except where heads go whole
    (timm's Attention), whose crossing step is taken whole."""
    import torch_pruning as tp

    model, ex = _zoo(name)
    cfg = PruneConfig(iterative_steps=ZOO_STEPS, global_pruning=global_pruning)
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    from progprune.macs import MacsCounter

    counter = MacsCounter(model, ex, expected=count_exact(model, ex)[0])
    assert counter.ok, counter.reason
    seen = []

    def check(step, speedup):
        now = int(tp.utils.count_ops_and_params(model, ex)[0])
        assert counter.macs() == now, f"{name} step {step}: fast {counter.macs():,} vs Torch-Pruning {now:,}"
        seen.append(step)

    out = progressive_prune(model, pruner, ex, 2.0, cfg, on_step=check)
    assert out.status == "ok" and out.macs_counter == "fast" and out.macs_fallback == ""
    assert len(seen) == out.steps >= 3
    if name.startswith("timm:"):
        assert out.heads_whole and out.crossing_cut == "whole"
    else:
        assert not out.heads_whole and 2.0 <= out.achieved_speedup <= 2.0 * (1 + cfg.tolerance), out


def _history_marks(model, ex, cfg, crossing):
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    marks = []
    out = progressive_prune(model, pruner, ex, 2.0, cfg.model_copy(update={"crossing": crossing}),
                            on_step=lambda step, s: marks.append(len(pruner.pruning_history())))
    return out, marks


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tv:googlenet", "tv:vit_b_32", "tv:mobilenet_v3_large"])
def test_crossing_prunes_a_subset_of_the_reference_step_on_the_zoo(name):
    """As tests/test_crossing.py for the CIFAR networks: the fine loop prunes the same channels
    as Torch-Pruning's own loop (crossing="reference": whole steps) at every step before the
    last, and a subset of the reference's last step at the last."""
    cfg = PruneConfig(iterative_steps=ZOO_STEPS, global_pruning=True)
    (ref_model, ex), (fine_model, _) = _zoo(name), _zoo(name)
    ref, ref_marks = _history_marks(ref_model, ex, cfg, "reference")
    fine, fine_marks = _history_marks(fine_model, ex, cfg, "fine")
    assert ref.status == fine.status == "ok" and ref.macs_counter == fine.macs_counter == "fast"
    assert ref.steps == fine.steps and ref_marks[:-1] == fine_marks[:-1]
    cut = ref_marks[-2] if len(ref_marks) > 1 else 0
    assert fine.history[:cut] == ref.history[:cut]
    ref_last: dict = {}
    for layer, is_out, idxs in ref.history[cut:]:
        ref_last.setdefault((layer, is_out), set()).update(idxs)
    for layer, is_out, idxs in fine.history[cut:]:
        assert set(idxs) <= ref_last.get((layer, is_out), set()), (layer, idxs)
    assert 2.0 <= fine.achieved_speedup <= ref.achieved_speedup
    assert fine.crossing_cut in ("prefix", "subset") and fine.achieved_speedup < ref.achieved_speedup


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tv:googlenet", "tv:efficientnet_b0", "tv:convnext_tiny", "tv:vit_b_32"])
def test_cached_mappings_and_groups_prune_what_torch_pruning_prunes_on_the_zoo(name):
    """As tests/test_pruning.py for the CIFAR nets: within `_tp.mappings_cached` (the loop's
    steps) every step prunes the same channels of every tensor as Torch-Pruning's own
    `pruner.step()`, every group's magnitude scores are bitwise upstream's, and every group
    is the one Torch-Pruning builds (concats: googlenet;
    squeeze-excitation: efficientnet; layer-scale parameters: convnext; attention: vit)."""
    from progprune import _tp

    def groups(pruner):
        return [[(str(d), list(i), list(g[k].root_idxs)) for k, (d, i) in enumerate(g)]
                for g in _tp.all_groups(pruner)]

    cfg = PruneConfig(iterative_steps=ZOO_STEPS, global_pruning=True)
    (own_model, ex), (model, _) = _zoo(name), _zoo(name)
    own, cached = make_pruner(own_model, ex, cfg, NUM_CLASSES), make_pruner(model, ex, cfg, NUM_CLASSES)
    for step in range(6):
        with _tp.one_step(own):
            own.step()
        with _tp.mappings_cached(cached), _tp.one_step(cached):
            cached.step()
        assert cached.pruning_history() == own.pruning_history(), step
        for (n, a), b in zip(own_model.state_dict().items(), model.state_dict().values()):
            assert a.shape == b.shape and torch.equal(a, b), (step, n)
        with _tp.mappings_cached(cached):  # the magnitude importance: bitwise upstream's scores
            fast = [cached.importance(g) for g in _tp.all_groups(cached)]
        slow = [cached.importance(g) for g in _tp.all_groups(cached)]
        assert len(fast) == len(slow) > 0 and all(torch.equal(a, b) for a, b in zip(fast, slow)), step
    with _tp.mappings_cached(cached):
        mine = groups(cached)
    assert mine == groups(cached)
    assert any(v is not None for v in cached.DG._progprune_structures.values())
