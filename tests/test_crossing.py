"""The crossing step: part of the reference loop's last step, in the method's own order.

Both loops run on the same weights: `crossing="reference"` (Torch-Pruning's loop: whole
steps) and `crossing="fine"` (the default). Every step before the last must remove the
same channels; the last step of the fine loop must remove a subset of what the
reference's last step removes; so every layer is at least as wide as the reference's, and
the speedup lies between the target and the reference's.
"""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from progprune.config import PruneConfig
from progprune.errors import ProgpruneError
from progprune.macs import MacsCounter
from progprune.models import build_model, example_inputs
from progprune.pruning import CROSSING_CUTS, make_pruner, progressive_prune

from helpers import spread_bn_model

NUM_CLASSES = 10


def _cfg(global_pruning=True, steps=50, method="group_norm", round_to=None, max_pruning_ratio=1.0):
    return PruneConfig(method=method, global_pruning=global_pruning, iterative_steps=steps,
                       max_pruning_ratio=max_pruning_ratio, round_to=round_to)


def _crossing(cfg, crossing):
    """`cfg` with `crossing` as given (unvalidated: the loop must refuse an unknown one)."""
    return cfg.model_copy(update={"crossing": crossing})


def _weights(name, seed=0):
    return spread_bn_model(name, NUM_CLASSES, seed)


def _run(model, target, crossing, cfg, ex):
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    marks = []  # history length after each step: where each step's entries end
    out = progressive_prune(model, pruner, ex, target, _crossing(cfg, crossing),
                            on_step=lambda step, s: marks.append(len(pruner.pruning_history())))
    return out, marks


def _widths(model):
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or isinstance(m, nn.BatchNorm2d)}


def _check_subset_rule(name, target, cfg, seed=0, models=False):
    ex = example_inputs()
    ref_model = _weights(name, seed)
    fine_model = _weights(name, seed)
    assert all(torch.equal(a, b) for a, b in zip(ref_model.state_dict().values(), fine_model.state_dict().values()))
    ref, ref_marks = _run(ref_model, target, "reference", cfg, ex)
    fine, fine_marks = _run(fine_model, target, "fine", cfg, ex)

    assert ref.status == fine.status == "ok", (ref, fine)
    assert ref.crossing_cut == "whole" and fine.crossing_cut in CROSSING_CUTS
    assert ref.steps == fine.steps
    # identical up to the last step, channel for channel
    assert ref_marks[:-1] == fine_marks[:-1]
    cut = ref_marks[-2] if len(ref_marks) > 1 else 0
    assert fine.history[:cut] == ref.history[:cut]
    # the last step: per layer, a subset of the reference's last-step channels (both prune
    # the groups in the same order, so each root's indices are in the same coordinates)
    ref_last = {}
    for layer, is_out, idxs in ref.history[cut:]:
        ref_last.setdefault((layer, is_out), set()).update(idxs)
    for layer, is_out, idxs in fine.history[cut:]:
        assert set(idxs) <= ref_last.get((layer, is_out), set()), (layer, idxs, ref_last.get((layer, is_out)))
    # layer by layer at least as wide as the reference
    wr, wf = _widths(ref_model), _widths(fine_model)
    assert wr.keys() == wf.keys()
    narrower = {n: (wf[n], wr[n]) for n in wr if any(a < b for a, b in zip(wf[n], wr[n]))}
    assert not narrower, narrower
    # precision: at or above the target, never above the reference
    assert target <= fine.achieved_speedup <= ref.achieved_speedup
    fine_count, _ = tp.utils.count_ops_and_params(fine_model, ex)
    assert fine.macs == int(fine_count)
    pruned, selected = fine.crossing_channels
    assert 0 < pruned <= selected
    if fine.crossing_cut == "whole":
        assert pruned == selected and fine.achieved_speedup == ref.achieved_speedup
    else:
        assert pruned < selected and fine.achieved_speedup < ref.achieved_speedup
    with torch.no_grad():
        assert fine_model(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)
    return (ref, fine, ref_model, fine_model) if models else (ref, fine)


# the test matrix: every model family, global and local, several targets. 30 steps, so
# each crossing step selects a few dozen channels and the loops stay fast (MobileNetV2 is
# the slowest to score: 15 steps).
CASES = [
    ("resnet20", True, 1.5, 30), ("resnet20", True, 2.0, 30), ("resnet20", True, 3.0, 30),
    ("resnet20", False, 1.5, 30), ("resnet20", False, 4.0, 30),
    ("resnet56", True, 2.55, 30), ("resnet56", False, 1.5, 30),
    ("vgg11", True, 1.5, 30), ("vgg11", True, 4.0, 30), ("vgg11", False, 3.0, 30),
    ("mobilenetv2", True, 2.0, 15), ("mobilenetv2", False, 1.5, 15),
]


@pytest.mark.parametrize("name, global_pruning, target, steps", CASES)
def test_crossing_prunes_a_subset_of_the_reference_step(name, global_pruning, target, steps):
    _check_subset_rule(name, target, _cfg(global_pruning, steps=steps))


def test_crossing_with_round_to():
    ref, fine = _check_subset_rule("resnet20", 2.0, _cfg(True, steps=30, round_to=4))


@pytest.mark.parametrize("name, global_pruning, target, steps, round_to", [
    ("resnet20", True, 1.4, 30, None), ("resnet20", False, 1.85, 30, None),
    ("resnet20", True, 1.4, 30, 4), ("mobilenetv2", True, 1.3, 15, None),
])
def test_crossing_with_a_cap(name, global_pruning, target, steps, round_to):
    """With max_pruning_ratio < 1 the reference is Torch-Pruning's loop with the cap
    enforced (each step trimmed to what the cap allows); the fine crossing prunes a subset
    of that capped reference's last step, and neither goes past the cap."""
    cfg = _cfg(global_pruning, steps=steps, round_to=round_to, max_pruning_ratio=0.3)
    start = _widths(_weights(name, 0))
    ref, fine, ref_model, fine_model = _check_subset_rule(name, target, cfg, models=True)
    assert ref.max_pruning_ratio == fine.max_pruning_ratio == 0.3
    assert not ref.at_floor and not fine.at_floor
    for model in (ref_model, fine_model):
        for n, shape in _widths(model).items():  # out (and in) channels of every layer
            floor = [math.ceil(w * 0.7 - 1e-9) for w in start[n][:2]]
            assert all(w >= f for w, f in zip(shape[:2], floor)), (n, shape, start[n])
            if round_to and isinstance(dict(model.named_modules())[n], nn.Conv2d) and shape[0] != start[n][0]:
                assert shape[0] % round_to == 0, (n, shape)


def test_fine_crossing_lands_closer_than_the_reference_on_coarse_steps():
    """With 20 steps each step is ~5% of every layer: the reference overshoots by a lot,
    the fine crossing lands within the tolerance."""
    overs = []
    for name, target in [("resnet20", 2.0), ("vgg11", 2.0), ("resnet56", 2.55)]:
        ref, fine = _check_subset_rule(name, target, _cfg(True, steps=20))
        assert ref.overshoot_pct > 1.0
        overs.append(fine.overshoot_pct)
    assert max(overs) <= 0.5, overs


def test_outcome_is_jsonable_and_names_the_cut():
    ex = example_inputs()
    model = _weights("resnet20", 1)
    out, _ = _run(model, 2.0, "fine", _cfg(steps=30), ex)
    row = json.loads(json.dumps(dataclasses.asdict(out)))
    assert row["crossing"] == "fine" and row["crossing_cut"] in CROSSING_CUTS
    assert row["crossing_channels"] == out.crossing_channels


def test_unreachable_target_reports_no_cut():
    ex = example_inputs()
    model = _weights("resnet20", 0)
    out, _ = _run(model, 1000.0, "fine", _cfg(steps=10), ex)
    assert out.status == "unreachable" and out.crossing_cut == "none"


@pytest.mark.parametrize("crossing", ["exact", "", None, "Fine"])
def test_crossing_must_be_known(crossing):
    ex = example_inputs()
    model = _weights("resnet20", 0)
    cfg = _cfg(steps=10)
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ProgpruneError, match="crossing must be one of fine, reference"):
        progressive_prune(model, pruner, ex, 2.0, _crossing(cfg, crossing))
    assert pruner.current_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --------------------------------------------------------------------------------------
# torch.cat: groups must be pruned in the order step(interactive=True) yields them, each
# re-derived after the previous one (issue 10: "expected input ... 28 channels, but got 27")
# --------------------------------------------------------------------------------------
class ConcatResidual(nn.Module):
    """stem -> two branches concatenated -> 1x1 fuse + residual -> a second concat -> head."""

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 12, 3, padding=1, bias=False)
        self.a_bn = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(16, 10, 3, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(10)
        self.fuse = nn.Conv2d(22, 16, 1, bias=False)  # cat(a, b) -> back to the residual width
        self.fuse_bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 12, 3, padding=1, stride=2, bias=False)
        self.c_bn = nn.BatchNorm2d(12)
        self.d = nn.Conv2d(16, 16, 3, padding=1, stride=2, bias=False)
        self.d_bn = nn.BatchNorm2d(16)
        self.mix = nn.Conv2d(28, 28, 3, padding=1, bias=False)  # cat(c, d) -> 28 channels
        self.mix_bn = nn.BatchNorm2d(28)
        self.fc = nn.Linear(28, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        y = torch.cat([self.a_bn(self.a(x)), self.b_bn(self.b(x))], dim=1)
        x = F.relu(x + self.fuse_bn(self.fuse(y)))
        y = torch.cat([self.c_bn(self.c(x)), self.d_bn(self.d(x))], dim=1)
        y = F.relu(self.mix_bn(self.mix(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("global_pruning", [True, False])
@pytest.mark.parametrize("crossing", ["fine", "reference"])
@pytest.mark.parametrize("target", [1.5, 2.5])
def test_concat_and_residual_network(global_pruning, crossing, target):
    torch.manual_seed(3)
    model = ConcatResidual().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
    ex = example_inputs()
    assert MacsCounter(model, ex).ok  # so the planned (crossing) path runs, not exact counting
    pruner = tp.pruner.GroupNormPruner(
        model, ex, importance=tp.importance.GroupMagnitudeImportance(p=2), global_pruning=global_pruning,
        pruning_ratio=1.0, iterative_steps=5, ignored_layers=[model.fc])
    out = progressive_prune(model, pruner, ex, target, PruneConfig(crossing=crossing))
    assert out.status == "ok" and out.achieved_speedup >= target
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)
    macs, params = tp.utils.count_ops_and_params(model, ex)
    assert (out.macs, out.params) == (int(macs), int(params))
    assert model.mix.in_channels == model.c.out_channels + model.d.out_channels
    assert model.fuse.in_channels == model.a.out_channels + model.b.out_channels
    assert model.mix.in_channels < 28 or model.fuse.in_channels < 22
    # the pruned model is the same network as replaying its history on a fresh copy
    fresh = ConcatResidual().eval()
    dg = tp.DependencyGraph().build_dependency(fresh, ex)
    dg.load_pruning_history(out.history)
    assert _widths(fresh) == _widths(model)
