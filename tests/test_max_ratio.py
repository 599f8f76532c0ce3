"""max_pruning_ratio is a cap per layer over the whole progressive run (issue 14 #7).

Torch-Pruning 1.6.1 alone leaves layers past it (0.3 left ResNet-20 layers 34-41% pruned,
1e-6 still pruned every layer); progressive_prune trims every step to what the cap
allows. Every layer keeps at least ceil(width * (1 - ratio)) of the channels it had when
the run started; a target the cap puts out of reach ends "unreachable", never past it.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from progprune.config import PruneConfig
from progprune.models import example_inputs
from progprune.pruning import make_pruner, progressive_prune

from helpers import spread_bn_model

NUM_CLASSES = 10


def _model(name, seed=0):
    return spread_bn_model(name, NUM_CLASSES, seed)  # seeded, BN scales spread





def _widths(model):
    """(out, in) channels of every conv/linear, (features,) of every BN."""
    w = {}
    for n, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            w[n] = (m.weight.shape[0], m.weight.shape[1] * getattr(m, "groups", 1))
        elif isinstance(m, nn.BatchNorm2d):
            w[n] = (m.num_features,)
    return w


def _prune(name, target, ratio, *, global_pruning=True, steps=60, round_to=None, crossing="fine"):
    model = _model(name)
    ex = example_inputs()
    before = _widths(model)
    cfg = PruneConfig(method="group_norm", global_pruning=global_pruning, iterative_steps=steps,
                      max_pruning_ratio=ratio, round_to=round_to, crossing=crossing)
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    out = progressive_prune(model, pruner, ex, target, cfg)
    after = _widths(model)
    macs, params = tp.utils.count_ops_and_params(model, ex)
    assert (out.macs, out.params) == (int(macs), int(params))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)
    return out, before, after


def _over_cap(before, after, ratio):
    """Layers narrower than the cap allows: {name: (width before, width after)}."""
    bad = {}
    for n, b in before.items():
        floor = tuple(math.ceil(w * (1 - ratio) - 1e-9) for w in b)
        if any(a < f for a, f in zip(after[n], floor)):
            bad[n] = (b, after[n])
    return bad


def _min_kept(before, after):
    return min(a / b for n in before for a, b in zip(after[n], before[n]))


# (model, global, iterative_steps): MobileNetV2 is the slowest to score, so fewer steps
RUNS = [("resnet20", True, 60), ("resnet20", False, 60), ("mobilenetv2", True, 20), ("mobilenetv2", False, 20)]


@pytest.mark.parametrize("name, global_pruning, steps", RUNS)
def test_cap_of_0_3_holds_and_a_reachable_target_is_reached(name, global_pruning, steps):
    # global: 1.3x is where Torch-Pruning alone left layers 33-38% pruned
    target = 1.3
    out, before, after = _prune(name, target, 0.3, global_pruning=global_pruning, steps=steps)
    assert out.status == "ok" and out.achieved_speedup >= target, out
    assert out.overshoot_pct <= 0.5
    assert not _over_cap(before, after, 0.3), _over_cap(before, after, 0.3)
    assert out.max_pruning_ratio == 0.3 and not out.at_floor


@pytest.mark.parametrize("name, global_pruning, steps", RUNS)
@pytest.mark.parametrize("crossing", ["fine", "reference"])
def test_cap_of_1e_6_prunes_nothing_and_is_unreachable(name, global_pruning, steps, crossing):
    out, before, after = _prune(name, 1.3, 1e-6, global_pruning=global_pruning, steps=steps,
                                crossing=crossing)
    assert after == before
    assert out.status == "unreachable" and out.macs == out.base_macs
    assert out.at_floor and out.steps == 1  # stops as soon as nothing can be pruned
    assert out.crossing_cut == "none" and out.history == []


@pytest.mark.parametrize("global_pruning", [True, False])
def test_a_target_the_cap_puts_out_of_reach_ends_unreachable_at_the_floor(global_pruning):
    """ResNet-20 with every layer at 70% is ~1.88x: 2.0x is out of reach. Torch-Pruning
    alone reached it by pruning layers 31-41%."""
    out, before, after = _prune("resnet20", 2.0, 0.3, global_pruning=global_pruning, steps=30)
    assert out.status == "unreachable" and out.achieved_speedup < 2.0
    assert out.at_floor and out.steps < 30
    assert not _over_cap(before, after, 0.3), _over_cap(before, after, 0.3)
    # every prunable layer is at its floor: nothing more could go
    convs = [n for n in before if n.endswith(("conv1", "conv2")) and "layer" in n]
    assert convs and all(after[n][0] == math.ceil(before[n][0] * 0.7) for n in convs), \
        {n: (before[n], after[n]) for n in convs}
    assert _min_kept(before, after) >= 0.7


def test_cap_with_round_to_keeps_multiples():
    """32 * 0.7 = 22.4: the floor is 23, so with round_to=8 a 32-wide layer keeps 24 (and a
    16-wide one all 16: 8 is below its floor of 12)."""
    out, before, after = _prune("resnet20", 1.3, 0.3, steps=60, round_to=8)
    assert out.status == "ok" and out.achieved_speedup >= 1.3, out
    assert not _over_cap(before, after, 0.3), _over_cap(before, after, 0.3)
    changed = {n: (before[n][0], after[n][0]) for n in before if after[n][0] != before[n][0]}
    assert changed and all(a % 8 == 0 for _, a in changed.values()), changed
    assert all(b > 16 for b, _ in changed.values()), changed


def test_the_default_cap_changes_nothing():
    """1.0 (the default) is Torch-Pruning's loop: the same channels as a hand-run
    pruner.step() loop to the same step count."""
    out, _, after = _prune("resnet20", 2.0, 1.0, steps=30, crossing="reference")
    model = _model("resnet20")
    ex = example_inputs()
    cfg = PruneConfig(method="group_norm", global_pruning=True, iterative_steps=30)
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    for _ in range(out.steps):
        pruner.step()
    assert _widths(model) == after
    assert [[n, bool(o), [int(i) for i in idx]] for n, o, idx in pruner.pruning_history()] == out.history
